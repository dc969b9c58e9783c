"""MD4 on OpenWebText: GPT-2 tokens (vocab 50257), sequences of 1024.

MD4-S (the default, 165.9M parameters): the paper's 12-layer, width-768, 12-head
transformer (RoPE, sigmoid GLU, 64-wide conditioning, zero-initialised head without
bias), linear schedule, the paper's recipe (lr 3e-4, warmup 2000, b2 0.999, weight decay
0.03, dropout 0.02, batch 512, 1M steps, EMA 0.9999, 1000 sampling steps on the cosine
grid). `:medium` is MD4-M (GPT-2 medium size: 24 layers, width 1024, 16 heads; cosine
schedule, no dropout, uniform sampling grid). Tokenise and pack once, then train:

  python -m md4_jax.data.prepare --dataset=openwebtext --data_dir=$DATA
  python -m md4_jax.train --config=configs/openwebtext.py --workdir=$WORKDIR \
      --config.data_dir=$DATA
"""

from md4_jax.configs import base

VARIANTS = ("", "medium", "tiny", "genmd4", "wide_cond")


def get_config(arg=None, dataset: str = "openwebtext", config_file: str = "configs/openwebtext.py"):
  """arg: '' (MD4-S), 'medium' (MD4-M), 'genmd4' (GenMD4, paper settings), 'wide_cond'
  (md4_jax's own transformer design at MD4-S size) or 'tiny' (CPU smoke run)."""
  arg = base.check_variant(arg, config_file, VARIANTS)
  config = base.get_config()
  base.set_dataset(config, dataset)
  config.noise_schedule = "linear"
  base.paper_transformer(config)
  base.paper_recipe(config, learning_rate=3e-4, warmup_steps=2000, b2=0.999, weight_decay=0.03,
                    dropout_rate=0.02, batch_size=512, num_train_steps=1_000_000,
                    sampling_steps=1000)
  # Memory, measured by the TPU compiler (md4_jax.plan, benchmarks/RESULTS.md): on v5e-8 the
  # reference's step fits a global batch of 320, md4_jax with only the chunked loss and
  # attention 320 too. Scanned blocks, each rematerialised in the backward pass, fit 1208
  # (unscanned, the same remat does not fit 640), and the head only at masked positions cuts
  # the step's matmuls by 13 %. Each computes the plain path's loss (tests/perf_test.py,
  # tests/masked_head_test.py).
  config.scan_layers = True
  config.remat_policy = "full"
  config.masked_head = True
  config.loss_chunk_size = 128
  config.attention_impl = "chunked"  # On GPU in bf16, "auto" picks cuDNN flash attention.
  config.num_samples = 4

  if arg == "medium":  # MD4-M.
    config.transformer.width = 1024
    config.transformer.depth = 24
    config.transformer.num_heads = 16
    config.noise_schedule = "cosine"
    config.dropout_rate = 0.0
    config.sampling_grid = "uniform"

  if arg == "genmd4":  # The paper's GenMD4 settings (Sec. 7 / App.): 12 layers as above.
    # Weight decay is not applied to the schedule exponents (optimizer.NO_DECAY).
    base.genmd4(config, dropout_rate=0.02, weight_decay=0.03, learning_rate=3e-4,
                batch_size=512)
    config.masked_head = False  # MD4's loss only: GenMD4 needs every position's softmax.

  if arg == "wide_cond":
    base.wide_cond_transformer(config)

  if arg == "tiny":
    base.tiny_transformer(config, length=128)
    # A CPU smoke run: the memory knobs above only cost time at this size.
    config.scan_layers, config.remat_policy, config.masked_head = False, "none", False
    base.smoke_run(config, batch_size=8, num_train_steps=50)
    config.sampling_steps = 128
  return config
