"""MD4 on scikit-learn's bundled 8x8 digits: the embedded default, no download.

1797 grey-scale digits with 17 intensity levels (0..16) are tokens of a
(8, 8, 1) image, vocabulary 17. A fixed split keeps 1497 for training and 300
held out. A per-pixel marginal model scores about 2.42 bits/dim on the held-out
split; MD4 should clearly beat it in a few minutes on a 2-core CPU.

  python -m md4_jax.train --config=configs/digits.py --workdir=/tmp/md4_digits
  # class-conditional:
  python -m md4_jax.train --config=configs/digits.py:cond --workdir=/tmp/md4_digits_c
  # seconds-long smoke run (8-channel one-level UNet, 16 per batch; tests use it):
  python -m md4_jax.train --config=configs/digits.py:tiny --workdir=/tmp/md4_digits_tiny
  # GenMD4 (a learnable schedule per intensity level; its MD4 baseline is
  # --config.noise_schedule=linear, the schedule GenMD4 starts from):
  python -m md4_jax.train --config=configs/digits.py:genmd4 --workdir=/tmp/genmd4_digits
"""

from md4_jax.configs import base


VARIANTS = ("", "cond", "tiny", "tiny_cond", "genmd4", "tiny_genmd4")


def get_config(arg=None):
  """arg: '' (unconditional), 'cond' (class-conditional on the digit label, with 10%
  label dropout for classifier-free guidance), 'genmd4' (GenMD4 from the linear
  schedule), 'tiny' / 'tiny_cond' /
  'tiny_genmd4' (the same with a tiny network and batch, for smoke runs)."""
  arg = base.check_variant(arg, "configs/digits.py", VARIANTS)
  config = base.get_config()
  base.set_dataset(config, "digits", conditional=arg.endswith("cond"))
  # Class-conditional runs also learn p(x) on 10% null labels: classifier-free guidance
  # (`md4_jax.sample --guidance=w`) then applies.
  config.label_dropout = 0.1 if arg.endswith("cond") else 0.0
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

  base.cpu_loop(config, num_train_steps=2000, eval_every_steps=500, sample_every_steps=1000,
                num_samples=64, sampling_steps=64)

  if arg.endswith("genmd4"):
    base.genmd4(config)

  if arg.startswith("tiny"):
    config.unet.channels = 8
    config.unet.channel_mult = (1,)
    config.unet.attn_resolutions = ()
    config.unet.embed_dim = 4
    # An eval batch of 40 divides over 1, 2, 4 or 8 devices.
    base.smoke_run(config, batch_size=16, num_train_steps=config.num_train_steps,
                   eval_batch_size=40)
    config.num_samples = 8
    config.sampling_steps = 8
  return config
