"""MD4 on FineWeb-Edu (the sample-10BT subset): GPT-2 tokens, sequences of 1024.

The OpenWebText setup on another corpus (the paper's reference code trains the same
MD4-S network and recipe on it); the variants are those of configs/openwebtext.py
(`:medium` = MD4-M, `:wide_cond`, `:genmd4`, `:tiny`).

  python -m md4_jax.data.prepare --dataset=fineweb_edu --data_dir=$DATA
  python -m md4_jax.train --config=configs/fineweb_edu.py --workdir=$WORKDIR \
      --config.data_dir=$DATA
"""

from md4_jax.configs import openwebtext

VARIANTS = openwebtext.VARIANTS


def get_config(arg=None):
  """arg: as configs/openwebtext.py."""
  return openwebtext.get_config(arg, dataset="fineweb_edu", config_file="configs/fineweb_edu.py")
