r"""XLA's memory analysis of MD4-S (configs/openwebtext.py) at paper scale.

Compile only: parameters, optimiser state and batches are abstract
(jax.ShapeDtypeStruct), so nothing of the 12-layer, width-768, L = 1024,
V = 50257 model is ever materialised. For each row (the shipped config plus
memory knobs off and on, and a naive baseline) it compiles

  * the loss-and-gradient step: jit(value_and_grad(batch-mean NELBO)) of the
    params, as in the training step (times and masks given), and
  * the real training step (md4_jax.experiment.build.setup(...).train_step: gradients,
    AdamW, EMA, donated state), whose arguments include the EMA and the two
    Adam moments,

at per-device batch `--batch` and prints `compiled.memory_analysis()`:
arguments, outputs, aliased (donated) bytes and temporaries, in GiB.

"naive" is a clearly separate baseline defined here, not md4_jax's loss: the
same network with XLA's plain attention and a cross-entropy through a one-hot
[B, L, V] tensor (-sum(one_hot(x) * log_softmax(logits))), all float32.

With `--search`, for the rows in `--search_rows` it finds the largest
per-device batch whose training step fits each budget in `--budgets_gib`
(peak = arguments + outputs - aliased + temporaries): two compiles fit a line
peak(B) = a + b B, then the prediction is bracketed and bisected over
multiples of `--search_step` (to within 2% of the batch) by compiling
(about 3-4 compiles per budget). `--max_compiles` caps the compiles per row.

  .venv/bin/python benchmarks/memory.py                  # table at batch 8
  .venv/bin/python benchmarks/memory.py --search         # + batch that fits
  .venv/bin/python benchmarks/memory.py --rows=naive,shipped --batch=16
"""

import dataclasses
import math
import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from md4_jax.configs import openwebtext  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.diffusion import model as model_lib  # noqa: E402
from md4_jax.experiment import build  # noqa: E402

GIB = 2**30

# name -> (description, config overrides on configs/openwebtext.py, which ships with
# scan_layers, remat_policy=full, masked_head, loss_chunk_size=128, attention_impl=chunked).
_PLAIN = dict(loss_chunk_size=0, attention_impl="xla", scan_layers=False, remat_policy="none",
              masked_head=False)
_CHUNKED = dict(_PLAIN, loss_chunk_size=128, attention_impl="chunked")
ROWS = {
    "naive": ("naive baseline: one-hot CE, XLA attention, f32", _PLAIN),
    "plain": ("md4_jax, knobs off: loss_chunk_size=0, attention_impl=xla", _PLAIN),
    "chunked_ce": ("plain + loss_chunk_size=128", dict(_PLAIN, loss_chunk_size=128)),
    "chunked_attn": ("plain + attention_impl=chunked", dict(_PLAIN, attention_impl="chunked")),
    # openwebtext.py as shipped until 2026-12-05 (the 'shipped' row of RESULTS.md before then).
    "chunked": ("loss_chunk_size=128, attention_impl=chunked", _CHUNKED),
    "remat_dots": (
        "chunked + scan_layers, remat dots_with_no_batch_dims_saveable",
        dict(_CHUNKED, scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"),
    ),
    "remat_full": (
        "chunked + scan_layers, remat full",
        dict(_CHUNKED, scan_layers=True, remat_policy="full"),
    ),
    "remat_full_bf16": (
        "chunked + scan_layers, remat full, bf16 activations",
        dict(_CHUNKED, scan_layers=True, remat_policy="full", dtype="bfloat16"),
    ),
    "shipped": ("openwebtext.py as shipped (chunked + scan_layers, remat full, masked_head)", {}),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", list(ROWS), f"Rows of the table, from {list(ROWS)}.")
flags.DEFINE_integer("batch", 8, "Per-device batch of the table.")
flags.DEFINE_bool("search", False, "Find the largest batch that fits each budget.")
flags.DEFINE_list("search_rows", ["naive", "shipped", "remat_full"],
                  "Rows to search.")
flags.DEFINE_list("budgets_gib", ["80", "141"], "Device memory budgets (GiB).")
flags.DEFINE_integer("search_step", 8, "Batch resolution of the search.")
flags.DEFINE_integer("max_compiles", 10, "Compiles per searched row at most.")


def one_hot_nll(logits, x):
  """−log softmax(logits)[x] through a one-hot [B, ..., V] tensor."""
  one_hot = jax.nn.one_hot(x, logits.shape[-1], dtype=jnp.float32)
  return -jnp.sum(one_hot * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


class NaiveMD4(model_lib.MD4):
  """Baseline only: cross-entropy through a one-hot [B, ..., V] tensor."""

  def head_strategy(self):
    return dataclasses.replace(super().head_strategy(), nll=one_hot_nll)


def _config(row: str):
  config = openwebtext.get_config()
  for k, v in ROWS[row][1].items():
    config[k] = v
  return config


def _experiment(config, row: str, mesh=None) -> build.Experiment:
  """build.setup of the row's config; the naive row swaps in NaiveMD4."""
  experiment = build.setup(config, mesh or parallel.make_mesh({"data": 1},
                                                             devices=jax.devices()[:1]))
  if row == "naive":
    model = experiment.model
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
              if f.name not in ("parent", "name")}
    experiment = dataclasses.replace(experiment, model=NaiveMD4(**fields))
  return experiment


def _analysis(compiled) -> dict:
  m = compiled.memory_analysis()
  out = dict(args=m.argument_size_in_bytes, out=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes)
  out["peak"] = out["args"] + out["out"] - out["alias"] + out["temp"]
  return out


def grad_step_memory(row: str, batch: int) -> dict:
  """Memory analysis of jit(value_and_grad(loss)) at `batch`."""
  config = _config(row)
  experiment = _experiment(config, row)
  model = experiment.model
  length = math.prod(config.data_shape)
  x = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  noise = jax.ShapeDtypeStruct((batch, length), jnp.float32)
  boxed = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, length), jnp.int32),
      t=jnp.zeros((1,)), noise=jnp.zeros((1, length))))
  params = nn.meta.unbox(boxed)["params"]

  def loss(p, x, t, noise):
    return model.apply({"params": p}, x, None, train=True, t=t, noise=noise,
                       rngs={"dropout": jax.random.key(0)})["loss"]

  return _analysis(experiment.jit(jax.value_and_grad(loss)).lower(params, x, t, noise).compile())


def train_step_memory(row: str, batch: int) -> dict:
  """Memory analysis of the real, donated training step at `batch`."""
  config = _config(row)
  config.batch_size = batch
  experiment = _experiment(config, row)
  length = math.prod(config.data_shape)
  batch_spec = {"x": jax.ShapeDtypeStruct((batch, length), jnp.int32,
                                          sharding=parallel.batch_sharding(experiment.mesh))}
  return _analysis(experiment.train_step.lower(experiment.abstract_state, batch_spec).compile())


def search(row: str, budgets: list[float], step: int, max_compiles: int, known: dict) -> dict:
  """Per budget: (largest batch that fits, smallest that does not) by compiling.

  Batches are multiples of `step`; the bracket is narrowed to `step` or to
  2% of the batch, whichever is larger. `known` maps batch -> peak bytes.
  """
  compiles = 0

  def fits(b, cap):
    nonlocal compiles
    if b not in known:
      compiles += 1
      known[b] = train_step_memory(row, b)["peak"]
    return known[b] <= cap

  rnd = lambda b: max(step, int(b) // step * step)
  b0, b1 = step, 8 * step
  fits(b0, 0.0)
  fits(b1, 0.0)
  slope = (known[b1] - known[b0]) / (b1 - b0)
  results = {}
  for budget in sorted(budgets):
    cap = budget * GIB
    lo = max([b for b, p in known.items() if p <= cap], default=0)
    hi = min([b for b, p in known.items() if p > cap], default=None)
    guess = rnd(b0 + (cap - known[b0]) / slope) if slope > 0 else lo + step
    resolution = max(step, rnd(0.02 * guess))
    delta = resolution
    while compiles < max_compiles and (hi is None or hi - lo > resolution):
      if hi is None:
        b = guess if guess > lo else lo + delta
        delta *= 2
      elif lo < guess < hi:
        b = guess
      else:
        b = rnd((lo + hi) // 2)
        b = b if lo < b < hi else lo + step
      guess = 0  # The linear prediction is used once.
      if fits(b, cap):
        lo = b
      else:
        hi = b
    results[budget] = (lo, hi, known.get(lo, 0.0) / GIB)
  return results


def main(argv):
  del argv
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU cores; configs/openwebtext.py: "
        f"{openwebtext.get_config().transformer.depth} layers, width "
        f"{openwebtext.get_config().transformer.width}, L=1024, V=50257.\n")
  g = lambda v: f"{v / GIB:.2f}"
  print(f"Per-device batch {FLAGS.batch}; GiB from compiled.memory_analysis().\n")
  print("| row | settings | grad step: args | out | temp | train step: args | out | aliased "
        "| temp | peak | compile s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  train_at = {}
  for row in FLAGS.rows:
    start = time.time()
    gm = grad_step_memory(row, FLAGS.batch)
    tm = train_step_memory(row, FLAGS.batch)
    train_at[row] = {FLAGS.batch: tm["peak"]}
    print(f"| {row} | {ROWS[row][0]} | {g(gm['args'])} | {g(gm['out'])} | **{g(gm['temp'])}** "
          f"| {g(tm['args'])} | {g(tm['out'])} | {g(tm['alias'])} | {g(tm['temp'])} "
          f"| {g(tm['peak'])} | {time.time() - start:.0f} |", flush=True)
  if not FLAGS.search:
    return
  budgets = [float(b) for b in FLAGS.budgets_gib]
  print("\nLargest per-device batch (multiple of "
        f"{FLAGS.search_step}) whose training step fits (peak = args + out - aliased + temp), "
        "and the smallest tried that does not:\n")
  print("| row | " + " | ".join(f"fits {b:g} GiB (its peak GiB)" for b in budgets)
        + " | compiles | search s |")
  print("|---|" + "---|" * (len(budgets) + 2))
  for row in FLAGS.search_rows:
    start = time.time()
    known = dict(train_at.get(row, {}))
    n0 = len(known)
    res = search(row, budgets, FLAGS.search_step, FLAGS.max_compiles, known)
    cells = []
    for b in budgets:
      batch, over, peak = res[b]
      cells.append(f"**{batch}** ({peak:.1f}); {over if over else '?'} does not fit")
    print(f"| {row} | " + " | ".join(cells)
          + f" | {len(known) - n0} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
