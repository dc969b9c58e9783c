"""Test setup: 8 forced CPU devices, strict rank promotion, float32 matmuls."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: subprocess trainings, multi-process runs, notebooks, benchmark scripts "
      "and long statistical tests (the fast tier is `pytest -m \"not slow\" tests`).")
