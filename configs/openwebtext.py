"""MD4-S on OpenWebText: GPT-2 tokens (vocab 50257), sequences of 1024.

12 layers, width 768, 12 heads (GPT-2 small size), linear schedule.
Tokenise and pack once, then train:

  python -m md4_jax.data.prepare --dataset=openwebtext --data_dir=$DATA
  python -m md4_jax.main --config=configs/openwebtext.py --workdir=$WORKDIR \
      --config.data_dir=$DATA
"""

from configs import base


def get_config(arg=None):
  """arg: '' (MD4-S), 'genmd4' (GenMD4, paper settings) or 'tiny' (CPU smoke run)."""
  arg = base.check_variant(arg, "configs/openwebtext.py", ("", "tiny", "genmd4"))
  config = base.get_config()
  config.dataset = "openwebtext"
  config.data_shape = (1024,)
  config.vocab_size = 50257
  config.classes = 0
  config.batch_size = 512
  config.eval_batch_size = 512

  config.noise_schedule = "linear"
  config.network = "transformer"
  config.transformer.width = 768
  config.transformer.depth = 12
  config.transformer.num_heads = 12
  config.transformer.mlp_ratio = 4.0
  config.dropout_rate = 0.0
  # Memory (benchmarks/memory.py): 25.9 -> 10.4 GiB of temporaries at per-device batch 8.
  config.loss_chunk_size = 128
  config.attention_impl = "chunked"  # On GPU in bf16, "auto" picks cuDNN flash attention.

  base.paper_scale_loop(config)
  config.learning_rate = 3e-4
  config.weight_decay = 0.03
  config.b2 = 0.98
  config.num_train_steps = 1_000_000
  config.num_samples = 4
  config.sampling_steps = 1024

  if arg == "genmd4":  # The paper's GenMD4 settings (Sec. 7 / App.): 12 layers as above.
    # Weight decay is not applied to the schedule exponents (optim.NO_DECAY).
    base.genmd4(config, dropout_rate=0.02, weight_decay=0.03, learning_rate=3e-4,
                batch_size=512)

  if arg == "tiny":
    config.data_shape = (128,)
    config.transformer.width = 64
    config.transformer.depth = 2
    config.transformer.num_heads = 4
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 50
  return config
