"""Async checkpointing (config.async_checkpointing=on; the default for gs:// workdirs) keeps
the guarantees of synchronous saves: kill -9 while a save is in flight leaves the last
complete checkpoint, SIGTERM waits for its save, and the resumed run ends bit-identical to
an uninterrupted synchronous one. The machinery is tests/reliability_test.py's."""

import signal
import subprocess

import pytest

import helpers
import reliability_test as rt

ASYNC = "--config.async_checkpointing=on"


def _start(workdir):
  return subprocess.Popen(rt._cmd(workdir, ASYNC), cwd=rt.REPO, env=rt._env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@rt.SHARES_THE_REFERENCE
def test_async_saves_survive_kill_9_and_sigterm_and_resume_bit_identical(
    tmp_path, uninterrupted_reference):
  workdir = tmp_path / "run"
  # kill -9 just after step 4's checkpoint completed: with a checkpoint every step, step 5's
  # (or 6's) save is in flight in orbax's background thread.
  proc = _start(workdir)
  rt._wait_for_step(workdir, 4, proc)
  proc.kill()
  _, err = proc.communicate()
  assert "Saving (async) checkpoint" in err, err[-3000:]
  survived = helpers.checkpoint_steps(workdir)
  assert survived and survived[-1] >= 4
  # SIGTERM: the run saves at the step it stops at and exits only when that save is complete.
  proc = _start(workdir)
  rt._wait_for_step(workdir, survived[-1] + 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"Resuming from step {survived[-1]}" in err
  stopped_at = int(out.split("Preempted at step ")[1].split(":")[0])
  assert helpers.checkpoint_steps(workdir)[-1] == stopped_at  # Complete and listed at exit.
  final = subprocess.run(rt._cmd(workdir, ASYNC), cwd=rt.REPO, env=rt._env(),
                         capture_output=True, text=True, timeout=600)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f"Resuming from step {stopped_at}" in final.stderr
  rt._assert_bit_identical(rt._final_params(workdir), uninterrupted_reference)
