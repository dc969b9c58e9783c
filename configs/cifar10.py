"""MD4 on CIFAR-10 (32x32x3, 256 values per channel): the paper's image setup.

A VDM-style UNet without downsampling (32 residual blocks of 256 channels at
32x32), linear schedule, continuous time. The MD4 paper reports
2.78 bits/dim on the test split. Needs the TFDS ArrayRecord files:

  tfds build cifar10 --data_dir=$DATA --file_format=array_record  # with internet
  python -m md4_jax.main --config=configs/cifar10.py --workdir=$WORKDIR \
      --config.data_dir=$DATA
  # CPU smoke run with a tiny network:
  python -m md4_jax.main --config=configs/cifar10.py:tiny --workdir=/tmp/c10
"""

from configs import base


def get_config(arg=None):
  """arg: '' (paper size) or 'tiny' (a small network for CPU smoke runs)."""
  arg = base.check_variant(arg, "configs/cifar10.py", ("", "tiny"))
  config = base.get_config()
  config.dataset = "cifar10"
  config.data_shape = (32, 32, 3)
  config.vocab_size = 256
  config.classes = 0
  config.batch_size = 256
  config.eval_batch_size = 256
  config.random_flip = False  # Off for likelihood (bits/dim) runs, as in the paper.

  config.noise_schedule = "linear"
  config.network = "unet"
  config.unet.channels = 256
  config.unet.channel_mult = (1,)  # One resolution: no downsampling.
  config.unet.num_res_blocks = 32
  config.unet.attn_resolutions = ()  # Self-attention in the middle block only.
  config.unet.embed_dim = 64
  config.dropout_rate = 0.1

  base.paper_scale_loop(config)
  config.learning_rate = 4e-4
  config.weight_decay = 0.01
  config.num_train_steps = 2_000_000
  config.num_samples = 64
  config.sampling_steps = 256

  if arg == "tiny":
    config.unet.channels = 32
    config.unet.channel_mult = (1, 2)
    config.unet.num_res_blocks = 1
    config.unet.embed_dim = 8
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 100
  return config
