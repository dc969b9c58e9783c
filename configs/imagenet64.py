"""MD4 on downsampled ImageNet 64x64 (TFDS 'downsampled_imagenet/64x64').

The MD4 paper reports 3.42 bits/dim. Unlabelled in TFDS, so unconditional.

  tfds build downsampled_imagenet/64x64 --data_dir=$DATA --file_format=array_record
  python -m md4_jax.main --config=configs/imagenet64.py --workdir=$WORKDIR \
      --config.data_dir=$DATA
"""

from configs import base


def get_config(arg=None):
  """arg: '' (paper size) or 'tiny' (CPU smoke run)."""
  arg = base.check_variant(arg, "configs/imagenet64.py", ("", "tiny"))
  config = base.get_config()
  config.dataset = "imagenet64"
  config.data_shape = (64, 64, 3)
  config.vocab_size = 256
  config.classes = 0
  config.batch_size = 512
  config.eval_batch_size = 512
  config.random_flip = False

  config.noise_schedule = "linear"
  config.network = "unet"
  config.unet.channels = 256
  config.unet.channel_mult = (1, 2)  # 64x64 then 32x32.
  config.unet.num_res_blocks = 16
  config.unet.attn_resolutions = (32,)
  config.unet.embed_dim = 64
  config.dropout_rate = 0.0

  base.paper_scale_loop(config)
  config.learning_rate = 2e-4
  config.weight_decay = 0.0
  config.num_train_steps = 2_000_000
  config.num_samples = 16
  config.sampling_steps = 256

  if arg == "tiny":
    config.unet.channels = 16
    config.unet.num_res_blocks = 1
    config.unet.attn_resolutions = ()
    config.unet.embed_dim = 4
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 50
  return config
