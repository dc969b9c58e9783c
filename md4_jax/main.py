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

# Exit codes: bad input or config (2), training stopped on NaN/Inf (3).
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of checkpoint/data libraries (warnings still pass)."""

  NOISY = ("/orbax/", "/grain/", "/etils/")

  def filter(self, record):
    return record.levelno > pylogging.INFO or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  jax.config.update("jax_threefry_partitionable", True)
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
