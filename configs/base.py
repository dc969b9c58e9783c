"""Defaults shared by every md4_jax config.

Dataset configs import this module, call `get_config()`, name their dataset with
`set_dataset` (which copies vocab_size, data_shape and classes from the dataset's
`DatasetInfo` record) and override fields. Every field is read somewhere; units
and choices are in the comments. docs/configs.md explains the rest.
"""

import ml_collections

from md4_jax import data


def set_dataset(config: ml_collections.ConfigDict, name: str, *, conditional: bool = False
                ) -> ml_collections.ConfigDict:
  """Points `config` at dataset `name` and copies the facts its `DatasetInfo` record knows.

  Sets config.dataset, config.vocab_size (the record's V), config.data_shape (its image
  shape, or (L,) with its default sequence length for text) and config.classes (its
  number of labels if `conditional`, else 0). A config that wants other values (a shorter
  L for a smoke run) assigns them afterwards; so do `--config.KEY=...` flags.

  Raises:
    ValueError: an unknown dataset, or `conditional` for a dataset without labels.
  """
  info = data.get_info(name)
  if conditional and not info.classes:
    raise ValueError(f"Dataset {name!r} has no labels: it cannot be class-conditional.")
  config.dataset = name
  config.vocab_size = info.vocab_size
  config.data_shape = info.default_data_shape
  config.classes = info.classes if conditional else 0
  return config


def check_variant(arg, config_file: str, variants: tuple[str, ...]) -> str:
  """The variant named by `arg` ('' or None = the default); ValueError for an unknown one."""
  arg = arg or ""
  if arg not in variants:
    raise ValueError(f"Unknown variant {arg!r} of {config_file}; valid: "
                     f"{', '.join(repr(v) for v in variants)} (e.g. {config_file}:{variants[-1]}).")
  return arg


def paper_scale_loop(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Loop settings shared by the paper-scale configs (days of accelerator time)."""
  config.warmup_steps = 2000
  config.ema_rate = 0.9999
  config.log_loss_every_steps = 500
  config.eval_every_steps = 20_000
  config.checkpoint_every_steps = 10_000
  config.sample_every_steps = 50_000
  config.check_nans = False  # Saves a per-step host read at scale; the log line still checks.
  return config


# The MD4 paper's function, initialisation and dropout in every network group (the reference
# implementation's choices); md4_jax's own are base.get_config()'s values (OWN_DESIGN).
PAPER_DESIGN = dict(sinusoid="md4", label_cond="concat", param_init="md4")
OWN_DESIGN = dict(sinusoid="dit", label_cond="add", param_init="md4_jax")


def paper_transformer(config: ml_collections.ConfigDict, embed_dim: int = 0
                      ) -> ml_collections.ConfigDict:
  """The MD4 paper's text transformer (GPT-2 small: 12 x 768, 12 heads unless the
  caller changes them): RoPE, sigmoid GLU with hidden 8/3 x width rounded up to 32,
  conditioning width 64 read through a sigmoid, time MLP 64 -> 256 -> 64 on the paper's
  sinusoid, zero-initialised head without bias, LayerNorm eps 1e-5, channel dropout plus
  attention-probability dropout, the paper's init. embed_dim: token embedding width (text8:
  64, projected to 768)."""
  config.network = "transformer"
  config.time_embedding = "md4"
  tc = config.transformer
  tc.width, tc.depth, tc.num_heads, tc.mlp_ratio = 768, 12, 12, 4.0
  tc.cond_dim, tc.cond_act = 64, "sigmoid"
  tc.mlp, tc.mlp_multiple_of = "glu", 32
  tc.positions = "rope"
  tc.embed_dim = embed_dim
  tc.head_bias, tc.zero_init_head = False, True
  tc.update(PAPER_DESIGN, norm_eps=1e-5, dropout="channel")
  return config


def paper_unet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MD4 paper's CIFAR-10 UNet (VDM-style, no downsampling): 128 channels, 32 residual
  blocks down and 33 up at full resolution, attention (with q/k/v/out biases) in the middle
  block only, the 128-wide time embedding read as a shift, values embedded in 128 dims,
  zero-initialised output, the paper's sinusoid and init."""
  config.network = "unet"
  config.time_embedding = "md4"
  uc = config.unet
  uc.channels = 128
  uc.channel_mult = (1,)  # One resolution: no downsampling.
  uc.num_res_blocks = 32
  uc.attn_resolutions = ()  # Self-attention in the middle block only.
  uc.embed_dim = 128
  uc.cond_dim = 128
  uc.film = "shift"
  uc.zero_init_output = True
  uc.update(PAPER_DESIGN, attn_bias=True)
  return config


def paper_uvit(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MD4 paper's ImageNet 64x64 UViT: 8 residual blocks of 256 channels, h = DiT(h) with
  20 blocks of width 768, 12 heads, 2x2 patches, 9 residual blocks up; the DiT's dropout
  (channel mask on the attention output, attention probabilities, element-wise in the MLP),
  the paper's sinusoid and init."""
  config.network = "uvit"
  config.time_embedding = "md4"
  vc = config.uvit
  vc.channels = 256
  vc.num_res_blocks = 8
  vc.embed_dim = 256
  vc.patch_size = 2
  vc.width = 768
  vc.depth = 20
  vc.num_heads = 12
  vc.mlp_ratio = 4.0
  vc.cond_dim = 256
  vc.update(PAPER_DESIGN, dit_residual=False, dropout="dit")
  return config


def wide_cond_transformer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """md4_jax's own transformer design at the same depth, width and heads (the `:wide_cond`
  variants): conditioning as wide as the model through swish (adaLN from a 768-wide
  vector), SwiGLU, learned absolute positions, DiT time MLP and sinusoid, a head with bias,
  LayerNorm eps 1e-6, element-wise dropout, md4_jax's init."""
  config.time_embedding = "dit"
  tc = config.transformer
  tc.cond_dim, tc.cond_act = 0, "swish"
  tc.mlp, tc.mlp_multiple_of = "swiglu", 8
  tc.positions = "learned"
  tc.embed_dim = 0
  tc.head_bias, tc.zero_init_head = True, False
  tc.update(OWN_DESIGN, norm_eps=1e-6, dropout="element")
  return config


def wide_cond_unet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """md4_jax's own UNet conditioning at the same channels and blocks (`:wide_cond`): scale +
  shift from swish(c) after the second GroupNorm, c 4 x channels wide from the DiT time MLP
  and sinusoid, a lecun-initialised output conv, a bias-free zero-initialised middle
  attention, md4_jax's init."""
  config.time_embedding = "dit"
  uc = config.unet
  uc.cond_dim = 0  # 4 x channels.
  uc.film = "scale_shift"
  uc.zero_init_output = False
  uc.update(OWN_DESIGN, attn_bias=False)
  return config


def paper_recipe(config: ml_collections.ConfigDict, *, learning_rate: float, warmup_steps: int,
                 b2: float, weight_decay: float, dropout_rate: float, batch_size: int,
                 num_train_steps: int, sampling_steps: int, sampling_grid: str = "cosine"
                 ) -> ml_collections.ConfigDict:
  """The MD4 paper's optimisation settings (AdamW b1 0.9, eps 1e-8, linear warmup then cosine
  decay to 0, EMA 0.9999, continuous time) plus the given per-dataset values.

  Where md4_jax differs on purpose: the paper does not clip gradients; we keep
  clip_grad_norm = 1 (a no-op on healthy steps, it bounds the rare loss spikes of long
  runs; --config.clip_grad_norm=0 gives the paper's exact recipe).
  """
  paper_scale_loop(config)
  config.cont_time = True
  config.lr_schedule = "cosine"
  config.b1 = 0.9
  config.clip_grad_norm = 1.0
  config.learning_rate = learning_rate
  config.warmup_steps = warmup_steps
  config.b2 = b2
  config.weight_decay = weight_decay
  config.dropout_rate = dropout_rate
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.num_train_steps = num_train_steps
  config.sampling_steps = sampling_steps
  config.sampling_grid = sampling_grid
  return config


def genmd4(config: ml_collections.ConfigDict, dropout_rate: float | None = None,
           **overrides) -> ml_collections.ConfigDict:
  """GenMD4 from the linear schedule (= poly1, where every token's exponent starts).

  The paper's settings: t1 = 1e-3, K = 2 masks per example (the network runs
  on both: ~2x MD4's step). dropout_rate / overrides: per-dataset settings.
  """
  config.model = "genmd4"
  config.noise_schedule = "linear"
  config.power_init = 1.0
  config.genmd4_t1 = 1e-3
  config.genmd4_num_masks = 2
  if dropout_rate is not None:
    config.dropout_rate = dropout_rate
  config.update(overrides)
  return config


def cpu_loop(config: ml_collections.ConfigDict, *, num_train_steps: int, eval_every_steps: int,
             sample_every_steps: int, num_samples: int, sampling_steps: int,
             learning_rate: float = 2e-3) -> ml_collections.ConfigDict:
  """The loop of the embedded defaults (minutes on a 2-core CPU): a short warmup, a short EMA
  (decay 0.995, with warm-up), checkpoints as often as evaluations."""
  config.learning_rate = learning_rate
  config.warmup_steps = 100
  config.num_train_steps = num_train_steps
  config.ema_rate = 0.995
  config.ema_warmup = True  # An embedded default: short runs report a warm EMA.
  config.eval_every_steps = config.checkpoint_every_steps = eval_every_steps
  config.sample_every_steps = sample_every_steps
  config.num_samples = num_samples
  config.sampling_steps = sampling_steps
  return config


def smoke_run(config: ml_collections.ConfigDict, *, batch_size: int, num_train_steps: int,
              eval_batch_size: int = 0) -> ml_collections.ConfigDict:
  """The `:tiny` variants' loop (seconds to minutes on a CPU): a small batch, a short run and
  an EMA with warm-up (a few steps cannot warm the paper's 0.9999 decay)."""
  config.ema_warmup = True
  config.batch_size = batch_size
  config.eval_batch_size = eval_batch_size or batch_size
  config.num_train_steps = num_train_steps
  return config


def tiny_transformer(config: ml_collections.ConfigDict, *, length: int, embed_dim: int = 0
                     ) -> ml_collections.ConfigDict:
  """A 2 x 64 transformer over `length` tokens for the text `:tiny` variants."""
  config.data_shape = (length,)
  tc = config.transformer
  tc.width, tc.depth, tc.num_heads, tc.cond_dim, tc.embed_dim = 64, 2, 4, 16, embed_dim
  return config


def get_config():
  """Returns the base ConfigDict (a tiny digits run; datasets override)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, time/mask draws, dropout and data order.

  # ---------------------------------------------------------------- data ---
  # dataset: a name of md4_jax.data.DATASETS (digits, cifar10, text8, openwebtext, ...).
  # set_dataset copies from its DatasetInfo record (a config may override them after):
  #   vocab_size: V, tokens take values in [0, V); the mask id is V.
  #   data_shape: shape of one example: (L,) text, (H, W, C) images.
  #   classes: number of class labels for conditioning; 0 = unconditional.
  set_dataset(config, "digits")
  config.data_dir = ""  # Where prepared data lives ('' = the dataset's default).
  # Classifier-free guidance: train on the null label (id = classes) with this probability,
  # then sample with `md4_jax.sample --guidance=w`. 0 = off.
  config.label_dropout = 0.0
  config.batch_size = 64  # Global training batch (all devices, all processes).
  config.eval_batch_size = 64  # Global evaluation batch.
  # Split scored by eval ('' = the dataset's held-out split: digits test, text8 validation,
  # cifar10 test, imagenet64 validation, openwebtext/fineweb_edu/synthetic_text validation).
  config.eval_split = ""
  config.random_flip = False  # Horizontal flips (images); off for likelihood runs.
  config.grain_worker_count = 0  # grain worker processes (0 = in the main process).
  config.grain_prefetch = 2  # Batches grain keeps ready ahead of the loop.

  # ------------------------------------------------------------ diffusion ---
  # md4 (one schedule for every token) | genmd4 (a learnable schedule per token
  # value, α_t^v = 1 − (1 − eps)·t^{w_v}; needs cont_time and a polynomial schedule).
  config.model = "md4"
  config.noise_schedule = "cosine"  # linear | cosine | polyK (K > 0, e.g. poly3).
  config.cont_time = True  # True: continuous-time NELBO; False: T-step NELBO.
  config.timesteps = 1000  # T of the discrete-time loss (used if not cont_time).
  config.antithetic_time_sampling = True  # t_b = (u + b/B) mod 1 across the batch.
  # GenMD4 only. Initial exponent of every token (noise_schedule must name the same poly).
  config.power_init = 1.0
  config.genmd4_t1 = 1e-3  # t in [t1, 1]; the reconstruction term is taken at t1.
  config.genmd4_num_masks = 2  # K >= 2 masks per example for the leave-one-out gradient.

  # ------------------------------------------------------------- network ---
  config.network = "unet"  # transformer | unet | uvit
  config.time_features = "t"  # t (sinusoidal embedding of t) | none (ignore t).
  # Time MLP widths for conditioning width E: dit (256 sinusoid features -> E -> E) |
  # md4 (the paper's networks: E features -> 4E -> E).
  config.time_embedding = "dit"
  config.dropout_rate = 0.0  # Dropout probability inside the network.
  config.dtype = "float32"  # Activation dtype: float32 | bfloat16.
  config.param_dtype = "float32"  # Parameter dtype (master copy).
  # Memory/speed knobs (tests/perf_test.py checks each against the plain path).
  # Per-block rematerialisation (jax.checkpoint policy): none | full |
  # dots_saveable | dots_with_no_batch_dims_saveable (keep weight matmuls,
  # recompute attention). On CPU it only saves memory with scan_layers=True.
  config.remat_policy = "none"
  # Transformer blocks as one nn.scan over stacked params (params under
  # network/blocks/block with a leading 'layers' axis instead of block_0..).
  config.scan_layers = False
  # Attention kernel: xla | cudnn (GPU, bf16/fp16) | chunked (XLA, 128 queries
  # at a time, rematerialised) | pallas (JAX's Pallas TPU flash attention: TPU
  # only, no attention-probability dropout) | auto (cudnn on GPU in bf16/fp16,
  # else xla).
  config.attention_impl = "auto"
  # Positions per chunk of the fused head + cross-entropy (0 = plain); the
  # full [B, L, V] logits then never exist. Transformer only (a UNet with a
  # value > 0 is a config error).
  config.loss_chunk_size = 0
  # Head + cross-entropy only at the masked positions (half of them on average
  # under the linear schedule), packed per batch shard into a static buffer
  # (fused_head.masked_capacity); a step with more falls back to the full head,
  # so the loss is exact. Combines with loss_chunk_size. Transformer, MD4 only.
  config.masked_head = False
  # Transformer (sequences).
  config.transformer = ml_collections.ConfigDict()
  config.transformer.width = 64  # Residual stream width (channels).
  config.transformer.depth = 2  # Number of transformer blocks.
  config.transformer.num_heads = 4  # Attention heads (width % num_heads == 0).
  config.transformer.mlp_ratio = 4.0  # Gated MLP hidden = mlp_ratio * width * 2/3 (gelu: x 1).
  # Design (see md4_jax/networks/transformer.py). The values here are the wide_cond design;
  # the paper configs set the MD4 paper's: cond_dim 64, sigmoid, glu (multiple of 32), rope,
  # no head bias, zero-initialised head.
  config.transformer.cond_dim = 0  # Conditioning width read by every adaLN (0 = width).
  config.transformer.cond_act = "swish"  # swish | sigmoid: activation of c before adaLN.
  config.transformer.mlp = "swiglu"  # swiglu | glu (sigmoid-gated) | gelu.
  config.transformer.mlp_multiple_of = 8  # MLP hidden width rounded up to this.
  config.transformer.positions = "learned"  # learned (absolute) | rope (rotary).
  config.transformer.embed_dim = 0  # Token embedding width, projected to width (0 = width).
  config.transformer.head_bias = True  # Bias on the output head.
  config.transformer.zero_init_head = False  # Zero-initialised output head.
  # Round the head's V columns and the embedding's V + 1 rows up to a multiple of this so the
  # vocabulary splits over mesh.tensor (1 = no padding; e.g. 128 for GPT-2's V = 50257).
  # The padding is never predicted. It changes the parameters' shapes: set it at the start.
  config.transformer.vocab_multiple = 1
  # The paper's function, init and dropout (docs/networks.md; the paper configs set the
  # reference implementation's choices, in brackets; these defaults are md4_jax's own).
  # Time sinusoid: dit (10000^(-i/half), [cos | sin]) | md4 (10000^(-i/(half-1)), [sin | cos]).
  config.transformer.sinusoid = "dit"
  # Class labels: add (to the time MLP's output) | concat (to the sinusoid, before the MLP).
  config.transformer.label_cond = "add"
  config.transformer.norm_eps = 1e-6  # LayerNorm epsilon [1e-5].
  # element (on the attention and MLP outputs) | channel (one mask per example and channel
  # shared across positions, plus attention probabilities) | dit (the paper's DiT blocks).
  config.transformer.dropout = "element"
  # md4_jax (embeddings std 0.02, lecun MLP) | md4 (Flax default embeddings, 1/sqrt(width);
  # MLP kernels with variance 2 / (depth * fan_in)).
  config.transformer.param_init = "md4_jax"
  # UNet (images).
  config.unet = ml_collections.ConfigDict()
  config.unet.channels = 32  # Base channel count.
  config.unet.channel_mult = (1, 2)  # Channel multiplier per resolution level.
  config.unet.num_res_blocks = 1  # Residual blocks per level.
  config.unet.attn_resolutions = (4,)  # Spatial sizes (H) with self-attention.
  config.unet.embed_dim = 16  # Embedding width per channel value.
  config.unet.cond_dim = 0  # Conditioning width (0 = 4 * channels; the paper's: channels).
  # How residual blocks read c: scale_shift (after the 2nd GroupNorm, from swish(c)) |
  # shift (the paper's/VDM: + Dense(c) after the first conv, zero-initialised, no bias).
  config.unet.film = "scale_shift"
  config.unet.zero_init_output = False  # Zero-initialised output conv (the paper's: True).
  config.unet.sinusoid = "dit"  # Time sinusoid: dit | md4 (as config.transformer.sinusoid).
  config.unet.label_cond = "add"  # Class labels: add | concat (as config.transformer).
  config.unet.attn_bias = False  # q/k/v/out biases in the attention blocks [True].
  # md4_jax (value embedding std 1, attention outputs zero-initialised) | md4 (Flax default
  # embeddings, 1/sqrt(embed_dim); lecun attention outputs).
  config.unet.param_init = "md4_jax"
  # UViT (images; the paper's ImageNet 64x64 network): residual blocks around a DiT.
  config.uvit = ml_collections.ConfigDict()
  config.uvit.channels = 32  # Channels of the convolutional path.
  config.uvit.num_res_blocks = 1  # Residual blocks before the DiT (one more after it).
  config.uvit.embed_dim = 16  # Embedding width per channel value.
  config.uvit.patch_size = 2  # DiT patch size (tokens = (H / patch)^2).
  config.uvit.width = 64  # DiT width.
  config.uvit.depth = 2  # DiT blocks.
  config.uvit.num_heads = 4  # DiT attention heads.
  config.uvit.mlp_ratio = 4.0  # DiT MLP hidden = mlp_ratio * width (GELU).
  config.uvit.cond_dim = 0  # Conditioning width (0 = channels).
  config.uvit.sinusoid = "dit"  # Time sinusoid: dit | md4 (as config.transformer.sinusoid).
  config.uvit.label_cond = "add"  # Class labels: add | concat (as config.transformer).
  config.uvit.dit_residual = True  # h + DiT(h) (True) | the paper's h = DiT(h) [False].
  config.uvit.dropout = "element"  # DiT blocks: element | dit [the paper's] | channel.
  # md4_jax (value embedding std 1, position table rows first) | md4 (Flax default
  # embeddings, 1/sqrt(embed_dim); the column half of the position table first).
  config.uvit.param_init = "md4_jax"

  # ---------------------------------------------------------- optimiser ---
  config.learning_rate = 1e-3  # Peak learning rate (after warmup).
  config.warmup_steps = 100  # Linear warmup from 0 (steps).
  config.lr_schedule = "cosine"  # cosine (decay to 0 at num_train_steps) | constant.
  config.weight_decay = 0.0  # AdamW decoupled weight decay.
  config.b1 = 0.9  # Adam beta1.
  config.b2 = 0.999  # Adam beta2.
  config.clip_grad_norm = 1.0  # Global-norm clip; <= 0 disables.
  config.ema_rate = 0.999  # EMA decay of parameters (0 = EMA equals params).
  # EMA warm-up: decay min(ema_rate, (1+n)/(10+n)) at step n, so a short run's EMA is not
  # the initialisation. Off in the paper configs (the reference has none); on in :tiny.
  config.ema_warmup = False
  config.grad_accum_steps = 1  # Microbatches per step (batch % this == 0).

  # ---------------------------------------------------------------- loop ---
  config.num_train_steps = 2000  # Total optimisation steps.
  config.log_loss_every_steps = 50  # Train metric logging period (steps).
  config.eval_every_steps = 500  # NELBO on the eval split, raw and EMA params (steps).
  config.checkpoint_every_steps = 500  # Checkpoint period (steps).
  config.max_checkpoints_to_keep = 3  # Older checkpoints are deleted.
  # Write checkpoints in the background (orbax async; the step loop waits only for the copy
  # off the devices): auto (on for a gs:// workdir, off on a local disk) | on | off.
  config.async_checkpointing = "auto"
  # jax.profiler trace of this many steps (0 = none) from profile_start_step, on process 0,
  # into <workdir>/plugins/profile/ (TensorBoard's profile tab, xprof).
  config.profile_steps = 0
  config.profile_start_step = 10  # First traced step (after compilation and warm-up).
  config.sample_every_steps = 1000  # Sample a small batch (0 = only at the end).
  config.num_samples = 16  # Samples drawn each time.
  config.sampling_steps = 100  # Reverse-chain steps for the periodic samples.
  # Time grid of the periodic samples and md4_jax.sample's default: uniform | cosine
  # (sampling.GRIDS; the paper samples on the cosine grid).
  config.sampling_grid = "uniform"
  config.check_nans = True  # Check every step's loss/gradient for NaN/Inf.
  config.nan_policy = "stop"  # stop (exit non-zero, keep last good ckpt) | skip (drop the update).
  config.debug_nan_at_step = -1  # Testing aid: poison the loss at this step (-1 = never).

  # -------------------------------------------------------------- devices ---
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Batch-parallel axis size (-1 = the devices left over).
  config.mesh.fsdp = 1  # Fully-sharded data parallel: batch AND parameters/optimiser split.
  config.mesh.tensor = 1  # Tensor parallel: heads / MLP hidden / vocab split.
  # Multi-slice TPU: data-parallel replicas across this many slices (over the data-centre
  # network); data/fsdp/tensor are then sizes inside one slice. 1 = one slice (or GPU/CPU).
  config.mesh.dcn_data = 1
  # Logical axis name (on params and activations) -> mesh axis, tuple of axes, or None
  # (replicated). A dimension that its mesh axes do not divide stays replicated.
  config.sharding_rules = (
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", "tensor"),
      ("kv", None),
      ("length", None),
      ("cond", None),
      ("norm", None),
      ("layers", None),  # The stacked-blocks axis of scan_layers.
      ("activation_batch", ("data", "fsdp")),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_vocab", "tensor"),
  )
  return config
