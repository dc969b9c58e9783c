r"""Converts a checkpoint of the reference implementation (google-deepmind/md4) into an
md4_jax workdir.

  python -m md4_jax.convert --from_reference=REF_WORKDIR --config=configs/text8.py \
      --workdir=/tmp/t8_from_reference [--step=N] [--config.KEY=VALUE ...]

--from_reference is the reference's workdir (or its checkpoints/ or one step's
directory); the latest step unless --step. --config names the md4_jax config whose
network the reference trained (a file or a shipped name, with :variant and
--config.* overrides, as in md4_jax.train). The new workdir holds config.json and a
checkpoint at the reference's step: parameters, EMA parameters and Adam moments under
md4_jax's names (md4_jax/run/reference.py has the tables), with checksums. Then

  python -m md4_jax.sample --workdir=/tmp/t8_from_reference
  python -m md4_jax.evaluate --workdir=/tmp/t8_from_reference
  python -m md4_jax.train --config=configs/text8.py --workdir=/tmp/t8_from_reference

sample, evaluate and continue training it. The config must compute the reference's
function (the paper configs do): one with md4_jax's own time sinusoid, label joining,
text LayerNorm epsilon or UViT DiT residual is refused, naming the --config overrides
to add. That, a checkpoint that does not match the config (a missing, extra or
misshapen parameter) or a non-empty --workdir: one line, exit 2. See docs/convert.md.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from md4_jax import cli  # noqa: E402
from md4_jax.run import reference  # noqa: E402

PROG = "md4_jax.convert"

_FROM = flags.DEFINE_string("from_reference", None, "The reference run's workdir, its "
                            "checkpoints/ directory, or one step's directory.")
_CONFIG = cli.define_config_flag(
    "config", "The md4_jax config of the network the reference trained: a file "
    "(configs/text8.py[:variant]) or a shipped config's name (text8[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The new md4_jax workdir (absent or empty).")
_STEP = flags.DEFINE_integer("step", None, "The reference step (default: the latest).")
flags.mark_flags_as_required(["from_reference", "config", "workdir"])


def main(argv):
  cli.start(argv, quiet=True)  # The one result line (or one error line) is the output.
  record = cli.run(lambda: reference.convert(_FROM.value, _CONFIG.value, _WORKDIR.value,
                                             step=_STEP.value), PROG)
  print(f"Converted reference step {record['step']} ({record['parameters']:,} parameters; EMA "
        f"{record['ema']}; Adam moments {record['adam_moments']}) from {record['source']} into "
        f"{_WORKDIR.value}.", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(PROG))
