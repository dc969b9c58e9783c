r"""Evaluates a checkpoint: the negative ELBO over a whole split, with error bars.

  python -m md4_jax.evaluate --workdir=/tmp/md4_digits \
      [--split=test] [--num_t_samples=8] [--step=2000] [--batch_size=200] \
      [--seed=0] [--params=ema|raw] [--output=PATH]

Every example of the split is scored exactly once, averaging K =
--num_t_samples time draws on its own stratified grid t_k = (k + 1 − u_k) / K;
the report gives the NELBO in nats per example and the dataset's headline
metric (`DatasetInfo.metric`): bits per dimension (images), bits per
character (text8) or bits per token and perplexity exp(NELBO / L)
(GPT-2-token text), each with its standard error std(per-example
estimates) / sqrt(N). It is printed as one line and written as JSON to

  <workdir>/eval/step_<step:08d>_<split>_<params>_k<K>.json

(or --output). The batch is sharded over all devices like training.
"""

import datetime
import json
import os
import re
import time
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads TFDS.

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from etils import epath  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from md4_jax import checkpoint as checkpoint_lib  # noqa: E402
from md4_jax import cli  # noqa: E402
from md4_jax import data as data_lib  # noqa: E402
from md4_jax import evaluation  # noqa: E402
from md4_jax import parallel  # noqa: E402
from md4_jax import workdir as workdir_lib  # noqa: E402

PARAMS = ("ema", "raw")


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
    step: the checkpoint step; None = the newest one that verifies.
    batch_size: global evaluation batch; None = the run's eval_batch_size.
    seed: seed of the times and masks; None = the run's seed.
    params: 'ema' (the EMA parameters) or 'raw' (the optimised ones).
    mesh: devices to shard the batch over; None = the run's mesh if it fits.
    progress: show a progress bar over batches.

  Returns:
    The JSON-ready report: what was evaluated (workdir, step, checkpoint,
    dataset, split, params, num_t_samples, seed, batch_size), examples (N),
    positions (D), nelbo and nelbo_stderr (nats per example; the stderr is
    std(per-example estimates) / sqrt(N)), nelbo_diff, nelbo_recon and
    nelbo_prior, then <metric> and <metric>_stderr in bits per position, where
    the key `metric` names it: bits_per_dim (images), bits_per_char (text8)
    or bits_per_token (GPT-2 tokens, which also get perplexity = exp(nelbo / D)
    and perplexity_stderr), and seconds (restore + evaluation), devices,
    created.

  Raises:
    FileNotFoundError: no run, no checkpoint or no prepared data.
    ValueError: a bad argument (split, step, batch size, params, K).
  """
  if params not in PARAMS:
    raise ValueError(f"--params must be one of {PARAMS}, got {params!r}.")
  if num_t_samples < 1:
    raise ValueError(f"--num_t_samples must be >= 1, got {num_t_samples}.")
  config = workdir_lib.load_config(workdir)
  workdir_lib.checkpoint_step(workdir, step)  # No checkpoint or no such step: fail early.
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  config.eval_split = split or config.eval_split
  if batch_size is not None:
    config.eval_batch_size = batch_size
  config.grain_worker_count = 0  # The eval pipeline reads in this process.
  seed = config.seed if seed is None else seed
  mesh = mesh or workdir_lib.run_mesh(config)
  parallel.check_batch_size(config.eval_batch_size, mesh, "the evaluation batch (--batch_size)")
  # Missing data or a bad split fails here, before the (slow) restore.
  datasets = data_lib.create_datasets(config, *parallel.data_shards(mesh))

  start = time.time()
  # The newest checkpoint that verifies (or exactly `step`).
  _, experiment, state = workdir_lib.restore_run(workdir, step, mesh)
  step = int(parallel.fetch(state.step))
  weights = state.ema_params if params == "ema" else state.params
  del state  # The optimiser state is not needed.
  progress_fn = evaluation.Progress(datasets.num_eval_batches,
                                    f"eval {datasets.eval_split}", bar=progress)
  result = evaluation.evaluate(experiment.eval_step(num_t_samples), weights, datasets, mesh,
                               experiment.model.num_positions, seed, progress=progress_fn)
  metric = result["eval_metric"]
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
      "examples": result["eval_examples"],
      "positions": int(experiment.model.num_positions),
      "metric": metric,
      "nelbo": result["eval_loss"],
      "nelbo_stderr": result["eval_loss_stderr"],
      "nelbo_diff": result["eval_loss_diff"],
      "nelbo_recon": result["eval_loss_recon"],
      "nelbo_prior": result["eval_loss_prior"],
      **evaluation.headline(result["eval_loss"], result["eval_loss_stderr"],
                            experiment.model.num_positions, metric),
      # A synthetic source: its exact entropy and the NELBO's gap to it.
      **{k.removeprefix("eval_"): v for k, v in result.items()
         if k in ("eval_source_entropy_bits_per_token", "eval_gap_bits_per_token")},
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
  return (f"Step {report['step']} {report['dataset']}/{report['split']} "
          f"({report['examples']} examples, K={report['num_t_samples']}, "
          f"{report['params']} params): {evaluation.describe(report, report['metric'])}, "
          f"NELBO {report['nelbo']:.3f} ± {report['nelbo_stderr']:.3f} nats/example")


_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_SPLIT = flags.DEFINE_string(
    "split", "", "Split to evaluate ('' = the run's evaluation split): digits train|test, text8 "
    "train|validation|test, cifar10/imagenet64 any TFDS split (e.g. test, train[:10000]), "
    "openwebtext/fineweb_edu train|validation.")
_NUM_T_SAMPLES = flags.DEFINE_integer(
    "num_t_samples", 1, "K: time samples per example, on a stratified grid, averaged. The "
    "estimator's variance falls as 1/K; the cost grows as K.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Global evaluation batch (default: the run's eval_batch_size).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the times and masks (default: the run's).")
_PARAMS = flags.DEFINE_enum("params", "ema", PARAMS, "Evaluate the EMA or the raw parameters.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: "
                              "<workdir>/eval/step_<step>_<split>_<params>_k<K>.json).")
flags.mark_flags_as_required(["workdir"])


def _main() -> None:
  report = evaluate_checkpoint(
      _WORKDIR.value, split=_SPLIT.value, num_t_samples=_NUM_T_SAMPLES.value, step=_STEP.value,
      batch_size=_BATCH_SIZE.value, seed=_SEED.value, params=_PARAMS.value, progress=True)
  if jax.process_index() == 0:
    path = _OUTPUT.value or report_path(report)
    write_report(report, path)
    print(f"{summary(report)} -> {path}", flush=True)


def main(argv):
  cli.start(argv, quiet=True)
  cli.run(_main, "md4_jax.evaluate")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("md4_jax.evaluate"))
