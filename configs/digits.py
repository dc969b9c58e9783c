"""MD4 on scikit-learn's bundled 8x8 digits: the embedded default, no download.

1797 grey-scale digits with 17 intensity levels (0..16) are tokens of a
(8, 8, 1) image, vocabulary 17. A fixed split keeps 1497 for training and 300
held out. A per-pixel marginal model scores about 2.42 bits/dim on the held-out
split; MD4 should clearly beat it in a few minutes on a 2-core CPU.

  python -m md4_jax.main --config=configs/digits.py --workdir=/tmp/md4_digits
  # class-conditional:
  python -m md4_jax.main --config=configs/digits.py:cond --workdir=/tmp/md4_digits_c
"""

from configs import base


def get_config(arg=None):
  """arg: '' (unconditional) or 'cond' (class-conditional on the digit label)."""
  config = base.get_config()
  config.dataset = "digits"
  config.data_shape = (8, 8, 1)
  config.vocab_size = 17
  config.classes = 10 if arg == "cond" else 0
  config.batch_size = 64
  config.eval_batch_size = 100

  config.network = "unet"
  config.noise_schedule = "cosine"
  config.unet.channels = 32
  config.unet.channel_mult = (1, 2)
  config.unet.num_res_blocks = 1
  config.unet.attn_resolutions = (4,)
  config.unet.embed_dim = 16
  config.dropout_rate = 0.1

  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.num_train_steps = 2000
  config.ema_rate = 0.995
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.sample_every_steps = 1000
  config.num_samples = 64
  config.sampling_steps = 64
  return config
