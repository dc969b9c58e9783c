r"""Evaluates a checkpoint: the negative ELBO over a whole split, with error bars.

  python -m md4_jax.evaluate --workdir=/tmp/md4_digits \
      [--split=test] [--num_t_samples=8] [--step=2000] [--batch_size=200] \
      [--seed=0] [--params=auto|ema|raw] [--output=PATH]

Every example of the split is scored exactly once, averaging K =
--num_t_samples time draws on its own stratified grid t_k = (k + 1 − u_k) / K;
the report gives the NELBO in nats per example and the dataset's headline
metric (`DatasetInfo.metric`): bits per dimension (images), bits per
character (text8) or bits per token and perplexity exp(NELBO / L)
(GPT-2-token text), each with its standard error std(per-example
estimates) / sqrt(N). It is printed as one line and written as JSON to

  <workdir>/eval/step_<step:08d>_<split>_<params>_k<K>.json

(or --output). The batch is sharded over all devices like training.

The zero-shot perplexity table of the MD4 / SEDD papers, for a run trained on
GPT-2 tokens (OpenWebText, FineWeb-Edu), after preparing each set with
`python -m md4_jax.data.prepare --dataset=NAME --tokenizer=...`:

  python -m md4_jax.evaluate --workdir=RUN --num_t_samples=8 \
      --zero_shot=lambada,wikitext2,ptb,wikitext103,lm1b [--zero_shot_dir=DIR]

scores every set's blocks (restoring the checkpoint once) and prints one row
per set: blocks, tokens, perplexity bound ± standard error, bits per token;
the JSON goes to <workdir>/eval/step_<step:08d>_zero_shot_<params>_k<K>.json.
"""

import copy
import dataclasses
import datetime
import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads TFDS.

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from md4_jax.run import checkpoint as checkpoint_lib  # noqa: E402
from md4_jax import cli  # noqa: E402
from md4_jax import paths  # noqa: E402
from md4_jax import data as data_lib  # noqa: E402
from md4_jax.metrics import evaluation  # noqa: E402
from md4_jax.experiment import memory  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.experiment import step as step_lib  # noqa: E402
from md4_jax.run import workdir as workdir_lib  # noqa: E402
from md4_jax.data import tokenized  # noqa: E402
from md4_jax.data import zero_shot  # noqa: E402

PARAMS = ("auto", "ema", "raw")


def evaluate_checkpoint(
    workdir: str, *, split: str = "", num_t_samples: int = 1, step: Optional[int] = None,
    batch_size: Optional[int] = None, seed: Optional[int] = None, params: str = "auto",
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
    params: 'ema' (the EMA parameters), 'raw' (the optimised ones) or 'auto' (the
      EMA unless its horizon exceeds the steps taken without warm-up, as training's
      headline; `step.headline_params`).
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
  [report] = _evaluate(workdir, [Target(split=split)], num_t_samples=num_t_samples, step=step,
                       batch_size=batch_size, seed=seed, params=params, mesh=mesh,
                       progress=progress)
  return report


def evaluate_zero_shot(
    workdir: str, names: Sequence[str], *, root: str = zero_shot.DEFAULT_ROOT,
    num_t_samples: int = 1, step: Optional[int] = None, batch_size: Optional[int] = None,
    seed: Optional[int] = None, params: str = "auto", mesh: Optional[Mesh] = None,
    progress: bool = False,
) -> dict[str, Any]:
  """The zero-shot perplexity table: a GPT-2-token run scored on prepared evaluation sets.

  Each set NAME is read from root/NAME (`md4_jax.data.prepare --dataset=NAME`);
  its blocks must have the run's length L. The checkpoint is restored once.

  Args:
    workdir: the training run (an OpenWebText / FineWeb-Edu model).
    names: sets of `zero_shot.SETS`, in table order.
    root: the directory holding one prepared directory per set.
    num_t_samples, step, batch_size, seed, params, mesh, progress: as
      `evaluate_checkpoint`.

  Returns:
    {'step', 'params', 'num_t_samples', 'seed', 'seq_len', 'sets': [one
    `evaluate_checkpoint` report per set, plus blocks, tokens, protocol and
    title]}.

  Raises:
    FileNotFoundError: a set not prepared under root (naming the command).
    ValueError: an unknown set, or a run that does not model GPT-2 tokens.
  """
  names = zero_shot.check_names(names)
  paths.check_reachable(root, "--zero_shot_dir")
  root = os.fspath(paths.path(root)) if not paths.is_remote(root) else root
  targets = [Target(dataset=n, data_dir=paths.join(root, n), split=zero_shot.SPLIT)
             for n in names]
  # Every set's shards against its summary.json (checksums, block counts and lengths) first.
  summaries = [zero_shot.verify_prepared(
      t.data_dir, t.dataset, tokenized.find_shards(zero_shot.DATASETS[t.dataset], t.data_dir,
                                                   zero_shot.SPLIT)) for t in targets]
  _check_same_tokenizer(workdir, targets)
  reports = _evaluate(workdir, targets, num_t_samples=num_t_samples, step=step,
                      batch_size=batch_size, seed=seed, params=params, mesh=mesh,
                      progress=progress)
  for name, target, summary, report in zip(names, targets, summaries, reports):
    if report["examples"] != int(summary["blocks"]):
      raise ValueError(f"{target.data_dir}: scored {report['examples']} blocks, its summary.json "
                       f"says {summary['blocks']}.")
    report.update(title=zero_shot.SETS[name].title, blocks=report["examples"],
                  tokens=report["examples"] * report["positions"], protocol=summary["protocol"],
                  data_dir=target.data_dir)
  first = reports[0]
  return {"workdir": first["workdir"], "step": first["step"], "params": first["params"],
          "num_t_samples": int(num_t_samples), "seed": first["seed"],
          "seq_len": first["positions"], "sets": reports}


def _check_same_tokenizer(workdir: str, targets: Sequence["Target"]) -> None:
  """Warns when a set was tokenised with another tokenizer.json than the run's data."""
  config = workdir_lib.load_config(workdir)
  run_tokenizer = tokenized.tokenizer_path(
      data_lib.get_info(config.dataset).data_dir(config.data_dir))
  try:
    if not paths.exists(run_tokenizer):
      return  # The training data is not on this machine: nothing to compare with.
  except (OSError, ValueError):
    return  # Nor reachable from it.
  want = paths.read_bytes(run_tokenizer)
  for target in targets:
    path = tokenized.tokenizer_path(target.data_dir)
    if paths.exists(path):
      if paths.read_bytes(path) != want:
          logging.warning("%s was tokenised with %s, which differs from the run's %s: the "
                          "perplexities compare different token streams.", target.dataset, path,
                          run_tokenizer)


@dataclasses.dataclass(frozen=True)
class Target:
  """One split to score: the run's own dataset (dataset None) or another one."""

  split: str = ""
  dataset: Optional[str] = None
  data_dir: Optional[str] = None


def _evaluate(workdir: str, targets: Sequence[Target], *, num_t_samples: int,
              step: Optional[int], batch_size: Optional[int], seed: Optional[int], params: str,
              mesh: Optional[Mesh], progress: bool) -> list[dict[str, Any]]:
  """Restores the checkpoint once and scores every target (see `evaluate_checkpoint`)."""
  if params not in PARAMS:
    raise ValueError(f"--params must be one of {PARAMS}, got {params!r}.")
  if num_t_samples < 1:
    raise ValueError(f"--num_t_samples must be >= 1, got {num_t_samples}.")
  run_cfg = workdir_lib.load_config(workdir)
  # The K x B time grid and K keys are built before the scan over K (4 + 8 bytes each).
  grid_batch = batch_size or run_cfg.eval_batch_size
  memory.check_fits(12.0 * num_t_samples * grid_batch,
                    f"--num_t_samples={num_t_samples}'s time grid for a batch of {grid_batch}",
                    "--num_t_samples (K = 8 is plenty for a report)")
  workdir_lib.checkpoint_step(workdir, step)  # No checkpoint or no such step: fail early.
  root = workdir if paths.is_remote(workdir) else os.path.abspath(workdir)
  if batch_size is not None:
    run_cfg.eval_batch_size = batch_size
  run_cfg.grain_worker_count = 0  # The eval pipeline reads in this process.
  seed = run_cfg.seed if seed is None else seed
  mesh = mesh or workdir_lib.run_mesh(run_cfg)
  parallel.check_batch_size(run_cfg.eval_batch_size, mesh, "the evaluation batch (--batch_size)")
  # Missing data or a bad split fails here, before the (slow) restore.
  configs, all_datasets = [], []
  for target in targets:
    config = copy.deepcopy(run_cfg)
    config.eval_split = target.split or config.eval_split
    if target.dataset is not None:
      config.dataset, config.data_dir = target.dataset, target.data_dir
    configs.append(config)
    all_datasets.append(data_lib.create_datasets(config, *parallel.data_shards(mesh)))

  start = time.time()
  # The newest checkpoint that verifies (or exactly `step`).
  _, experiment, state = workdir_lib.restore_run(workdir, step, mesh)
  step = int(parallel.fetch(state.step))
  reason = f"--params={params}"
  if params == "auto":
    params, reason = step_lib.headline_params(run_cfg.ema_rate, run_cfg.ema_warmup, step)
    logging.warning("Evaluating the %s parameters: %s (--params=ema|raw to choose).", params,
                    reason)
  weights = state.ema_params if params == "ema" else state.params
  del state  # The optimiser state is not needed.
  restore_seconds = time.time() - start
  reports = []
  for config, datasets in zip(configs, all_datasets):
    start = time.time()
    progress_fn = evaluation.Progress(datasets.num_eval_batches,
                                      f"eval {config.dataset}/{datasets.eval_split}",
                                      bar=progress)
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
        "params_reason": reason,
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
           if k in ("eval_source_entropy_bits_per_token", "eval_gap_bits_per_token",
                    "eval_gap_bits_per_token_stderr")},
    }
    # The first report carries the restore time.
    report.update(seconds=time.time() - start + (restore_seconds if not reports else 0.0),
                  devices=jax.device_count(),
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"))
    reports.append(report)
  return reports


def zero_shot_path(table: dict[str, Any]) -> str:
  """<workdir>/eval/step_<step:08d>_zero_shot_<params>_k<K>.json."""
  name = f"step_{table['step']:08d}_zero_shot_{table['params']}_k{table['num_t_samples']}.json"
  return os.path.join(table["workdir"], "eval", name)


def zero_shot_table(table: dict[str, Any]) -> str:
  """The paper's layout: one row per set, perplexity bound ± its standard error."""
  protocols = sorted({r["protocol"] for r in table["sets"]})
  lines = [f"Zero-shot perplexity bounds, step {table['step']} ({table['params']} params, "
           f"K={table['num_t_samples']}, blocks of {table['seq_len']} tokens, "
           f"{'/'.join(protocols)} protocol):",
           f"{'dataset':<12} {'blocks':>8} {'tokens':>12} {'perplexity <=':>22} "
           f"{'bits/token':>18}"]
  for r in table["sets"]:
    ppl = f"{r['perplexity']:.2f} ± {r['perplexity_stderr']:.2f}"
    bits = f"{r['bits_per_token']:.4f} ± {r['bits_per_token_stderr']:.4f}"
    lines.append(f"{r['title']:<12} {r['blocks']:>8,} {r['tokens']:>12,} {ppl:>22} {bits:>18}")
  return "\n".join(lines)


def report_path(report: dict[str, Any]) -> str:
  """<workdir>/eval/step_<step:08d>_<split>_<params>_k<K>.json."""
  split = re.sub(r"[^A-Za-z0-9_.-]+", "_", report["split"]).strip("_")
  name = f"step_{report['step']:08d}_{split}_{report['params']}_k{report['num_t_samples']}.json"
  return os.path.join(report["workdir"], "eval", name)


def write_report(report: dict[str, Any], path: str) -> None:
  paths.write_text(path, json.dumps(report, indent=2) + "\n")


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
_ZERO_SHOT = flags.DEFINE_list(
    "zero_shot", None, "Score a GPT-2-token run on these prepared zero-shot sets (any of "
    f"{','.join(zero_shot.SETS)}) and print the perplexity table; --split is then ignored.")
_ZERO_SHOT_DIR = flags.DEFINE_string(
    "zero_shot_dir", zero_shot.DEFAULT_ROOT,
    "Directory holding one prepared directory per zero-shot set (md4_jax.data.prepare).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Global evaluation batch (default: the run's eval_batch_size).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the times and masks (default: the run's).")
_PARAMS = flags.DEFINE_enum(
    "params", "auto", PARAMS, "Evaluate the EMA or the raw parameters; auto (default): the EMA "
    "unless its horizon 1/(1 - ema_rate) exceeds the steps taken without warm-up, like "
    "training's headline (the choice and its reason are printed).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default: "
                              "<workdir>/eval/step_<step>_<split>_<params>_k<K>.json, or "
                              "step_<step>_zero_shot_<params>_k<K>.json for --zero_shot).")
flags.mark_flags_as_required(["workdir"])


def _main() -> None:
  paths.check_served(_WORKDIR.value, "--workdir")
  if _OUTPUT.value:
    paths.check_reachable(_OUTPUT.value, "--output")
  if _ZERO_SHOT.value:
    table = evaluate_zero_shot(
        _WORKDIR.value, _ZERO_SHOT.value, root=_ZERO_SHOT_DIR.value,
        num_t_samples=_NUM_T_SAMPLES.value, step=_STEP.value, batch_size=_BATCH_SIZE.value,
        seed=_SEED.value, params=_PARAMS.value, progress=True)
    if jax.process_index() == 0:
      path = _OUTPUT.value or zero_shot_path(table)
      write_report(table, path)
      print(f"{zero_shot_table(table)}\n-> {path}", flush=True)
    return
  report = evaluate_checkpoint(
      _WORKDIR.value, split=_SPLIT.value, num_t_samples=_NUM_T_SAMPLES.value, step=_STEP.value,
      batch_size=_BATCH_SIZE.value, seed=_SEED.value, params=_PARAMS.value, progress=True)
  if jax.process_index() == 0:
    path = _OUTPUT.value or report_path(report)
    write_report(report, path)
    print(f"{summary(report)} -> {path}", flush=True)


def main(argv):
  cli.start(argv, quiet=True)
  cli.run(_main, "md4_jax.evaluate", memory_knobs="--batch_size or --num_t_samples")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("md4_jax.evaluate"))
