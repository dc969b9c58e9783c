"""The training run in three parts: setup (validate, build, restore or initialise),
loop (steps; periodic eval, samples, checkpoints and metrics), finish (final eval).

This is the only training loop: `build.setup` jits one step over a mesh that
serves one CPU as well as many devices and processes.
"""

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from md4_jax import paths
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax.run import lease as lease_lib
from md4_jax import data as data_lib
from md4_jax.metrics import evaluation
from md4_jax.experiment import parallel
from md4_jax.run import preemption
from md4_jax.run import saved_config
from md4_jax.metrics import pictures
from md4_jax.run import workdir as workdir_lib
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import sampling
from md4_jax.experiment import build
from md4_jax.experiment import validation
from md4_jax.experiment import step as step_lib

SAMPLE_RNG_SALT = 2  # Periodic samples: fold_in(fold_in(key(seed), salt), step).


def write_samples(tokens, datasets, config, workdir: str, step: int, writer) -> str:
  """Writes a PNG grid (images) or a text file (text) and logs it to TensorBoard."""
  path, shown = pictures.save_samples(
      tokens, os.path.join(workdir, "samples", f"step_{step:08d}"), config.vocab_size,
      datasets.info.text_codec(config.data_dir))
  if isinstance(shown, np.ndarray):
    writer.write_images(step, {"samples": shown[None]})
  else:
    writer.write_texts(step, {"samples": "\n\n".join(shown[:4])})
  return path


def schedule_summary(model, params, writer=None, step: int = 0) -> dict[str, float]:
  """GenMD4: min / mean / max of the learned exponents w (and, with a writer,
  their histogram and a per-token bar plot in TensorBoard); {} for MD4."""
  if not model.per_token_schedule:
    return {}
  w = np.asarray(parallel.fetch(model.apply({"params": params}, method="powers")))
  summary = {"genmd4_power_min": float(w.min()), "genmd4_power_mean": float(w.mean()),
             "genmd4_power_max": float(w.max()), "genmd4_power_argmin": int(w.argmin()),
             "genmd4_power_argmax": int(w.argmax())}
  if writer is not None:
    writer.write_scalars(step, {k: v for k, v in summary.items() if "arg" not in k})
    writer.write_histograms(step, {"genmd4_powers": w})
    writer.write_images(step, {"genmd4_powers_per_token": pictures.bar_image(w)[None]})
  return summary


def check_workdir_path(workdir: str) -> None:
  """Raises ValueError if `workdir` cannot become a directory (nothing is created)."""
  if paths.is_remote(workdir):
    workdir_lib.check_reachable(workdir)
    return
  path = paths.path(workdir)
  for ancestor in (path, *path.parents):
    if ancestor.exists() and not ancestor.is_dir():
      raise ValueError(f"--workdir {workdir} cannot be created: {ancestor} is a file, not a "
                       "directory.")
  if not path.parent.is_dir():
    raise ValueError(f"The parent of --workdir ({path.parent}) does not exist; create it "
                     f"(mkdir -p {path.parent}) or fix --workdir.")


ASYNC_CHECKPOINTING = ("auto", "on", "off")


def check_run_options(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line) for a bad checkpointing or profiling option."""
  if config.async_checkpointing not in ASYNC_CHECKPOINTING:
    raise ValueError(f"config.async_checkpointing must be one of {ASYNC_CHECKPOINTING}, got "
                     f"{config.async_checkpointing!r}.")
  if config.profile_steps < 0 or config.profile_start_step < 1:
    raise ValueError(f"config.profile_steps must be >= 0 and config.profile_start_step >= 1, "
                     f"got {config.profile_steps} and {config.profile_start_step}.")


def async_checkpointing(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether checkpoints are written in the background: 'auto' = on for gs://."""
  if config.async_checkpointing == "auto":
    return paths.is_remote(workdir)
  return config.async_checkpointing == "on"


class Profiler:
  """A jax.profiler trace of steps [start, start + num) on process 0, written into
  <workdir>/plugins/profile/ (through the path layer's mirror for gs://)."""

  def __init__(self, workdir: str, start: int, num: int):
    self._mirror = paths.Mirror(paths.join(workdir, "plugins", "profile"))
    self._start, self._stop = start, start + num
    self._on = num > 0 and jax.process_index() == 0
    self.active = False

  def before_step(self, step: int) -> None:
    """Called before the step that will be number `step` (1-based) runs."""
    if self._on and not self.active and step == self._start:
      jax.profiler.start_trace(os.path.dirname(os.path.dirname(self._mirror.local)))
      self.active = True
      logging.info("Profiling steps %d to %d.", self._start, self._stop - 1)

  def after_step(self, step: int, state) -> None:
    if self.active and step >= self._stop - 1:
      jax.block_until_ready(state)
      self.finish()

  def finish(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    self._mirror.sync()
    logging.info("Profile written to %s (TensorBoard's profile tab: tensorboard --logdir=%s).",
                 self._mirror.target, os.path.dirname(os.path.dirname(self._mirror.target)))


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir (after `check_workdir_path`) and checks that it is writable."""
  path = paths.path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"--workdir {workdir} is not a writable directory ({e.strerror or e}); "
                          "choose a directory you can write to.") from None


def save_run_info(config, workdir: str, num_params: int, mesh: jax.sharding.Mesh) -> None:
  """Writes the config and the software/hardware it ran on (the mesh's devices) into the
  workdir."""
  if jax.process_index() != 0:
    return
  saved_config.save_config(config, workdir)
  import flax, optax  # pylint: disable=g-import-not-at-top,multiple-imports
  info = {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "devices": [str(d) for d in mesh.devices.flat], "process_count": jax.process_count(),
          "num_params": num_params}
  paths.write_text(paths.join(workdir, "run_info.json"), json.dumps(info, indent=2))


NonFiniteError = step_lib.NonFiniteError


class MirroredWriter:
  """A clu metric writer whose files reach a gs:// workdir through the path layer:
  TensorBoard's writer writes into a local mirror, uploaded on every flush and close."""

  def __init__(self, writer, mirror: paths.Mirror):
    self._writer, self._mirror = writer, mirror

  def __getattr__(self, name):
    return getattr(self._writer, name)

  def flush(self) -> None:
    self._writer.flush()
    self._mirror.sync()

  def close(self) -> None:
    self._writer.close()
    self._mirror.sync()


def create_writer(workdir: str):
  """clu's default writer (TensorBoard events on process 0, logging elsewhere) for a local or
  gs:// workdir."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  mirror = paths.Mirror(workdir)
  writer = metric_writers.create_default_writer(mirror.local,
                                                just_logging=jax.process_index() > 0)
  return MirroredWriter(writer, mirror) if mirror.remote else writer


class _MetricLog:
  """Collects device metrics each step; writes them one step late (no host sync).

  Means are over the finite steps, with the mean loss also as the dataset's
  headline metric (train_bits_per_char, ...); `raise_on_nonfinite` makes a
  non-finite step an error at log time (the guard of last resort when
  check_nans is off).
  """

  def __init__(self, writer, raise_on_nonfinite: bool, num_positions: int, metric: str):
    self._writer = writer
    self._raise = raise_on_nonfinite
    self._num_positions = num_positions
    self._metric = metric
    self._buffer: list[dict[str, jax.Array]] = []
    self._pending: Optional[tuple[int, list]] = None

  def add(self, metrics) -> None:
    self._buffer.append(metrics)

  def mark(self, step: int) -> None:
    """The metrics collected so far belong to the log line of `step`."""
    self._pending, self._buffer = (step, self._buffer), []

  def flush(self) -> None:
    if self._pending is None:
      return
    step, buffer = self._pending
    self._pending = None
    values = parallel.fetch(buffer)
    good = [v for v in values if bool(v["finite"])]
    if self._raise and len(good) < len(values):
      raise NonFiniteError(f"Non-finite training loss/gradient in the steps up to {step}. Lower "
                           "the learning rate or check the data.")
    summary = {f"train_{k}": float(np.mean([v[k] for v in good]))
               for k in values[0] if k != "finite"} if good else {}
    if good:
      bits = evaluation.headline(summary["train_loss"], 0.0, self._num_positions, self._metric)
      summary.update({f"train_{k}": v for k, v in bits.items() if not k.endswith("_stderr")})
    summary["train_nonfinite_steps"] = float(len(values) - len(good))
    self._writer.write_scalars(step, summary)


@dataclasses.dataclass
class Run:
  """What `setup` hands the loop: the built experiment and everything the run writes to."""

  config: ml_collections.ConfigDict
  workdir: str
  experiment: build.Experiment
  datasets: data_lib.Datasets
  checkpointer: checkpoint_lib.Checkpointer
  writer: Any
  state: Any
  first_batch: dict
  num_params: int
  lease: Optional[lease_lib.Lease]


@dataclasses.dataclass
class Outcome:
  """Where the loop stopped."""

  state: Any
  step: int
  initial_step: int
  eval_metrics: dict[str, Any]
  preempted: bool
  seconds: float


def setup(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False,
          mesh: Optional[jax.sharding.Mesh] = None) -> Run:
  """Validates, builds, and restores or initialises; nothing is written until every check passed.

  Everything that can be wrong with the inputs (value ranges, names, shapes,
  batch sizes, the workdir, a changed config, bad tokens) raises before
  anything is compiled or written. A resume starts from the newest checkpoint
  that verifies (corrupt ones are reported and moved aside). `mesh`: the devices
  to train on (default: config.mesh over every device; e.g. one device of several
  in a notebook: `parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])`).
  """
  validation.validate(config)
  check_run_options(config)
  check_workdir_path(workdir)
  experiment = build.setup(config, mesh)
  mesh = experiment.mesh
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  if config.num_samples > 0:
    parallel.check_batch_size(config.num_samples, mesh, "num_samples")
  logging.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), mesh.devices.size,
               jax.process_count())
  datasets = data_lib.create_datasets(config, *parallel.data_shards(mesh))
  lease, created = take_lease(workdir)
  try:
    return _setup_holding(config, workdir, allow_config_change, experiment, datasets, lease)
  except BaseException:
    give_back(lease, workdir, created)
    raise


def take_lease(workdir: str) -> tuple[Optional[lease_lib.Lease], bool]:
  """This run's lease on `workdir` (process 0 holds it; None elsewhere and on URLs), and
  whether the workdir was created for it. WorkdirInUseError if another run holds it."""
  if "://" in workdir:
    logging.warning("One run per workdir is enforced on local filesystems only; %s is not "
                    "leased.", workdir)
    return None, False
  created = not os.path.isdir(workdir)

  def broadcast(value: int) -> int:  # Process 0's value on every process.
    if jax.process_count() == 1:
      return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))

  lease = lease_lib.acquire_for_run(workdir, jax.process_index(), jax.process_count(), broadcast)
  return lease, created


def give_back(lease: Optional[lease_lib.Lease], workdir: str, created: bool) -> None:
  """Releases the lease; a workdir created by a start that then failed is removed again."""
  if lease is None:
    return
  lease.release()
  if created and set(os.listdir(workdir)) <= {lease_lib.LEASE_FILE, ".lease.lock"}:
    for name in os.listdir(workdir):
      os.unlink(os.path.join(workdir, name))
    os.rmdir(workdir)


def _setup_holding(config, workdir, allow_config_change, experiment, datasets, lease) -> Run:
  """The part of `setup` that runs while holding the workdir's lease."""
  mesh = experiment.mesh
  # The run's identity: the config in its checkpoints (config.json only if it has none).
  changes = saved_config.check_resume(workdir_lib.stored_config(workdir), config,
                                      allow_config_change, workdir)
  if changes:
    logging.warning("Resuming with changed safe config keys: %s", changes)
  resumed = bool(workdir_lib.checkpoint_steps(workdir))
  if jax.process_count() > 1:  # Every process has read the workdir before any writes to it.
    multihost_utils.sync_global_devices("md4_jax:workdir_read")
  if not resumed:  # Bad tokens fail before anything is written.
    first_batch = next(datasets.train_iter)
    model_lib.check_tokens(first_batch["x"], config.vocab_size)
  prepare_workdir(workdir)
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                             config.max_checkpoints_to_keep,
                                             async_save=async_checkpointing(config, workdir))
  if resumed:  # The newest checkpoint that verifies, with the data iterator.
    state = experiment.restore(checkpointer, data_iter=datasets.train_iter)
    logging.info("Resuming from step %d.", int(state.step))
    first_batch = next(datasets.train_iter)
    model_lib.check_tokens(first_batch["x"], config.vocab_size)
  else:
    state = experiment.init_state()

  num_params = experiment.num_params
  save_run_info(config, workdir, num_params, mesh)
  logging.info("Config:\n%s", config)
  # clu's writers import TensorFlow (~10-30 s): only once a run is really starting, so a bad
  # input is refused without it.
  from clu import parameter_overview  # pylint: disable=g-import-not-at-top
  parameter_overview.log_parameter_overview(state.params)
  logging.info("Parameters: %d", num_params)
  writer = create_writer(workdir)
  if not resumed:
    writer.write_texts(0, {"config": f"```\n{config}\n```"})
  return Run(config=config, workdir=workdir, experiment=experiment, datasets=datasets,
             checkpointer=checkpointer, writer=writer, state=state, first_batch=first_batch,
             num_params=num_params, lease=lease)


def evaluate_params(run: Run, params) -> dict[str, Any]:
  """The held-out NELBO of `params` (one pass over the eval split)."""
  return evaluation.evaluate(run.experiment.eval_step(), params, run.datasets, run.experiment.mesh,
                             run.experiment.model.num_positions, run.config.seed,
                             progress=_eval_progress(run))


def evaluate_state(run: Run, state) -> dict[str, Any]:
  """The held-out NELBO of the raw and the EMA parameters, with a headline.

  Returns eval_ema_* and eval_raw_* (one evaluation when ema_rate is 0), and
  eval_* = the headline parameters' values: the EMA unless it is not warm yet
  (`step.headline_params`), named by eval_params and explained by
  eval_params_reason.
  """
  config = run.config
  which, why = step_lib.headline_params(config.ema_rate, config.ema_warmup,
                                        int(parallel.fetch(state.step)))
  ema = evaluate_params(run, state.ema_params)
  raw = evaluate_params(run, state.params) if config.ema_rate > 0 else ema
  out = dict(ema if which == "ema" else raw, eval_params=which, eval_params_reason=why)
  for name, values in (("ema", ema), ("raw", raw)):
    out.update({f"eval_{name}_{k[len('eval_'):]}": v for k, v in values.items()
                if k.startswith("eval_") and isinstance(v, float)})
  out.update(schedule_summary(run.experiment.model, state.ema_params if which == "ema"
                              else state.params))
  return out


def describe_eval(values: dict[str, Any], metric: str) -> str:
  """'1.2345 ± 0.0012 bits/dim (raw params; ema 1.3000, raw 1.2345)'."""
  head = evaluation.describe(values, metric, "eval_")
  if f"eval_ema_{metric}" not in values:
    return head
  return (f"{head} ({values['eval_params']} params; ema {values[f'eval_ema_{metric}']:.4f}, "
          f"raw {values[f'eval_raw_{metric}']:.4f})")


def _eval_progress(run: Run) -> evaluation.Progress:
  return evaluation.Progress(run.datasets.num_eval_batches,
                             f"eval {run.datasets.info.name}/{run.datasets.eval_split}", bar=False)


def loop(run: Run) -> Outcome:
  """Steps from the run's state to config.num_train_steps (or a preemption).

  Periodically logs (one step late), evaluates, samples and checkpoints; a
  non-finite update is skipped or stops the run (config.nan_policy).
  """
  config, experiment, datasets = run.config, run.experiment, run.datasets
  mesh, model, writer, checkpointer = experiment.mesh, experiment.model, run.writer, run.checkpointer
  metric = datasets.info.metric
  config_tree = saved_config.plain(config)
  train_step = experiment.train_step
  if config.num_samples > 0:
    sample_fn = experiment.sampler(steps=config.sampling_steps, grid=config.sampling_grid)
    sample_z = sampling.all_masked(model, config.num_samples)
    sample_cond = sampling.class_labels(config.classes, config.num_samples)
  sample_rng = jax.random.fold_in(jax.random.key(config.seed), SAMPLE_RNG_SALT)
  watcher = preemption.PreemptionWatcher()
  profiler = Profiler(run.workdir, config.profile_start_step, config.profile_steps)

  state = run.state
  total = config.num_train_steps
  step = int(state.step)
  initial_step = step
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.log_loss_every_steps)
  log = _MetricLog(writer, not config.check_nans, model.num_positions, metric)
  eval_metrics: dict[str, Any] = {}
  preempted = False
  pending_finite: Optional[tuple[int, jax.Array, dict]] = None
  start = time.time()

  def due(every: int) -> bool:
    return step == total or (every > 0 and step % every == 0)

  def check_finite(pending) -> None:
    """Host side of the NaN guard (the jitted step already dropped the update)."""
    bad_step, finite, metrics = pending
    if bool(parallel.fetch(finite)):
      return
    values = {k: float(parallel.fetch(metrics[k])) for k in ("loss", "grad_norm")}
    if config.nan_policy == "skip":
      logging.warning("Step %d: non-finite %s; update skipped.", bad_step, values)
      return
    raise NonFiniteError(
        f"Non-finite loss/gradient at step {bad_step} ({values}); the update was not applied and "
        f"the last good checkpoint is step {checkpointer.latest_step()}. Lower the learning rate, "
        "check the data, or set --config.nan_policy=skip.")

  try:
    with metric_writers.ensure_flushes(writer):
      batch = run.first_batch
      while step < total:
        if batch is None:
          batch = next(datasets.train_iter)
          model_lib.check_tokens(batch["x"], config.vocab_size)
        profiler.before_step(step + 1)
        state, metrics = train_step(state, parallel.to_global(batch, mesh))
        batch = None
        step += 1
        profiler.after_step(step, state)
        if config.check_nans:  # Checked one step late, except before a checkpoint.
          if pending_finite is not None:
            check_finite(pending_finite)
          pending_finite = (step, metrics["finite"], metrics)
        log.flush()  # The previous log line, while this step runs.
        log.add(metrics)
        report(step)
        if due(config.log_loss_every_steps):
          log.mark(step)
        if due(config.eval_every_steps):
          log.flush()
          with report.timed("eval"):
            eval_metrics = evaluate_state(run, state)
          writer.write_scalars(step, {k: v for k, v in eval_metrics.items()
                                      if isinstance(v, float)})
          schedule_summary(model, state.ema_params, writer, step)
          logging.info("step %d: eval %s", step, describe_eval(eval_metrics, metric))
        if due(config.sample_every_steps) and config.num_samples > 0:
          with report.timed("sample"):
            which, _ = step_lib.headline_params(config.ema_rate, config.ema_warmup, step)
            tokens, _ = sample_fn({"params": state.ema_params if which == "ema" else state.params},
                                  jax.random.fold_in(sample_rng, step), sample_z, sample_cond)
            tokens = parallel.gather(tokens)
            if jax.process_index() == 0:
              logging.info("Samples: %s", write_samples(tokens, datasets, config, run.workdir,
                                                        step, writer))
        preempted = watcher.reached(step)
        if due(config.checkpoint_every_steps) or preempted:
          if pending_finite is not None:
            check_finite(pending_finite)
            pending_finite = None
          if run.lease is not None:
            run.lease.check()  # Never write into a workdir another run has taken over.
          with report.timed("checkpoint"):
            checkpointer.save(step, state, datasets.train_iter, config_tree)
          writer.flush()  # TensorBoard's events reach a gs:// workdir with each checkpoint.
        if preempted:
          checkpointer.wait()  # An async save is complete before the process may exit.
          logging.warning("Preempted: checkpoint saved at step %d; re-run the same command to "
                          "resume.", step)
          break
      if pending_finite is not None:
        check_finite(pending_finite)
      log.flush()
  finally:
    profiler.finish()
    watcher.close()
    try:  # Also when the loop stops on an error: a save in flight completes first.
      checkpointer.wait()
    finally:
      writer.flush()
  return Outcome(state=state, step=step, initial_step=initial_step, eval_metrics=eval_metrics,
                 preempted=preempted, seconds=time.time() - start)


def finish(run: Run, outcome: Outcome) -> dict[str, Any]:
  """The final evaluation and final_metrics.json (or the preemption report); closes the run."""
  checkpointer, writer = run.checkpointer, run.writer
  step = outcome.step
  if outcome.preempted:
    checkpointer.close()
    writer.close()
    print(f"Preempted at step {step}: checkpoint saved in {checkpointer.directory}; re-run the "
          "same command to resume.", flush=True)
    return {"step": step, "preempted": True}
  eval_metrics = outcome.eval_metrics
  if not eval_metrics:  # Nothing left to train: evaluate the restored state.
    eval_metrics = evaluate_state(run, outcome.state)
  trained = step - outcome.initial_step
  eval_metrics.update(step=step, num_params=run.num_params, train_seconds=outcome.seconds,
                      steps_per_second=trained / outcome.seconds if trained > 0 else 0.0)
  if jax.process_index() == 0:
    paths.write_text(paths.join(run.workdir, "final_metrics.json"),
                     json.dumps(eval_metrics, indent=2))
  checkpointer.close()
  writer.close()
  metric = run.datasets.info.metric
  print(f"Final eval at step {step}: {describe_eval(eval_metrics, metric)} "
        f"(NELBO {eval_metrics['eval_loss']:.3f} nats/example) on "
        f"{eval_metrics['eval_examples']} held-out examples; headline: "
        f"{eval_metrics['eval_params']} params, {eval_metrics['eval_params_reason']}.",
        flush=True)
  return eval_metrics


def run(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False,
        mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`: setup, loop, finish. Returns the final eval
  metrics. `mesh`: as `setup`'s."""
  started = setup(config, workdir, allow_config_change, mesh)
  try:
    return finish(started, loop(started))
  finally:
    give_back(started.lease, workdir, created=False)
