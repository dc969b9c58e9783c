r"""Trains an MD4 model.

  python -m md4_jax.main --config=configs/digits.py --workdir=/tmp/md4_digits \
      [--config.num_train_steps=500 ...]

Re-running the same command resumes from the latest checkpoint in --workdir.
"""

import logging as pylogging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only writes summaries.

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from md4_jax.train import loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even though safe config keys (frequencies, num_train_steps, devices...) changed.")

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("MD4_DISTRIBUTED", "0") == "1",
    "Call jax.distributed.initialize() (multi-process runs). Without the three flags below JAX "
    "auto-detects TPU pods, SLURM and other clusters. Default from $MD4_DISTRIBUTED.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

# Exit codes: bad input or config (2), training stopped on NaN/Inf (3).
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of checkpoint/data libraries (warnings still pass)."""

  NOISY = ("/orbax/", "/grain/", "/etils/")

  def filter(self, record):
    return record.levelno > pylogging.INFO or not any(n in record.pathname for n in self.NOISY)


def initialize_distributed(coordinator_address, num_processes, process_id) -> None:
  """jax.distributed.initialize; CPU processes talk through gloo collectives."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  jax.config.update("jax_threefry_partitionable", True)
  if _DISTRIBUTED.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    loop.run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except loop.NonFiniteError as e:
    logging.error("%s", e)
    print(f"md4_jax: stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_NONFINITE)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    logging.debug("Input error", exc_info=True)
    print(f"md4_jax: error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
  app.run(main)
