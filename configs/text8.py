"""MD4 on text8 (27 characters, sequences of 256), evaluated in bits/char.

Transformer of GPT-2 small size (12 layers, width 768, 12 heads), linear
schedule. The data is the canonical 100M-character file, split 90M/5M/5M.

  python -m md4_jax.main --config=configs/text8.py --workdir=$WORKDIR \
      --config.data_dir=$DATA   # $DATA/text8 or $DATA/text8.zip (downloaded when online)
  python -m md4_jax.main --config=configs/text8.py:tiny --workdir=/tmp/t8
"""

from configs import base


def get_config(arg=None):
  """arg: '' (paper size), 'genmd4' (GenMD4, paper settings) or 'tiny' (CPU smoke run)."""
  arg = base.check_variant(arg, "configs/text8.py", ("", "tiny", "genmd4"))
  config = base.get_config()
  config.dataset = "text8"
  config.data_shape = (256,)
  config.vocab_size = 27
  config.classes = 0
  config.batch_size = 512
  config.eval_batch_size = 512

  config.noise_schedule = "linear"
  config.network = "transformer"
  config.transformer.width = 768
  config.transformer.depth = 12
  config.transformer.num_heads = 12
  config.transformer.mlp_ratio = 4.0
  config.dropout_rate = 0.05

  base.paper_scale_loop(config)
  config.learning_rate = 3e-4
  config.weight_decay = 0.0
  config.num_train_steps = 1_000_000
  config.num_samples = 8
  config.sampling_steps = 256

  if arg == "genmd4":  # The paper's GenMD4 settings (Sec. 7 / App.): 12 layers as above.
    # Weight decay is not applied to the schedule exponents (optim.NO_DECAY).
    base.genmd4(config, dropout_rate=0.05, weight_decay=0.03, learning_rate=3e-4,
                batch_size=512)

  if arg == "tiny":
    config.data_shape = (64,)
    config.transformer.width = 64
    config.transformer.depth = 2
    config.transformer.num_heads = 4
    config.batch_size = 16
    config.eval_batch_size = 16
    config.num_train_steps = 100
  return config
