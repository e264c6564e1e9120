"""Weight loaders: Hugging Face tensors <-> the NNX model, safetensors folders, GGUF, the hub."""
