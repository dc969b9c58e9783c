"""Test setup: 8 forced CPU devices, strict rank promotion, float32 matmuls, and one
compilation cache per test session.

The cache: many tests build the same tiny configs (in this process, in pytest-xdist
workers and in the training/sampling subprocesses) and used to compile the same XLA
programs again each time. JAX's persistent compilation cache, in a directory made
for this session (inherited by workers and subprocesses through the environment and
removed when the session ends), compiles each program once. A cached executable is
the executable the compiler would build again, so results are unchanged; a clean
checkout still pays every first compile. Set MD4_TEST_COMPILATION_CACHE=0 to turn it
off, or JAX_COMPILATION_CACHE_DIR to keep a cache of your own.
"""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends. LLVM's optimisation off: the suite's programs
# are tiny, so compiling them dominates, and -O0 about halves it while the heavy ops (dots,
# convolutions) still run in the same library kernels. Subprocesses get the same flag
# (helpers.xla_flags).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE = None  # The directory this process made, removed at the end of the session.
if (os.environ.get("MD4_TEST_COMPILATION_CACHE", "1") != "0"
    and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
  _OWN_CACHE = tempfile.mkdtemp(prefix="md4_jax_test_jit_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
if "JAX_COMPILATION_CACHE_DIR" in os.environ:
  # Cache programs that take over 0.1 s to compile (the default, 1 s, skips most of a tiny
  # model's), and set a size bound: with one, JAX locks the directory around each read and
  # write, which keeps concurrent processes from reading a half-written entry.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
jax.config.update("jax_default_matmul_precision", "highest")
if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # Also when JAX was imported before this file.
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_compilation_cache_max_size",
                    int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: subprocess trainings, multi-process runs, notebooks, benchmark scripts "
      "and long statistical tests (the fast tier is `pytest -m \"not slow\" tests`).")


def _group(item) -> str | None:
  mark = item.get_closest_marker("xdist_group")
  return None if mark is None else str(mark.args[0] if mark.args else mark.kwargs["name"])


def pytest_collection_modifyitems(config, items):
  """Under `--dist loadgroup` (the suite's command, with `--no-loadscope-reorder`): slow
  tests first, otherwise in file order, a file marked `xdist_group` moving as one. The two
  workers take the tests one at a time in this order (a group at once), so the longest
  start first and the short ones fill in the end. Other runs keep the file order."""
  if not getattr(config.option, "loadgroup", False):  # Set in xdist's workers.
    return
  slow_groups = {_group(item) for item in items if item.get_closest_marker("slow")}
  def first(item):
    group = _group(item)
    return item.get_closest_marker("slow") is not None or (group is not None
                                                           and group in slow_groups)
  items.sort(key=lambda item: not first(item))  # Stable: file order within each part.


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
