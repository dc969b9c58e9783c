r"""`python -m md4_jax.main` = `python -m md4_jax.train` (the name the first releases documented)."""

from absl import app

from md4_jax import cli
from md4_jax import train

if __name__ == "__main__":
  app.run(train.main, flags_parser=cli.flags_parser("md4_jax"))
