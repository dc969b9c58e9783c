"""MD4 on CIFAR-10 (32x32x3, 256 values per channel): the paper's image setup.

The paper's network (28.4M parameters): a VDM-style UNet without downsampling, 128
channels, 32 residual blocks down and 33 up at 32x32 with self-attention in the middle
block only (with q/k/v/out biases); each block reads the 128-wide time embedding as a shift
(zero-initialised, no bias); values embedded in 128 dims; zero-initialised output; the paper's
time sinusoid, initialisation and dropout (base.paper_unet). Linear schedule,
continuous time, the paper's recipe (lr 2e-4, warmup 100, b2 0.99, weight decay 0.01,
dropout 0.1, batch 256, 2M steps, EMA 0.9999, 256 sampling steps on the cosine grid).
The MD4 paper reports 2.78 bits/dim on the test split. Needs the TFDS ArrayRecord files:

  tfds build cifar10 --data_dir=$DATA --file_format=array_record  # with internet
  python -m md4_jax.train --config=configs/cifar10.py --workdir=$WORKDIR \
      --config.data_dir=$DATA
  # CPU smoke run with a tiny network:
  python -m md4_jax.train --config=configs/cifar10.py:tiny --workdir=/tmp/c10
"""

from md4_jax.configs import base

VARIANTS = ("", "tiny", "wide_cond")


def get_config(arg=None):
  """arg: '' (the paper's network and recipe), 'wide_cond' (the same UNet with md4_jax's
  scale+shift conditioning from a 512-wide embedding) or 'tiny' (CPU smoke runs)."""
  arg = base.check_variant(arg, "configs/cifar10.py", VARIANTS)
  config = base.get_config()
  base.set_dataset(config, "cifar10")  # Unconditional: the labels are not used.
  config.random_flip = False  # Off for likelihood (bits/dim) runs, as in the paper.

  config.noise_schedule = "linear"
  base.paper_unet(config)
  uc = config.unet
  base.paper_recipe(config, learning_rate=2e-4, warmup_steps=100, b2=0.99, weight_decay=0.01,
                    dropout_rate=0.1, batch_size=256, num_train_steps=2_000_000,
                    sampling_steps=256)
  config.num_samples = 64

  if arg == "wide_cond":
    base.wide_cond_unet(config)

  if arg == "tiny":
    uc.channels, uc.channel_mult, uc.num_res_blocks, uc.embed_dim, uc.cond_dim = (
        32, (1, 2), 1, 8, 32)
    base.smoke_run(config, batch_size=16, num_train_steps=100)
  return config
