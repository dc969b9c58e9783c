r"""Evaluates a checkpoint: the negative ELBO over a whole split, with error bars.

  python -m md4_jax.evaluate --workdir=/tmp/md4_digits \
      [--split=test] [--num_t_samples=8] [--step=2000] [--batch_size=200] \
      [--seed=0] [--params=ema|raw] [--output=PATH]

Every example of the split is scored exactly once, averaging K =
--num_t_samples time draws on its own stratified grid t_k = (k + u_k) / K;
the report gives the NELBO in nats per example and bits per dimension
(images), bits per character (text8) or bits per token and perplexity
exp(NELBO / L) (GPT-2-token text), each with its standard error
std(per-example estimates) / sqrt(N). It is printed as one line and written
as JSON to

  <workdir>/eval/step_<step:08d>_<split>_<params>_k<K>.json

(or --output). The batch is sharded over all devices like training.
"""

import datetime
import json
import logging as pylogging
import math
import os
import re
import sys
import time
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads TFDS.

import jax  # noqa: E402
import ml_collections  # noqa: E402
import tqdm  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from etils import epath  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from md4_jax import checkpoint as checkpoint_lib  # noqa: E402
from md4_jax import data as data_lib  # noqa: E402
from md4_jax import parallel  # noqa: E402
from md4_jax import workdir as workdir_lib  # noqa: E402
from md4_jax.data import text8  # noqa: E402
from md4_jax.data import tokenized  # noqa: E402
from md4_jax.train import build  # noqa: E402
from md4_jax.train import loop  # noqa: E402

PARAMS = ("ema", "raw")
EXIT_BAD_INPUT = 2  # As md4_jax.main: bad flags, workdir or checkpoint.


def eval_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The run's mesh if it fits the devices here, else all devices on 'data'."""
  try:
    return parallel.make_mesh(config.mesh)
  except ValueError as e:
    logging.warning("The run's mesh %s does not fit here (%s); evaluating over all %d devices on "
                    "the data axis.", config.mesh.to_dict(), e, jax.device_count())
    return parallel.make_mesh({"data": -1})


def checkpoint_step(workdir: str, step: Optional[int]) -> int:
  """The latest checkpointed step, or `step` after checking it exists.

  Raises:
    FileNotFoundError: No checkpoint in the workdir.
    ValueError: `step` was not saved.
  """
  directory = checkpoint_lib.checkpoint_dir(workdir)
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  steps = sorted(ckpt.all_steps())
  ckpt.close()
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {directory!r}: train first (python -m md4_jax.main "
                            f"--config=... --workdir={workdir}) or check --workdir.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"No checkpoint at step {step} in {directory!r}; saved steps: "
                     f"{', '.join(map(str, steps))}.")
  return step


UNITS = {"bits_per_dim": "bits/dim", "bits_per_char": "bits/char", "bits_per_token": "bits/token"}


def bits_metric(dataset: str, kind: str) -> str:
  """What bits per position are called: per token (GPT-2 text), char (text8), dim (images)."""
  if dataset in tokenized.DATASETS:
    return "bits_per_token"
  if dataset == text8.NAME or kind == "text":
    return "bits_per_char"
  return "bits_per_dim"


def bits_and_perplexity(nelbo: float, stderr: float, positions: int,
                        metric: str) -> dict[str, float]:
  """<metric> and <metric>_stderr in bits per position; perplexity for tokens.

  Args:
    nelbo: mean NELBO, nats per example.
    stderr: its standard error.
    positions: D, positions per example.
    metric: from `bits_metric`.

  Returns:
    {metric, metric_stderr} and, for bits_per_token, perplexity =
    exp(nelbo / D) with perplexity_stderr from the delta method.
  """
  bits = positions * math.log(2.0)
  out = {metric: nelbo / bits, f"{metric}_stderr": stderr / bits}
  if metric == "bits_per_token":
    perplexity = math.exp(nelbo / positions)
    out.update(perplexity=perplexity, perplexity_stderr=perplexity * stderr / positions)
  return out


def _progress(total: int, desc: str):
  def wrap(batches):
    return tqdm.tqdm(batches, total=total, desc=desc, unit="batch", dynamic_ncols=True,
                     disable=jax.process_index() != 0, file=sys.stderr)
  return wrap


def _num_batches(num_examples: int, global_batch: int, mesh: Mesh) -> int:
  """Batches `Datasets.eval_batches` yields per process (see common.eval_batches_fn)."""
  _, count = parallel.data_shards(mesh)
  per_process = -(-num_examples // count)
  return -(-per_process // (global_batch // count))


def evaluate_checkpoint(
    workdir: str, *, split: str = "", num_t_samples: int = 1, step: Optional[int] = None,
    batch_size: Optional[int] = None, seed: Optional[int] = None, params: str = "ema",
    mesh: Optional[Mesh] = None, progress: bool = False,
) -> dict[str, Any]:
  """NELBO of a checkpoint over a whole split, with standard errors.

  Args:
    workdir: the training run's directory.
    split: the split to score; '' = the run's evaluation split.
    num_t_samples: K time samples averaged per example (stratified).
    step: the checkpoint step; None = the latest.
    batch_size: global evaluation batch; None = the run's eval_batch_size.
    seed: seed of the times and masks; None = the run's seed.
    params: 'ema' (the EMA parameters) or 'raw' (the optimised ones).
    mesh: devices to shard the batch over; None = the run's mesh if it fits.
    progress: show a progress bar over batches.

  Returns:
    The JSON-ready report: what was evaluated (workdir, step, checkpoint,
    dataset, split, params, num_t_samples, seed, batch_size), examples (N),
    positions (D), nelbo and nelbo_stderr (nats per example; the stderr is
    std(per-example estimates) / sqrt(N)), nelbo_diff and nelbo_recon, then
    <metric> and <metric>_stderr in bits per position, where the key `metric`
    names it: bits_per_dim (images), bits_per_char (text8) or bits_per_token
    (GPT-2 tokens, which also get perplexity = exp(nelbo / D) and
    perplexity_stderr), and seconds (restore + evaluation), devices, created.

  Raises:
    FileNotFoundError: no run, no checkpoint or no prepared data.
    ValueError: a bad argument (split, step, batch size, params, K).
  """
  if params not in PARAMS:
    raise ValueError(f"--params must be one of {PARAMS}, got {params!r}.")
  if num_t_samples < 1:
    raise ValueError(f"--num_t_samples must be >= 1, got {num_t_samples}.")
  config = workdir_lib.load_config(workdir)
  step = checkpoint_step(workdir, step)
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  config.eval_split = split or config.get("eval_split", "")
  if batch_size is not None:
    config.eval_batch_size = batch_size
  config.grain_worker_count = 0  # The eval pipeline reads in this process.
  seed = config.seed if seed is None else seed
  mesh = mesh or eval_mesh(config)
  parallel.check_batch_size(config.eval_batch_size, mesh, "the evaluation batch (--batch_size)")
  # Missing data or a bad split fails here, before the (slow) restore.
  datasets = data_lib.create_datasets(config, *parallel.data_shards(mesh))

  start = time.time()
  _, model, state = workdir_lib.restore_run(workdir, step, mesh)
  weights = state.ema_params if params == "ema" else state.params
  del state  # The optimiser state is not needed.
  eval_step = build.make_eval_step(config, model, mesh, num_t_samples)
  num_batches = _num_batches(datasets.num_eval_examples, config.eval_batch_size, mesh)
  wrap = _progress(num_batches, f"eval {datasets.eval_split}") if progress else None
  result = loop.evaluate(eval_step, weights, datasets, mesh, model, seed, progress=wrap)

  positions = model.num_positions
  metric = bits_metric(config.dataset, datasets.kind)
  nelbo, stderr = result["eval_loss"], result["eval_loss_stderr"]
  report = {
      "workdir": root,
      "step": int(step),
      "checkpoint": os.path.join(checkpoint_lib.checkpoint_dir(root), str(step)),
      "dataset": config.dataset,
      "split": datasets.eval_split,
      "params": params,
      "num_t_samples": int(num_t_samples),
      "seed": int(seed),
      "batch_size": int(config.eval_batch_size),
      "examples": int(result["eval_examples"]),
      "positions": int(positions),
      "metric": metric,
      "nelbo": nelbo,
      "nelbo_stderr": stderr,
      "nelbo_diff": result["eval_loss_diff"],
      "nelbo_recon": result["eval_loss_recon"],
      **bits_and_perplexity(nelbo, stderr, positions, metric),
  }
  report.update(seconds=time.time() - start, devices=jax.device_count(),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  return report


def report_path(report: dict[str, Any]) -> str:
  """<workdir>/eval/step_<step:08d>_<split>_<params>_k<K>.json."""
  split = re.sub(r"[^A-Za-z0-9_.-]+", "_", report["split"]).strip("_")
  name = f"step_{report['step']:08d}_{split}_{report['params']}_k{report['num_t_samples']}.json"
  return os.path.join(report["workdir"], "eval", name)


def write_report(report: dict[str, Any], path: str) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=2) + "\n")


def summary(report: dict[str, Any]) -> str:
  """One line: step, split, examples, K and the numbers with their errors."""
  metric = report["metric"]
  parts = []
  if "perplexity" in report:
    parts.append(f"perplexity {report['perplexity']:.3f} ± {report['perplexity_stderr']:.3f}")
  parts.append(f"{report[metric]:.4f} ± {report[metric + '_stderr']:.4f} {UNITS[metric]}")
  parts.append(f"NELBO {report['nelbo']:.3f} ± {report['nelbo_stderr']:.3f} nats/example")
  return (f"Step {report['step']} {report['dataset']}/{report['split']} "
          f"({report['examples']} examples, K={report['num_t_samples']}, "
          f"{report['params']} params): "
          + ", ".join(parts))


_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_SPLIT = flags.DEFINE_string(
    "split", "", "Split to evaluate ('' = the run's evaluation split): digits train|test, text8 "
    "train|validation|test, cifar10/imagenet64 any TFDS split (e.g. test, train[:10000]), "
    "openwebtext/fineweb_edu train|validation.")
_NUM_T_SAMPLES = flags.DEFINE_integer(
    "num_t_samples", 1, "K: time samples per example, on a stratified grid, averaged. The "
    "estimator's variance falls as 1/K; the cost grows as K.", lower_bound=1)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Global evaluation batch (default: the run's eval_batch_size).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the times and masks (default: the run's).")
_PARAMS = flags.DEFINE_enum("params", "ema", PARAMS, "Evaluate the EMA or the raw parameters.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: "
                              "<workdir>/eval/step_<step>_<split>_<params>_k<K>.json).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("MD4_DISTRIBUTED", "0") == "1",
    "Call jax.distributed.initialize() first (multi-process; cluster auto-detection).")
flags.mark_flags_as_required(["workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops the checkpoint/data libraries' chatter below ERROR."""

  NOISY = ("/orbax/", "/grain/", "/etils/")

  def filter(self, record):
    return record.levelno >= pylogging.ERROR or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  jax.config.update("jax_threefry_partitionable", True)
  if _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
  try:
    report = evaluate_checkpoint(
        _WORKDIR.value, split=_SPLIT.value, num_t_samples=_NUM_T_SAMPLES.value, step=_STEP.value,
        batch_size=_BATCH_SIZE.value, seed=_SEED.value, params=_PARAMS.value, progress=True)
  except (ValueError, FileNotFoundError, PermissionError) as e:
    logging.debug("Input error", exc_info=True)
    print(f"md4_jax.evaluate: error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)
  if jax.process_index() == 0:
    path = _OUTPUT.value or report_path(report)
    write_report(report, path)
    print(f"{summary(report)} -> {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
