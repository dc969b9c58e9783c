"""Reliability: SIGTERM, kill -9, exact resume, NaN guard, config safety, bad inputs."""

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from md4_jax.run import saved_config
from md4_jax.run import workdir as workdir_lib
from md4_jax.experiment import build
from md4_jax.run import loop

REPO = helpers.REPO
TOTAL_STEPS = 30
TINY = ["--config.num_samples=0", "--config.eval_every_steps=0", "--config.sample_every_steps=0",
        "--config.log_loss_every_steps=5", f"--config.num_train_steps={TOTAL_STEPS}",
        "--config.checkpoint_every_steps=1", "--config.max_checkpoints_to_keep=2"]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "md4_jax.train", helpers.TINY_DIGITS, f"--workdir={workdir}",
          *TINY, *extra]


def _env():
  return dict(os.environ, XLA_FLAGS=helpers.xla_flags(1))


def _run(workdir, *extra):
  return subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=600)


def _start(workdir, *extra):
  return subprocess.Popen(_cmd(workdir, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = helpers.checkpoint_steps(workdir)
    if steps and steps[-1] >= step:
      return steps[-1]
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  raise TimeoutError(f"step {step} never checkpointed in {workdir}")


def _final_params(workdir):
  _, _, state = workdir_lib.restore_run(str(workdir))
  assert int(state.step) == TOTAL_STEPS
  return jax.device_get(state.params), jax.device_get(state.ema_params)


def _assert_bit_identical(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _kill_9(workdir, step, delay, *extra):
  """Starts a run that resumes `workdir`, kills it (-9) once `step` is checkpointed and
  `delay` seconds have passed, and returns its stderr and the last complete checkpoint."""
  proc = _start(workdir, *extra)
  _wait_for_step(workdir, step, proc)
  time.sleep(delay)
  proc.kill()
  _, err = proc.communicate()
  survived = helpers.checkpoint_steps(workdir)
  assert survived, "no complete checkpoint survived"
  return err, survived[-1]


# Asynchronous saves (the default for gs:// workdirs); switching a resumed run between the modes
# is a safe config change.
ASYNC = ("--config.async_checkpointing=on", "--allow_config_change")
SYNC = ("--config.async_checkpointing=off", "--allow_config_change")


@pytest.mark.slow
def test_kill_9_and_sigterm_sync_and_async_then_resume_is_bit_identical(tmp_path):
  """One run stopped four times, each restart resuming the last, with a checkpoint every step:
  kill -9 right after a synchronous checkpoint; kill -9 right after an asynchronous one
  (the next save is in flight in orbax's background thread); SIGTERM with asynchronous saves
  (the run saves exactly where it stops and exits 0 only when that save is complete); kill -9
  0.13 s after a synchronous checkpoint, when the next write is most likely in flight. Each
  leaves the last complete checkpoint, and the final resume ends bit-identical to an
  uninterrupted run checkpointed only at its end (saving a checkpoint and the data iterator's
  state every step, synchronously or not, must not change a run either)."""
  reference = _run(tmp_path / "reference", f"--config.checkpoint_every_steps={TOTAL_STEPS}")
  assert reference.returncode == 0, reference.stderr[-3000:]
  uninterrupted = _final_params(tmp_path / "reference")

  workdir = tmp_path / "run"
  _, last = _kill_9(workdir, 5, 0.0)

  err, survived = _kill_9(workdir, last + 2, 0.0, *ASYNC)
  assert f"Resuming from step {last}" in err and "Saving (async) checkpoint" in err, err[-3000:]
  assert survived >= last + 2

  proc = _start(workdir, *ASYNC)
  _wait_for_step(workdir, survived + 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"Resuming from step {survived}" in err and "Preempted at step" in out
  stopped_at = int(out.split("Preempted at step ")[1].split(":")[0])
  assert stopped_at < TOTAL_STEPS - 3, stopped_at
  assert helpers.checkpoint_steps(workdir)[-1] == stopped_at  # Complete and listed at exit.

  err, _ = _kill_9(workdir, stopped_at + 2, 0.13, *SYNC)
  assert f"Resuming from step {stopped_at}" in err, err[-3000:]

  final = _run(workdir, *SYNC)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "Resuming from step" in final.stderr
  assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]
  _assert_bit_identical(_final_params(workdir), uninterrupted)


def _tiny_config(**overrides):
  return helpers.digits_tiny(**{**dict(num_samples=0, eval_every_steps=0, sample_every_steps=0,
                                       num_train_steps=8, checkpoint_every_steps=2), **overrides})


@pytest.mark.slow  # An in-process training run (~35 s): the full suite only.
def test_nan_stop_keeps_last_good_checkpoint(tmp_path):
  config = _tiny_config(debug_nan_at_step=3, nan_policy="stop", num_train_steps=6)
  with pytest.raises(loop.NonFiniteError, match="step 4"):  # Step index 3 is the 4th step.
    loop.run(config, str(tmp_path), mesh=helpers.one_device())
  steps = helpers.checkpoint_steps(tmp_path)
  assert steps == [2]  # Nothing written at or after the bad step.
  _, _, state = workdir_lib.restore_run(str(tmp_path))
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.slow
def test_nan_skip_drops_the_update_and_continues(tmp_path):
  config = _tiny_config(debug_nan_at_step=3, nan_policy="skip", log_loss_every_steps=8)
  metrics = loop.run(config, str(tmp_path), mesh=helpers.one_device())
  assert metrics["step"] == 8 and np.isfinite(metrics["eval_bits_per_dim"])
  _, _, state = workdir_lib.restore_run(str(tmp_path))
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(jax.device_get(state.params)))


@pytest.mark.slow
def test_nan_without_guard_still_stops_at_the_log_line(tmp_path):
  config = _tiny_config(debug_nan_at_step=1, check_nans=False, log_loss_every_steps=2)
  with pytest.raises(loop.NonFiniteError, match="up to 2"):
    loop.run(config, str(tmp_path), mesh=helpers.one_device())


class _BadTokens:
  """Wraps a train iterator and corrupts one token of the first batch."""

  def __init__(self, it):
    self._it = it

  def __next__(self):
    batch = dict(next(self._it))
    batch["x"] = batch["x"].copy()
    batch["x"][0, 0, 0, 0] = 99
    return batch


@pytest.mark.parametrize("case, overrides, message", [
    ("schedule", {"noise_schedule": "quadratic"}, "polyK"),
    ("dataset", {"dataset": "mnist"}, "Unknown dataset 'mnist'"),
    ("network", {"network": "resnet"}, "Unknown network"),
    ("data shape", {"data_shape": (8, 8, 3)}, "data_shape"),
    ("vocab", {"vocab_size": 10}, "vocab_size"),
    ("batch", {"batch_size": 12}, "divisible by the 8 batch shards"),
    ("nan policy", {"nan_policy": "ignore"}, "nan_policy"),
    ("no steps", {"num_train_steps": 0}, r"num_train_steps=0 is out of range: it must be >= 1"),
    ("negative lr", {"learning_rate": -1e-3}, r"learning_rate=-0.001 .*must be > 0"),
    ("ema rate", {"ema_rate": 1.0}, r"ema_rate=1.0 .*in \[0, 1\)"),
    ("dropout", {"dropout_rate": 1.5}, r"dropout_rate=1.5 .*in \[0, 1\)"),
    ("sampling steps", {"sampling_steps": 0}, r"sampling_steps=0 .*>= 1"),
    ("chunked loss on a UNet", {"loss_chunk_size": 16}, "loss_chunk_size=16 .*'unet'"),
    ("tokens", {}, r"\[0, 17\)"),
    ("workdir parent", {}, "does not exist"),
    ("workdir is a file", {}, "is a file, not a directory"),
    ("workdir under a file", {}, "is a file, not a directory"),
])
def test_bad_inputs_fail_before_compiling(tmp_path, monkeypatch, case, overrides, message):
  config = _tiny_config(**overrides)
  workdir = str(tmp_path / "run")
  if case == "workdir parent":
    workdir = str(tmp_path / "missing" / "run")
  if case.startswith("workdir") and "file" in case:
    (tmp_path / "file").write_text("")
    workdir = str(tmp_path / "file" / "run") if "under" in case else str(tmp_path / "file")
  if case == "tokens":
    real = loop.data_lib.create_datasets
    def corrupt(cfg, *args):
      ds = real(cfg, *args)
      return dataclasses.replace(ds, train_iter=_BadTokens(ds.train_iter))
    monkeypatch.setattr(loop.data_lib, "create_datasets", corrupt)
  compiled = []
  monkeypatch.setattr(build.Experiment, "init_state", lambda *a: compiled.append(1))
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ValueError, match=message):
    loop.run(config, workdir)  # The 8 devices: batch shards are checked too.
  assert not compiled
  assert sorted(os.listdir(tmp_path)) == before  # Nothing created: no empty workdir left.


def _one_line_error(result, prog="md4_jax"):
  """The single `<prog>: error:` line of a run that failed with exit 2 and no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith(f"{prog}: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


# The command's own failures: a config file that is missing, does not parse or lacks the
# variant, a value the validation refuses (one stands for all: the in-process
# test_bad_inputs_fail_before_compiling checks each message, the contract table the unknown
# key), a workdir that cannot be made.
@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    (["--config=BAD"], "invalid syntax"),
    (["--config=configs/digits.py:typo"], "Unknown variant 'typo' of configs/digits.py"),
    (["--config=configs/digits.py:tiny", "--config.num_train_steps=0"], "num_train_steps=0"),
    (["--config=configs/digits.py:tiny", "--workdir=FILE/run"], "is a file, not a directory"),
])
def test_cli_bad_inputs_are_one_line_exit_2_and_create_nothing(tmp_path, argv, message):
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  (tmp_path / "file").write_text("")
  argv = [a.replace("BAD", str(tmp_path / "bad.py")).replace("FILE", str(tmp_path / "file"))
          for a in argv]
  workdir = [a for a in argv if a.startswith("--workdir=")] or [f"--workdir={tmp_path / 'run'}"]
  argv = [a for a in argv if not a.startswith("--workdir=")]
  result = subprocess.run([sys.executable, "-m", "md4_jax.train", *argv, *workdir], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
  assert message in _one_line_error(result)
  assert sorted(os.listdir(tmp_path)) == ["bad.py", "file"]


@pytest.mark.slow
def test_other_clis_report_bad_flags_in_one_line(tmp_path):
  result = helpers.run_module("md4_jax.evaluate", f"--workdir={tmp_path}", "--num_t_samples=0")
  assert "num_t_samples must be >= 1" in _one_line_error(result, "md4_jax.evaluate")


@pytest.mark.slow
def test_config_changes_on_resume(tmp_path):
  config = _tiny_config(num_train_steps=2, checkpoint_every_steps=2)
  loop.run(config, str(tmp_path), mesh=helpers.one_device())
  changed_model = _tiny_config(num_train_steps=2)
  changed_model.unet.channels = 16
  with pytest.raises(ValueError, match=r"unet.channels: 8 -> 16"):
    loop.run(changed_model, str(tmp_path), mesh=helpers.one_device())
  longer = _tiny_config(num_train_steps=3, checkpoint_every_steps=2)
  with pytest.raises(ValueError, match="--allow_config_change"):
    loop.run(longer, str(tmp_path), mesh=helpers.one_device())
  one = helpers.one_device()
  assert loop.run(longer, str(tmp_path), allow_config_change=True, mesh=one)["step"] == 3
  assert saved_config.load_config(str(tmp_path)).num_train_steps == 3
  # Knobs proven numerically equivalent are safe to change; the parameter layout is not.
  knobs = _tiny_config(num_train_steps=3, checkpoint_every_steps=2, remat_policy="full",
                       attention_impl="chunked", grad_accum_steps=2)
  assert loop.run(knobs, str(tmp_path), allow_config_change=True, mesh=one)["step"] == 3
  layout = _tiny_config(num_train_steps=3, checkpoint_every_steps=2, scan_layers=True)
  with pytest.raises(ValueError, match="scan_layers: False -> True"):
    loop.run(layout, str(tmp_path), allow_config_change=True, mesh=helpers.one_device())
  for name in ("run_info.json", "config.json"):
    assert (tmp_path / name).exists()
