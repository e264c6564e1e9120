"""Native kernels, built on first use with the machine's C++ compiler and registered as
``jax.ffi`` targets. Each has a pure-JAX reference it is tested against and falls back to."""
