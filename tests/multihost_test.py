"""Two processes on localhost (jax.distributed + gloo): same losses as one process."""

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

pytestmark = pytest.mark.slow  # Two JAX processes per run.

REPO = helpers.REPO
ARGS = [helpers.TINY_DIGITS, "--config.num_train_steps=4", "--config.log_loss_every_steps=1",
        "--config.num_samples=0", "--config.eval_every_steps=0",
        "--config.checkpoint_every_steps=4"]


def _losses(log: str) -> list[float]:
  return [float(m) for m in
          re.findall(r"\] train_bits_per_dim=[^\n]* train_loss=([0-9.eE+-]+),", log)]


def test_two_processes_match_one_process_and_checkpoint_restores(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, WORKDIR_LOGS=str(tmp_path / "logs"),
             PORT=str(20000 + os.getpid() % 20000))
  env.pop("XLA_FLAGS", None)
  two = subprocess.run(["bash", "launch/local.sh", "2", "4", f"--workdir={tmp_path / 'two'}", *ARGS],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / "logs" / f"proc_{i}.log").read_text() for i in range(2)]
  assert two.returncode == 0, logs[0][-3000:] + logs[1][-3000:]

  one = subprocess.run([sys.executable, "-m", "md4_jax.train", f"--workdir={tmp_path / 'one'}", *ARGS],
                       cwd=REPO, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]

  two_losses, one_losses = _losses(logs[0]), _losses(one.stderr)
  assert len(one_losses) == 4 and len(two_losses) == 4, (two_losses, one_losses)
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-4)
  # Evaluation covered the held-out split exactly once across the two processes.
  assert "on 300 held-out examples" in logs[0] and "on 300 held-out examples" in logs[1]

  # The 2-process checkpoint restores in this single process (8 local devices).
  _, _, two_state = workdir_lib.restore_run(str(tmp_path / "two"))
  _, _, one_state = workdir_lib.restore_run(str(tmp_path / "one"))
  assert int(two_state.step) == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4),
               jax.device_get(two_state.params), jax.device_get(one_state.params))


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


def test_preempting_one_process_checkpoints_both_at_one_step_and_resumes(tmp_path):
  """SIGTERM to process 0 only: JAX's preemption sync point stops both processes at the
  same step with one checkpoint, both exit 0, and the 2-process run resumes from it."""
  logs = tmp_path / "logs"
  env = dict(os.environ, PYTHON=sys.executable, WORKDIR_LOGS=str(logs),
             PORT=str(20000 + (os.getpid() + 7) % 20000))
  env.pop("XLA_FLAGS", None)
  args = [f"--workdir={tmp_path / 'run'}", *ARGS, "--config.num_train_steps=100000",
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
  assert 3 <= stopped_at < 100000
  _, _, state = workdir_lib.restore_run(str(tmp_path / "run"))
  assert int(state.step) == stopped_at

  resumed = subprocess.run(["bash", "launch/local.sh", "2", "4", *args[:-2],
                            f"--config.num_train_steps={stopped_at + 2}",
                            "--config.checkpoint_every_steps=100000", "--allow_config_change"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  texts = [(logs / f"proc_{i}.log").read_text() for i in range(2)]
  assert resumed.returncode == 0, texts[0][-3000:] + texts[1][-3000:]
  assert all(f"Resuming from step {stopped_at}" in text for text in texts)
  assert len(_losses(texts[0])) == 2
