"""MD4 on text8 (27 characters, sequences of 256), evaluated in bits/char.

The paper's network (88.7M parameters): a 12-layer, width-768, 12-head transformer with
RoPE, sigmoid GLU, 64-wide conditioning and characters embedded in 64 dims (projected
to 768), the paper's time sinusoid, LayerNorm eps, initialisation and dropout; linear
schedule; the paper's recipe (lr 5e-4, warmup 2000, weight decay 0.03,
dropout 0.05, batch 512, 1M steps, EMA 0.9999, 1000 sampling steps on the cosine grid).
The data is the canonical 100M-character file, split 90M/5M/5M.

  python -m md4_jax.train --config=configs/text8.py --workdir=$WORKDIR \
      --config.data_dir=$DATA   # $DATA/text8 or $DATA/text8.zip (downloaded when online)
  python -m md4_jax.train --config=configs/text8.py:tiny --workdir=/tmp/t8
"""

from md4_jax.configs import base

VARIANTS = ("", "tiny", "genmd4", "wide_cond")


def get_config(arg=None):
  """arg: '' (the paper's network and recipe), 'genmd4' (GenMD4, paper settings),
  'wide_cond' (md4_jax's own transformer design at the same size) or 'tiny' (the paper's
  design, CPU smoke-run size)."""
  arg = base.check_variant(arg, "configs/text8.py", VARIANTS)
  config = base.get_config()
  base.set_dataset(config, "text8")
  config.noise_schedule = "linear"
  base.paper_transformer(config, embed_dim=64)
  base.paper_recipe(config, learning_rate=5e-4, warmup_steps=2000, b2=0.999, weight_decay=0.03,
                    dropout_rate=0.05, batch_size=512, num_train_steps=1_000_000,
                    sampling_steps=1000)
  config.num_samples = 8

  if arg == "genmd4":  # The paper's GenMD4 settings (Sec. 7 / App.): 12 layers as above.
    # Weight decay is not applied to the schedule exponents (optimizer.NO_DECAY).
    base.genmd4(config, dropout_rate=0.05, weight_decay=0.03, learning_rate=3e-4,
                batch_size=512)

  if arg == "wide_cond":
    base.wide_cond_transformer(config)

  if arg == "tiny":
    base.tiny_transformer(config, length=64, embed_dim=16)
    base.smoke_run(config, batch_size=16, num_train_steps=100)
    config.sampling_steps = 64
  return config
