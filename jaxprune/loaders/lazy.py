"""Model weights read from disk one tensor at a time, for runs that never hold the whole model.

:func:`open_weights` reads only what a file says about itself: the config, the tokenizer and
every tensor's name and shape. :meth:`LazyWeights.read` then reads the tensors asked for (one
decoder layer's, the embedding, the head) from a Hugging Face folder's safetensors shards or
from a GGUF file, both memory-mapped, and hands them back exactly as the eager loaders
(:func:`jaxprune.loaders.resolve.load_model`) would: Hugging Face names, PyTorch layout, the
stored dtype for safetensors and float32 for GGUF. Each read releases the pages it touched, so
resident memory stays near the tensors asked for, not the file.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxprune.loaders import gguf as gguf_loader
from jaxprune.loaders import hf
from jaxprune.loaders.resolve import check_finite, tokenizer_of, with_window_bos

# Bytes of one float32 parameter: what the in-memory path holds per parameter.
FLOAT32_BYTES = 4


class LazyWeights:
    """A model's config, tokenizer and tensor shapes, its tensors read only when asked for.

    Attributes:
      source: the ``.gguf`` file or Hugging Face folder.
      config: the family's config (:class:`~jaxprune.models.llama.LlamaConfig`, ...).
      tokenizer: as :func:`~jaxprune.loaders.resolve.load_model` gives it (or ``None``).
      shapes: Hugging Face tensor name -> shape in PyTorch layout.
    """

    source: Path
    config: object
    tokenizer: object
    shapes: dict[str, tuple[int, ...]]

    @property
    def param_count(self) -> int:
        """Parameters in the file (a tied head counts once)."""
        return int(sum(np.prod(s, dtype=np.int64) for s in self.shapes.values()))

    @property
    def param_bytes(self) -> int:
        """The bytes the parameters take in float32, the dtype every run computes in."""
        return FLOAT32_BYTES * self.param_count

    def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The named tensors, in PyTorch layout, checked to be finite.

        Raises:
          WeightFileError (GGUFError for GGUF files): unreadable, or holding NaN or infinity.
        """
        names = list(names)
        unknown = [n for n in names if n not in self.shapes]
        if unknown:
            raise KeyError(f"{self.source} holds no tensors {unknown}.")
        tensors = self._read(names)
        check_finite(tensors, self.source)
        return tensors

    def _read(self, names: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class SafetensorsWeights(LazyWeights):
    """A Hugging Face folder: ``config.json`` and safetensors shards."""

    def __init__(self, folder: Path):
        self.source = folder
        self.config = hf.read_hf_config(folder)
        self.tokenizer = with_window_bos(self.config, tokenizer_of(folder))
        self.files = hf.weight_files(folder)
        self.shapes = {}
        for file in sorted(set(self.files.values())):
            self.shapes |= hf.tensor_shapes(folder / file)

    def _read(self, names: list[str]) -> dict[str, np.ndarray]:
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for file, some in by_file.items():
            out |= hf.read_tensors(self.source / file, some)
        return out


class GGUFWeights(LazyWeights):
    """A GGUF file (Llama or Gemma 3 architecture), dequantized to float32 a tensor at a time."""

    def __init__(self, path: Path):
        self.source = path
        self.header = gguf_loader.read_header(path)
        self.config = self.header.config
        self.tokenizer = with_window_bos(self.config, self.header.tokenizer)
        h = self.header
        self.table = gguf_loader.tensor_table(h.reader, h.fields, path, h.arch)
        self.shapes = {name: entry.shape for name, entry in self.table.items()}

    def _read(self, names: list[str]) -> dict[str, np.ndarray]:
        out, problems = {}, []
        for name in names:
            w = gguf_loader.dequantize(self.table[name], self.header.fields)
            if isinstance(w, str):
                problems.append(w)
            else:
                out[name] = w
        self._release_pages()
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise gguf_loader.GGUFError(
                f"{self.source}: {len(problems)} tensor problem(s):\n{lines}"
            )
        return out

    def _release_pages(self) -> None:
        # The reader maps the whole file for its lifetime; drop the pages this read touched from
        # the resident set (the kernel keeps them in its page cache) so that reading every layer
        # in turn does not leave the whole file resident.
        raw = getattr(self.header.reader.data, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED)


def open_weights(path: str | Path) -> LazyWeights:
    """The lazy weights of a local ``.gguf`` file or Hugging Face folder (as
    :func:`jaxprune.loaders.resolve.locate` gives them); reads headers only.

    Raises:
      WeightFileError, GGUFError: as the eager loaders, for what the headers show.
    """
    path = Path(path)
    return GGUFWeights(path) if path.is_file() else SafetensorsWeights(path)
