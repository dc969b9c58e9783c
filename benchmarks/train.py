r"""Training-step throughput and model-FLOPs utilisation on the local devices.

Times md4_jax's real training step (md4_jax.experiment.build.setup: init_state /
train_step: gradients, AdamW, EMA, donated state, one jit over a mesh
of the local devices) for a text config (transformer) and an image config
(UNet) sized for a small CPU host, and compares the achieved model FLOP/s
with the matmul FLOP/s the same devices reach in the same run.

* model FLOPs per step = 3 x the matmul and convolution FLOPs of the
  forward pass (the backward pass costs about twice the forward), counted
  exactly from the forward's jaxpr (dot_general and conv_general_dilated,
  scan bodies times their length, the cheaper branch of a lax.cond: the
  masked head's packed path, taken unless a batch overflows its buffer). Rematerialised recomputation is not
  counted: this is model FLOPs, not hardware FLOPs.
* XLA's cost_analysis() FLOPs of the compiled training step are printed
  alongside (they include elementwise work and count a loop body once).
* the ceiling is a large square jnp.dot in the model's activation dtype
  (`--dot_size`), timed right before every timing window, so a shared,
  noisy host slows both alike; the utilisation is the median over windows
  of (model FLOP/s in the window) / (dot FLOP/s measured just before it).
* each window runs `--steps` steps back to back and blocks once at the end
  (as the training loop, which fetches metrics a step late); after
  `--warmup` steps (the first compiles). Medians over `--repeats` windows.
  With several devices the ceiling is one device's dot times the device count.
* MFU: model FLOP/s over the devices' datasheet peak (dense bf16, looked up
  from device_kind for bf16 variants on known GPUs/TPUs, or `--peak_tflops`
  per device for every row); "-" where neither applies (e.g. on CPU).
* memory: compiled.memory_analysis() of the step (args + out - aliased +
  temp) and, where the backend reports it, the device's peak_bytes_in_use.

Variants are the config plus overrides (see VARIANTS), e.g. the memory knobs.
The default rows are the issue's shapes at the paper architectures and at
md4_jax's wide_cond design: `text_paper` / `text_wide` (text8's transformer,
4 x 768, 12 heads, L = 256, batch 16) and `unet_paper` / `unet_wide` (the
CIFAR-10 UNet, 128 channels, 4 + 5 residual blocks, batch 8);
`md4s_remat_f32` / `md4s_remat_f32_masked` measure the masked-only head at
MD4-S (16 sequences of 1024, every block rematerialised so it fits a CPU host);
`md4s` is MD4-S (configs/openwebtext.py: 12 x 768, L = 1024, V = 50257) in
bf16 with attention_impl=auto (cuDNN flash attention on GPU), for
accelerators. `--batch_per_device` sets the global batch to that times the
device count (default: the variant's own batch; md4s: 16 per device).

  .venv/bin/python benchmarks/train.py
  .venv/bin/python benchmarks/train.py --variants=md4s_remat_f32,md4s_remat_f32_masked \
      --batch_per_device=16 --warmup=1 --repeats=2 --steps=1
  .venv/bin/python benchmarks/train.py --variants=text,text_chunked --repeats=3
  .venv/bin/python benchmarks/train.py --variants=text,text_genmd4,image,image_genmd4
  python benchmarks/train.py --variants=md4s,md4s_remat --batch_per_device=32   # accelerator
"""

import math
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from md4_jax.configs import base as configs_base  # noqa: E402
from md4_jax.configs import cifar10  # noqa: E402
from md4_jax.configs import openwebtext  # noqa: E402
from md4_jax.configs import text8  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.diffusion import losses  # noqa: E402
from md4_jax.experiment import aot  # noqa: E402
from md4_jax.experiment import build  # noqa: E402


def text_config():
  """text8 (V = 27) with a transformer where matmuls dominate on a CPU.

  Width 512, 4 blocks, 8 heads, L = 256, batch 16: 4,096 tokens per step.
  """
  config = configs_base.wide_cond_transformer(text8.get_config())  # As first measured.
  config.transformer.width = 512
  config.transformer.depth = 4
  config.transformer.num_heads = 8
  config.data_shape = (256,)
  config.batch_size = 16
  config.dropout_rate = 0.0
  return config


def image_config():
  """CIFAR-10 (32x32x3, V = 256) with a small UNet.

  64 channels, levels (1, 2), 2 residual blocks per level, attention at 16x16
  and in the middle, batch 8: 24,576 channel values per step.
  """
  config = configs_base.wide_cond_unet(cifar10.get_config("tiny"))  # As first measured.
  config.unet.channels = 64
  config.unet.channel_mult = (1, 2)
  config.unet.num_res_blocks = 2
  config.unet.attn_resolutions = (16,)
  config.unet.embed_dim = 16
  config.batch_size = 8
  config.dropout_rate = 0.0
  return config


def text_paper_config():
  """The issue's text shape at the paper's architecture: text8's network (RoPE, sigmoid GLU,
  64-wide conditioning) with 4 blocks of width 768, 12 heads, L = 256, batch 16."""
  config = text8.get_config()
  config.transformer.depth = 4
  config.batch_size = 16
  config.dropout_rate = 0.0
  return config


def text_wide_config():
  """text_paper_config with md4_jax's wide_cond design (768-wide adaLN, SwiGLU)."""
  return configs_base.wide_cond_transformer(text_paper_config())


def unet_paper_config():
  """The issue's UNet shape at the paper's architecture: the CIFAR-10 UNet (128 channels,
  one level, shift conditioning) with 4 residual blocks down and 5 up, batch 8."""
  config = cifar10.get_config()
  config.unet.num_res_blocks = 4
  config.batch_size = 8
  config.dropout_rate = 0.0
  return config


def unet_wide_config():
  """unet_paper_config with md4_jax's wide_cond conditioning (scale + shift from 512 wide)."""
  return configs_base.wide_cond_unet(unet_paper_config())


def md4s_config():
  """MD4-S as shipped (configs/openwebtext.py), 16 sequences per device."""
  config = openwebtext.get_config()
  config.batch_size = 16 * jax.device_count()
  return config


# Dense bf16 datasheet peak per chip, TFLOP/s: (device_kind substring, peak).
# Checked in order; the first match wins.
DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L4", 121.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def datasheet_peak_flops(device_kind: str, dtype: str) -> float:
  """Per-device peak FLOP/s: --peak_tflops, else the bf16 datasheet table; nan if unknown."""
  if FLAGS.peak_tflops > 0:
    return FLAGS.peak_tflops * 1e12
  if dtype != "bfloat16":
    return float("nan")
  for key, tflops in DATASHEET_BF16_TFLOPS:
    if key in device_kind:
      return tflops * 1e12
  return float("nan")


# name -> (base config builder, overrides)
VARIANTS = {
    "text": (text_config, {}),
    "text_chunked": (text_config, dict(loss_chunk_size=128, attention_impl="chunked")),
    "text_scan_remat": (text_config, dict(scan_layers=True, remat_policy="full")),
    "text_bf16": (text_config, dict(dtype="bfloat16")),
    "image": (image_config, {}),
    # The paper architectures at the shapes (and md4_jax's wide_cond design).
    "text_paper": (text_paper_config, {}),
    "text_wide": (text_wide_config, {}),
    "unet_paper": (unet_paper_config, {}),
    "unet_wide": (unet_wide_config, {}),
    # GenMD4 (K = 2 masks per example: the network runs on 2x the batch).
    "text_genmd4": (text_config, dict(model="genmd4", noise_schedule="linear")),
    "image_genmd4": (image_config, dict(model="genmd4", noise_schedule="linear")),
    "md4s": (md4s_config, dict(dtype="bfloat16", attention_impl="auto")),
    # The head and cross-entropy at masked positions only (packed, exact).
    "md4s_masked": (md4s_config, dict(dtype="bfloat16", attention_impl="auto", masked_head=True)),
    # MD4-S in float32 with every block rematerialised: per-device batch 16 fits a 23 GiB
    # CPU host (the masked head's capacity, 0.546 of the positions, assumes 16 per group).
    "md4s_remat_f32": (md4s_config, dict(scan_layers=True, remat_policy="full")),
    "md4s_remat_f32_masked": (md4s_config, dict(scan_layers=True, remat_policy="full",
                                                masked_head=True)),
    "md4s_remat": (md4s_config, dict(dtype="bfloat16", attention_impl="auto", scan_layers=True,
                                     remat_policy="dots_with_no_batch_dims_saveable")),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["text_paper", "text_wide", "unet_paper", "unet_wide"],
                  f"Rows, from {list(VARIANTS)}.")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first one compiles).")
flags.DEFINE_integer("steps", 3, "Steps per timing window.")
flags.DEFINE_integer("repeats", 5, "Timing windows; medians are over these.")
flags.DEFINE_integer("dot_size", 2048, "N of the N x N x N matmul ceiling.")
flags.DEFINE_integer("batch_per_device", 0,
                     "Global batch = this x the device count (0: the variant's batch).")
flags.DEFINE_float("peak_tflops", 0.0,
                   "Per-device peak TFLOP/s for MFU (0: datasheet bf16 table, bf16 rows only).")


def dot_ceiling(n: int, dtype) -> float:
  """FLOP/s of one n x n @ n x n matmul (best of 3, after a warm call)."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best


def run_variant(name: str) -> dict:
  builder, overrides = VARIANTS[name]
  config = builder()
  for k, v in overrides.items():
    config[k] = v
  if FLAGS.batch_per_device > 0:
    config.batch_size = FLAGS.batch_per_device * jax.device_count()
  experiment = build.setup(config, parallel.make_mesh({"data": -1}))
  mesh, model = experiment.mesh, experiment.model
  num_devices = mesh.devices.size
  state = experiment.init_state()
  step = experiment.train_step
  rng = np.random.default_rng(0)
  batch_np = {"x": rng.integers(0, config.vocab_size, (config.batch_size, *config.data_shape),
                                dtype=np.int32)}
  batch = parallel.to_global(batch_np, mesh)

  # Model FLOPs: 3 x the forward's matmul/conv FLOPs.
  x = batch["x"]
  t = jnp.full((x.shape[0],), 0.5)
  masks = model.masks_per_example  # GenMD4: K masked copies per example.
  noise = jnp.full(losses.noise_shape(x.shape, masks), 0.5)
  fwd = lambda p: model.apply({"params": p}, x, None, train=True, t=t, noise=noise,
                              rngs={"dropout": jax.random.key(0)})["loss"]
  fwd_flops = aot.matmul_flops(jax.make_jaxpr(fwd)(state.params))
  model_flops = 3.0 * fwd_flops

  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  mem = compiled.memory_analysis()
  peak_analysis = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes + mem.temp_size_in_bytes)

  for _ in range(FLAGS.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  loss0 = float(metrics["loss"])

  dtype = jnp.dtype(config.dtype)
  step_s, ratios, ceilings = [], [], []
  for _ in range(FLAGS.repeats):
    ceiling = dot_ceiling(FLAGS.dot_size, dtype)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / FLAGS.steps
    step_s.append(seconds)
    ceilings.append(ceiling)
    ratios.append(model_flops / seconds / (ceiling * num_devices))
  stats = jax.devices()[0].memory_stats() or {}
  sec = statistics.median(step_s)
  positions = config.batch_size * math.prod(config.data_shape)
  peak = datasheet_peak_flops(jax.devices()[0].device_kind, config.dtype) * num_devices
  return dict(
      name=name, network=config.network, dtype=config.dtype, batch=config.batch_size,
      shape="x".join(map(str, config.data_shape)), vocab=config.vocab_size,
      params=sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
      steps_per_s=1.0 / sec, positions_per_s=positions / sec,
      model_gflop=model_flops / 1e9, xla_gflop=xla_flops / 1e9,
      model_gflops=model_flops / sec / 1e9, ceiling_gflops=statistics.median(ceilings) / 1e9,
      ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
      mfu=model_flops / sec / peak, devices=num_devices,
      peak_analysis_gib=peak_analysis / 2**30,
      peak_device_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
      loss=loss0, overrides=overrides,
  )


def main(argv):
  del argv
  devices = jax.devices()
  print(f"jax {jax.__version__}; {len(devices)} x {devices[0].device_kind} "
        f"({devices[0].platform}); {os.cpu_count()} CPU cores; warmup {FLAGS.warmup}, "
        f"{FLAGS.repeats} windows x {FLAGS.steps} steps; ceiling {FLAGS.dot_size}^3 jnp.dot.\n")
  print("| variant | network | overrides | params | batch x shape | steps/s | tokens/s "
        "| model GFLOP/step | XLA GFLOP/step | model GFLOP/s | dot GFLOP/s | model/dot "
        "(min-max) | MFU (datasheet) | peak GiB (analysis) | peak GiB (device) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  rows = {}
  for name in FLAGS.variants:
    r = rows[name] = run_variant(name)
    ov = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
    print(f"| {r['name']} | {r['network']} {r['dtype']} | {ov} | {r['params'] / 1e6:.1f}M "
          f"| {r['batch']} x {r['shape']} (V={r['vocab']}) | {r['steps_per_s']:.3f} "
          f"| {r['positions_per_s']:,.0f} | {r['model_gflop']:.1f} | {r['xla_gflop']:.1f} "
          f"| {r['model_gflops']:.1f} | {r['ceiling_gflops']:.1f} | **{r['ratio']:.2f}** "
          f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
          f"| {'-' if math.isnan(r['mfu']) else format(r['mfu'], '.1%')} "
          f"| {r['peak_analysis_gib']:.2f} "
          f"| {r['peak_device_gib']:.2f} |", flush=True)
  for name, r in rows.items():
    base = name.removesuffix("_genmd4")
    if name.endswith("_genmd4") and base in rows:
      print(f"\n{name}: step time {rows[base]['steps_per_s'] / r['steps_per_s']:.2f}x {base}'s "
            f"(model FLOPs {r['model_gflop'] / rows[base]['model_gflop']:.2f}x).", flush=True)


if __name__ == "__main__":
  app.run(main)
