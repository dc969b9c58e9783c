r"""Sampling speed and NFE of every sampler; optionally the exact-vs-float32 check.

  python benchmarks/sample.py                      # a few minutes on a 2-core CPU
  python benchmarks/sample.py --only=digits,text256 --repeats=5
  python benchmarks/sample.py --exactness          # rare-token frequencies (~5 min)

Networks are randomly initialised (timing does not depend on the weights; the
NFE of the skipping samplers depends only on the schedule, the grid and the
number of masked positions, not on the network):
  digits    configs/digits.py UNet (8x8x1, V=17), cosine schedule.
  text256   configs/text8.py:tiny transformer (width 64, depth 2) at L=256, V=27.
  text256x1024  the L=256 transformer with 1024 steps (steps ≫ L), with and
            without idle-step skipping.
  text1024  the same transformer at L=1024: 1024-step ancestral with and without
            idle-step skipping, and first hitting (--long_repeats runs).
  text1024long  L=1024 with 2048 and 4096 steps, skipping idle steps.
Each row: one warm-up compile (reported), then the median wall time over
--repeats runs with different seeds, for a whole batch.
"""

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.configs import digits
from md4_jax.configs import text8
from md4_jax.experiment import parallel
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import sampling
from md4_jax.diffusion import schedules
from md4_jax.experiment import build


def _experiment_and_variables(config, mesh):
  experiment = build.setup(config, mesh)
  return experiment, {"params": experiment.init_state().params}


def _time(experiment, variables, batch, repeats, **kwargs):
  """(compile seconds, median seconds per batch, NFE) of one sampler setting."""
  fn = experiment.sampler(**kwargs)
  z = sampling.all_masked(experiment.model, batch)
  start = time.time()
  compiled = fn.jitted.lower(variables, jax.random.key(0), z, None).compile()
  compile_s = time.time() - start
  times, nfe = [], None
  for seed in range(repeats):
    start = time.time()
    _, stats = jax.block_until_ready(compiled(variables, jax.random.key(seed + 1), z, None))
    times.append(time.time() - start)
    nfe = int(stats["nfe"])
  return compile_s, statistics.median(times), nfe


ROWS = {
    # name: (sampler, its own and the shared options: sampling.configure's keywords)
    "ancestral (every step)": ("ancestral", dict(cache=False)),
    "ancestral (skip idle)": ("ancestral", dict()),
    "ancestral (float32 ref.)": ("ancestral", dict(exact=False)),
    "topp 0.9": ("topp", dict(top_p=0.9)),
    "mean": ("mean", dict()),
    "first_hitting": ("first_hitting", dict()),
}


def benchmark_speed(args):
  mesh = parallel.make_mesh({"data": -1})
  setups = []
  if "digits" in args.only:
    setups.append(("digits 8x8x1 UNet", digits.get_config(), args.digits_batch,
                   args.digits_steps, list(ROWS)))
  if "text256" in args.only:
    config = text8.get_config("tiny")
    config.data_shape = (256,)
    setups.append(("text L=256 transformer", config, args.text_batch, args.text_steps, list(ROWS)))
  if "text256x1024" in args.only:
    config = text8.get_config("tiny")
    config.data_shape = (256,)
    setups.append(("text L=256 transformer", config, args.text_batch, 1024,
                   ["ancestral (every step)", "ancestral (skip idle)"]))
  if "text1024" in args.only:
    config = text8.get_config("tiny")
    config.data_shape = (1024,)
    setups.append(("text L=1024 transformer", config, args.long_batch, 1024,
                   ["ancestral (every step)", "ancestral (skip idle)", "first_hitting"]))
  if "text1024long" in args.only:  # steps > L: where skipping idle steps pays most.
    config = text8.get_config("tiny")
    config.data_shape = (1024,)
    for steps in (2048, 4096):
      setups.append(("text L=1024 transformer", config, args.long_batch, steps,
                     ["ancestral (skip idle)"]))
  print(f"JAX {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"median of {args.repeats} runs after a warm-up compile.\n")
  print("| setup | sampler | steps | batch | NFE / sample | steps / NFE | compile s | s / batch | "
        "samples / s | ms / sample |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for title, config, batch, steps, rows in setups:
    experiment, variables = _experiment_and_variables(config, mesh)
    for row in rows:
      sampler, options = sampling.configure(ROWS[row][0], **ROWS[row][1])
      repeats = args.repeats if "1024" not in title else args.long_repeats
      compile_s, seconds, nfe = _time(
          experiment, variables, batch, repeats, steps=steps if sampler.on_grid else None,
          sampler=sampler, grid="uniform", options=options)
      shown_steps = steps if sampler.on_grid else "-"
      ratio = f"{steps / nfe:.2f}" if sampler.on_grid else "-"
      print(f"| {title} | {row} | {shown_steps} | {batch} | {nfe} | {ratio} | {compile_s:.1f} | "
            f"{seconds:.3g} | {batch / seconds:.3g} | {1000 * seconds / batch:.4g} |", flush=True)


def benchmark_exactness(args):
  """Frequency of rare tokens after a 1000-step linear ancestral chain, exact vs float32."""
  p_rare = np.array([1e-3, 1e-4, 1e-5])
  probs = np.concatenate([[1.0 - p_rare.sum()], p_rare])
  length, batch, steps = 4, args.exact_positions // 4, 1000

  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class FixedLogits(nn.Module):
    @nn.compact
    def __call__(self, z, t, cond=None, train=False):
      logits = self.param("logits", nn.initializers.zeros, (length, len(probs)))
      return jnp.broadcast_to(logits, z.shape + (len(probs),))

  model = model_lib.MD4(FixedLogits(), schedules.get_schedule("linear"), len(probs), (length,))
  variables = {"params": {"network": {"logits": jnp.log(jnp.tile(jnp.asarray(probs), (length, 1)))}}}
  draws = batch * length
  print(f"\n{draws:.2e} positions, {steps} linear ancestral steps, one fixed distribution.\n")
  print("| path | " + " | ".join(f"p = {p:g}" for p in p_rare) + " | seconds |")
  print("|---|" + "---|" * (len(p_rare) + 1))
  for name, options in (("exact (default)", sampling.SamplerOptions()),
                        ("float32 reference (exact=False)", sampling.SamplerOptions(exact=False))):
    fn = jax.jit(lambda v, r, o=options: sampling.sample(model, v, r, batch_size=batch, steps=steps,
                                                         options=o)[0])
    start = time.time()
    tokens = np.asarray(fn(variables, jax.random.key(args.exact_seed)))
    seconds = time.time() - start
    counts = np.bincount(tokens.ravel(), minlength=len(probs))[1:]
    cells = [f"{c / draws:.2e} ({c}, exp. {p * draws:.0f} ± {math.sqrt(p * draws):.0f})"
             for c, p in zip(counts, p_rare)]
    print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="digits,text256,text256x1024,text1024,text1024long")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--long_repeats", type=int, default=1)
  parser.add_argument("--digits_batch", type=int, default=16)
  parser.add_argument("--digits_steps", type=int, default=64)
  parser.add_argument("--text_batch", type=int, default=4)
  parser.add_argument("--text_steps", type=int, default=256)
  parser.add_argument("--long_batch", type=int, default=2)
  parser.add_argument("--exactness", action="store_true", help="Only the rare-token check.")
  parser.add_argument("--exact_positions", type=int, default=4_000_000)
  parser.add_argument("--exact_seed", type=int, default=0)
  args = parser.parse_args()
  args.only = args.only.split(",")
  jax.config.update("jax_threefry_partitionable", True)
  if args.exactness:
    benchmark_exactness(args)
  else:
    benchmark_speed(args)


if __name__ == "__main__":
  main()
