"""MD4 on a synthetic text source with exact probabilities: the embedded text benchmark.

Sequences of 32 tokens over 8 letters from a seeded order-1 Markov chain
(md4_jax/data/synthetic.py; its splits are generated, nothing to download). The
source's entropy is known exactly, so the held-out NELBO is reported next to it
(the gap is the model's excess bits per token), and `md4_jax.sample` scores
samples by their exact negative log-likelihood under the source.

  python -m md4_jax.train --config=configs/synthetic_text.py --workdir=/tmp/synth
  python -m md4_jax.sample --workdir=/tmp/synth --num_samples=1000 --steps=32
  python -m md4_jax.train --config=configs/synthetic_text.py:tiny --workdir=/tmp/synth_tiny

Variant 'order2' makes the source an order-2 chain (64 contexts): inferring a
masked token then needs two neighbours on each side, and the same model stays
~0.15 bits/token above the entropy after 3000 steps (order 1: ~0.02).
"""

import ml_collections

from md4_jax.configs import base


VARIANTS = ("", "order2", "tiny")


def get_config(arg=None):
  """arg: '' (a few minutes on 2 CPU cores), 'order2' (a harder source) or 'tiny' (seconds)."""
  arg = base.check_variant(arg, "configs/synthetic_text.py", VARIANTS)
  config = base.get_config()
  base.set_dataset(config, "synthetic_text")
  # The source: order-k Markov chain, Dirichlet(concentration) transitions drawn with seed.
  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.order = 2 if arg == "order2" else 1
  config.synthetic.concentration = 0.2
  config.synthetic.seed = 0
  config.batch_size = 64
  config.eval_batch_size = 200

  config.noise_schedule = "linear"
  config.network = "transformer"
  config.transformer.width = 64
  config.transformer.depth = 4
  config.transformer.num_heads = 4
  config.transformer.mlp_ratio = 4.0
  config.dropout_rate = 0.0

  base.cpu_loop(config, num_train_steps=3000, eval_every_steps=1000, sample_every_steps=0,
                num_samples=16, sampling_steps=32)

  if arg == "tiny":
    config.transformer.width = 32
    config.transformer.depth = 1
    base.smoke_run(config, batch_size=16, num_train_steps=20, eval_batch_size=40)
    config.num_samples = 8
    config.sampling_steps = 8
  return config
