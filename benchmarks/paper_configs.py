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
  floor((budget - a) / b). XLA's CPU analysis stands in for the accelerator's.

  .venv/bin/python benchmarks/paper_configs.py
  .venv/bin/python benchmarks/paper_configs.py --configs=text8,cifar10 --batch=4
"""

import math
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train as train_bench  # noqa: E402
from md4_jax.configs import cifar10, imagenet64, openwebtext, text8  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.diffusion import losses  # noqa: E402
from md4_jax.experiment import build  # noqa: E402

GIB = 2**30

CONFIGS = {
    "text8": lambda: text8.get_config(),
    "openwebtext": lambda: openwebtext.get_config(),
    "openwebtext:medium": lambda: openwebtext.get_config("medium"),
    "cifar10": lambda: cifar10.get_config(),
    "imagenet64": lambda: imagenet64.get_config(),
    "imagenet64:best_likelihood": lambda: imagenet64.get_config("best_likelihood"),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", list(CONFIGS), f"Rows, from {list(CONFIGS)}.")
flags.DEFINE_integer("batch", 8, "Per-device batch of the memory column.")
flags.DEFINE_list("budgets_gib", ["80", "141"], "Device memory budgets (GiB).")


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
  return 3.0 * train_bench.matmul_flops(jax.make_jaxpr(fwd)(params)) / math.prod(config.data_shape)


def step_peak_gib(config, batch: int) -> float:
  experiment = _experiment(config, batch)
  x = jax.ShapeDtypeStruct((batch, *config.data_shape), jnp.int32)
  mem = experiment.train_step.lower(experiment.abstract_state, {"x": x}).compile().memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes) / GIB


def main(argv):
  del argv
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
  app.run(main)
