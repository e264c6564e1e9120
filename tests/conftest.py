"""Strict JAX for every test: rank promotion raises, and two CPU devices for sharded paths."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
