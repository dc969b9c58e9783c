"""Two processes on localhost (jax.distributed + gloo), preempted and resumed: the same losses
as one process."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from md4_jax.run import workdir as workdir_lib

# Two JAX processes per run; one test at a time (one worker), so they never share a port.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]

REPO = helpers.REPO
# A warm-up then a constant learning rate: the step's program does not depend on
# num_train_steps, so the pair resumed with another step count follows the one-process run and
# reuses its compiled step from the session's compilation cache.
ARGS = [helpers.TINY_DIGITS, "--config.lr_schedule=constant", "--config.warmup_steps=100",
        "--config.log_loss_every_steps=1", "--config.num_samples=0",
        "--config.eval_every_steps=0"]


def _losses(log: str) -> list[float]:
  return [float(m) for m in
          re.findall(r"\] train_bits_per_dim=[^\n]* train_loss=([0-9.eE+-]+),", log)]


def _children(pid: int) -> list[int]:
  """PIDs whose parent is `pid` (Linux /proc; no extra dependency)."""
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          stat = f.read()
      except OSError:
        continue
      if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
        out.append(int(entry))
  return out


def test_two_processes_preempted_and_resumed_match_one_process(tmp_path):
  """SIGTERM to process 0 only: JAX's preemption sync point stops both processes at the
  same step with one checkpoint, and both exit 0. The pair resumes from it, and every step's
  loss equals an uninterrupted one-process run's (the learning rate does not depend on the
  changed step count); evaluation covers the held-out split once
  across the two processes, and the pair's checkpoint restores in one process (8 local
  devices) with the one-process run's parameters."""
  logs = tmp_path / "logs"
  env = dict(os.environ, PYTHON=sys.executable, WORKDIR_LOGS=str(logs),
             PORT=str(20000 + os.getpid() % 20000))
  env["XLA_FLAGS"] = helpers.FAST_COMPILE  # launch/local.sh adds the device count.
  args = [f"--workdir={tmp_path / 'two'}", *ARGS, "--config.num_train_steps=100000",
          "--config.checkpoint_every_steps=100000"]
  launcher = subprocess.Popen(["bash", "launch/local.sh", "2", "4", *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  log0 = logs / "proc_0.log"
  deadline = time.time() + 300
  while not (log0.exists() and len(_losses(log0.read_text())) >= 3):
    assert launcher.poll() is None and time.time() < deadline, (
        log0.read_text()[-3000:] if log0.exists() else "no log")
    time.sleep(0.2)
  workers = sorted(_children(launcher.pid))
  assert len(workers) == 2, workers
  os.kill(workers[0], signal.SIGTERM)  # Started first: process 0.
  launcher.communicate(timeout=300)
  texts = [(logs / f"proc_{i}.log").read_text() for i in range(2)]
  assert launcher.returncode == 0, texts[0][-3000:] + texts[1][-3000:]
  stops = [re.findall(r"Preempted at step (\d+):", text) for text in texts]
  assert len(stops[0]) == 1 and stops[0] == stops[1], stops  # The same step on both.
  stopped_at = int(stops[0][0])
  assert 3 <= stopped_at < 90, stopped_at  # Within the 100 warm-up steps, with room to resume.
  two_losses = _losses(texts[0])
  assert len(two_losses) == stopped_at, (two_losses, stopped_at)
  _, _, state = workdir_lib.restore_run(str(tmp_path / "two"))
  assert int(state.step) == stopped_at

  total = stopped_at + 2
  resumed = subprocess.run(["bash", "launch/local.sh", "2", "4", *args[:-2],
                            f"--config.num_train_steps={total}",
                            "--config.checkpoint_every_steps=100000", "--allow_config_change"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  texts = [(logs / f"proc_{i}.log").read_text() for i in range(2)]
  assert resumed.returncode == 0, texts[0][-3000:] + texts[1][-3000:]
  assert all(f"Resuming from step {stopped_at}" in text for text in texts)
  two_losses += _losses(texts[0])
  # Evaluation covered the held-out split exactly once across the two processes.
  assert "on 300 held-out examples" in texts[0] and "on 300 held-out examples" in texts[1]

  one = subprocess.run([sys.executable, "-m", "md4_jax.train", f"--workdir={tmp_path / 'one'}",
                        *ARGS, f"--config.num_train_steps={total}",
                        "--config.checkpoint_every_steps=100000"], cwd=REPO,
                       env=dict(os.environ, XLA_FLAGS=helpers.xla_flags(8)),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  one_losses = _losses(one.stderr)
  assert len(one_losses) == len(two_losses) == total, (two_losses, one_losses)
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-4)

  # The 2-process checkpoint restores in this single process (8 local devices).
  _, _, two_state = workdir_lib.restore_run(str(tmp_path / "two"))
  _, _, one_state = workdir_lib.restore_run(str(tmp_path / "one"))
  assert int(two_state.step) == int(one_state.step) == total
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4),
               jax.device_get(two_state.params), jax.device_get(one_state.params))
