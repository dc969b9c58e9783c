"""MD4 on downsampled ImageNet 64x64 (TFDS 'downsampled_imagenet/64x64').

The paper's network (204.6M parameters): a UViT, 8 residual blocks of 256 channels at
64x64 (conditional GroupNorm), a DiT of 20 blocks of width 768 and 12 heads on 2x2
patches (1024 tokens) in the middle (h = DiT(h)), 9 residual blocks up; the paper's time
sinusoid, initialisation and dropout (base.paper_uvit). `:best_likelihood` is the
variant behind the paper's best number (24 residual blocks + 12 DiT blocks). Linear
schedule, the paper's recipe (lr 2e-4, warmup 100, b2 0.99, weight decay 0.01, dropout
0.1, batch 512, 2M steps, EMA 0.9999, 256 sampling steps on the cosine grid). The MD4
paper reports 3.42 bits/dim. Unlabelled in TFDS, so unconditional.

  tfds build downsampled_imagenet/64x64 --data_dir=$DATA --file_format=array_record
  python -m md4_jax.train --config=configs/imagenet64.py --workdir=$WORKDIR \
      --config.data_dir=$DATA
"""

from md4_jax.configs import base

VARIANTS = ("", "best_likelihood", "tiny")


def get_config(arg=None):
  """arg: '' (the paper's UViT 8 + 20), 'best_likelihood' (24 + 12) or 'tiny' (CPU smoke run)."""
  arg = base.check_variant(arg, "configs/imagenet64.py", VARIANTS)
  config = base.get_config()
  base.set_dataset(config, "imagenet64")
  config.random_flip = False

  config.noise_schedule = "linear"
  base.paper_uvit(config)
  vc = config.uvit
  base.paper_recipe(config, learning_rate=2e-4, warmup_steps=100, b2=0.99, weight_decay=0.01,
                    dropout_rate=0.1, batch_size=512, num_train_steps=2_000_000,
                    sampling_steps=256)
  config.num_samples = 16

  if arg == "best_likelihood":
    vc.num_res_blocks = 24
    vc.depth = 12

  if arg == "tiny":
    vc.channels, vc.num_res_blocks, vc.embed_dim, vc.patch_size = 16, 1, 4, 4
    vc.width, vc.depth, vc.num_heads, vc.cond_dim = 32, 1, 2, 16
    base.smoke_run(config, batch_size=8, num_train_steps=50)
  return config
