r"""The paper configs at a glance: parameters, FLOPs per token, memory, largest batch.

For every paper config (as shipped: float32, the config's own memory knobs) this
prints, without running a step:

* parameters: jax.eval_shape of the model's init (nothing allocated);
* model GFLOP per token: 3 x the matmul and convolution FLOPs of the forward
  pass (benchmarks/train.py's count from the jaxpr) over the positions of a
  batch (tokens for text, channel values for images);
* GiB at per-device batch `--batch`: compiled.memory_analysis() of the real
  training step (gradients, AdamW, EMA, donated state) on one device, compile
  only (abstract arguments): peak = arguments + outputs - aliased + temporaries;
* the largest per-device batch whose step fits each budget in `--budgets_gib`,
  from a line peak(B) = a + b B through two compiles (B = batch and 2 x batch):
  floor((budget - a) / b). These memory figures are XLA:CPU's, standing in for
  the accelerator's, and they mislead on TPU (MD4-S at batch 512: the TPU
  compiler needs 39 G of temporaries per v5e chip): for a TPU slice use the TPU
  compiler itself, `python -m md4_jax.plan --config=... --slice=v5e-8`.

With `--write_table=PATH` it instead writes the parameter table of every config
variant (tiny smoke variants left out) as markdown, next to the MD4 reference
implementation's count for the same data: docs/paper_params.md is this output,
and tests/paper_configs_test.py checks it is current and pins the counts.

  .venv/bin/python benchmarks/paper_configs.py
  .venv/bin/python benchmarks/paper_configs.py --configs=text8,cifar10 --batch=4
  .venv/bin/python benchmarks/paper_configs.py --write_table=docs/paper_params.md
"""

import importlib
import math
import os
import pkgutil
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

if __name__ == "__main__":  # Run from a clone: md4_jax from the repository root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from md4_jax import configs as configs_pkg  # noqa: E402
from md4_jax.configs import cifar10, imagenet64, openwebtext, text8  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.diffusion import losses  # noqa: E402
from md4_jax.experiment import aot  # noqa: E402
from md4_jax.experiment import build  # noqa: E402

GIB = 2**30

# (config, variant) -> parameter count of the MD4 reference implementation's model for the
# same data shape and vocabulary (its configs: text8, genmd4/text8 (the network and 27
# schedule exponents), openwebtext, cifar10, imagenet64 with n_layers = 8 / 24 and
# n_dit_layers = 20 / 12), counted layer by layer from its code (docs/paper.md shows the sums;
# tests/paper_configs_test.py recomputes the image and text8 ones).
REFERENCE = {
    ("text8", ""): 88_734_272,
    ("text8", "genmd4"): 88_734_299,
    ("openwebtext", ""): 165_857_344,
    ("fineweb_edu", ""): 165_857_344,
    ("cifar10", ""): 28_427_520,
    ("imagenet64", ""): 204_595_712,
    ("imagenet64", "best_likelihood"): 198_279_680,
}

TABLE_HEADER = (
    "# Parameter counts\n\n"
    "<!-- Written by `python benchmarks/paper_configs.py --write_table=docs/paper_params.md`;"
    " do not edit. -->\n"
    "Parameters of every config variant's model (network and schedule parameters; the `tiny`\n"
    "smoke variants left out), and the MD4 reference implementation's count for the same data\n"
    "(its configs; tests/paper_configs_test.py checks they are equal and pins ours).\n\n")

CONFIGS = {
    "text8": lambda: text8.get_config(),
    "openwebtext": lambda: openwebtext.get_config(),
    "openwebtext:medium": lambda: openwebtext.get_config("medium"),
    "cifar10": lambda: cifar10.get_config(),
    "imagenet64": lambda: imagenet64.get_config(),
    "imagenet64:best_likelihood": lambda: imagenet64.get_config("best_likelihood"),
}

FLAGS = flags.FLAGS


def _define_flags():
  """The script's flags (defined only when run, so tests can import the table functions)."""
  flags.DEFINE_list("configs", list(CONFIGS), f"Rows, from {list(CONFIGS)}.")
  flags.DEFINE_integer("batch", 8, "Per-device batch of the memory column.")
  flags.DEFINE_list("budgets_gib", ["80", "141"], "Device memory budgets (GiB).")
  flags.DEFINE_string("write_table", None, "Write the parameter table (markdown) to this path "
                      "and exit ('-': print it).")


def config_variants():
  """Yields (name, variant, config) for every config module's non-tiny variants."""
  for info in sorted(pkgutil.iter_modules(configs_pkg.__path__), key=lambda m: m.name):
    module = importlib.import_module(f"md4_jax.configs.{info.name}")
    if not hasattr(module, "VARIANTS"):  # base.py: shared fields, not a runnable config.
      continue
    for variant in module.VARIANTS:
      if "tiny" not in variant:  # Smoke-run sizes.
        yield info.name, variant, module.get_config(variant)


def num_params(config) -> int:
  """Parameters of the config's model (network + schedule parameters), without compiling."""
  model = build.build_model(config)
  x = jnp.zeros((1, *config.data_shape), jnp.int32)
  cond = jnp.zeros((1,), jnp.int32) if config.classes else None
  shapes = jax.eval_shape(
      lambda r: model.init({"params": r, "sample": r, "dropout": r}, x, cond), jax.random.key(0))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def parameter_counts() -> dict[tuple[str, str], int]:
  """(config, variant) -> parameter count, for every row of the parameter table."""
  return {(name, variant): num_params(config) for name, variant, config in config_variants()}


def parameter_table(counts: dict[tuple[str, str], int]) -> str:
  """The markdown parameter table of `counts` (keys in `config_variants` order)."""
  lines = ["| config | network | parameters | MD4 reference |", "|---|---|---|---|"]
  for name, variant, config in config_variants():
    ref = REFERENCE.get((name, variant))
    label = f"`{name}.py{':' + variant if variant else ''}`"
    ref_cell = "—" if ref is None else f"{ref / 1e6:.1f}M"
    lines.append(f"| {label} | {config.network} | {counts[name, variant] / 1e6:.2f}M "
                 f"| {ref_cell} |")
  return TABLE_HEADER + "\n".join(lines) + "\n"


def _experiment(config, batch: int) -> build.Experiment:
  config.batch_size = batch
  return build.setup(config, parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))


def flops_per_position(config, experiment: build.Experiment) -> float:
  """3 x forward matmul/conv FLOPs per position of `experiment` (built at batch 1; jaxpr only)."""
  model = experiment.model
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        experiment.abstract_state.params)
  x = jnp.zeros((1, *config.data_shape), jnp.int32)
  noise = jnp.full(losses.noise_shape(x.shape, model.masks_per_example), 0.5)
  fwd = lambda p: model.apply({"params": p}, x, None, train=True, t=jnp.full((1,), 0.5),
                              noise=noise, rngs={"dropout": jax.random.key(0)})["loss"]
  return 3.0 * aot.matmul_flops(jax.make_jaxpr(fwd)(params)) / math.prod(config.data_shape)


def step_peak_gib(config, batch: int) -> float:
  experiment = _experiment(config, batch)
  x = jax.ShapeDtypeStruct((batch, *config.data_shape), jnp.int32)
  mem = experiment.train_step.lower(experiment.abstract_state, {"x": x}).compile().memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes) / GIB


def main(argv):
  del argv
  if FLAGS.write_table:
    table = parameter_table(parameter_counts())
    if FLAGS.write_table == "-":
      print(table, end="")
    else:
      with open(FLAGS.write_table, "w") as f:
        f.write(table)
      print(f"Wrote {FLAGS.write_table}")
    return
  budgets = [float(b) for b in FLAGS.budgets_gib]
  b1, b2 = FLAGS.batch, 2 * FLAGS.batch
  print(f"jax {jax.__version__}; memory from XLA's {jax.devices()[0].platform} analysis of the "
        f"training step (one device, compile only); largest batch from a line through batches "
        f"{b1} and {b2}.\n")
  print("| config | network | params | model GFLOP / position | GiB at batch "
        f"{b1} | GiB at batch {b2} | " + " | ".join(f"largest batch in {b:g} GiB" for b in budgets)
        + " | compile s |")
  print("|---|---|---|---|---|---|" + "---|" * len(budgets) + "---|")
  for name in FLAGS.configs:
    start = time.time()
    config = CONFIGS[name]()
    experiment = _experiment(config, 1)  # Parameters and FLOPs: no step compiled.
    gflop = flops_per_position(config, experiment) / 1e9
    p1, p2 = step_peak_gib(CONFIGS[name](), b1), step_peak_gib(CONFIGS[name](), b2)
    slope, intercept = (p2 - p1) / (b2 - b1), p1 - (p2 - p1) / (b2 - b1) * b1
    fits = [max(0, int((b - intercept) // slope)) for b in budgets]
    print(f"| `{name}` | {config.network} | {experiment.num_params / 1e6:.1f}M | {gflop:.2f} "
          f"| {p1:.2f} | {p2:.2f} | " + " | ".join(str(f) for f in fits)
          + f" | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
