r"""Trains an MD4 model.

  python -m md4_jax.train --config=configs/digits.py --workdir=/tmp/md4_digits \
      [--config.num_train_steps=500 ...]
  # From an install without a clone (e.g. Colab), a shipped config by name:
  python -m md4_jax.train --config=digits:tiny --workdir=/tmp/md4_digits_tiny

Re-running the same command resumes from the latest checkpoint in --workdir.
Multi-process: add --distributed (see md4_jax/cli.py and launch/).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only writes summaries.

from absl import app, flags  # noqa: E402

from md4_jax import cli  # noqa: E402
from md4_jax.run import loop  # noqa: E402

_CONFIG = cli.define_config_flag(
    "config", "Training config: a file (configs/digits.py[:variant]) or a shipped config's name "
    "(digits[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even though safe config keys (frequencies, num_train_steps, devices, numerically "
    "equivalent memory knobs...) changed.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv)
  cli.run(lambda: loop.run(_CONFIG.value, _WORKDIR.value,
                           allow_config_change=_ALLOW_CONFIG_CHANGE.value), "md4_jax",
          memory_knobs="--config.batch_size (or raise --config.grad_accum_steps; "
          "--config.remat_policy=full, --config.masked_head=True and --config.loss_chunk_size "
          "also save memory)")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("md4_jax"))
