"""One run per workdir: the lease protocol, and two trainings started on one workdir."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import helpers
from md4_jax.run import lease as lease_lib
from md4_jax.run import workdir as workdir_lib


class Clock:
  def __init__(self, now: float = 1_000_000.0):
    self.now = now

  def __call__(self) -> float:
    return self.now


def _lease(workdir, clock=None, **kwargs) -> lease_lib.Lease:
  return lease_lib.Lease(lease_lib.LocalStore(str(workdir)), str(workdir),
                         heartbeat_seconds=3600, clock=clock or time.time, **kwargs)


def _holder(workdir) -> dict:
  with open(os.path.join(workdir, lease_lib.LEASE_FILE)) as f:
    return json.load(f)


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  first = _lease(tmp_path)
  first.acquire()
  held = _holder(tmp_path)
  assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
  with pytest.raises(lease_lib.WorkdirInUseError,
                     match=rf"in use by {socket.gethostname()}:{os.getpid()} since .* UTC"):
    _lease(tmp_path).acquire()
  assert _holder(tmp_path) == held  # The refused start changed nothing.
  first.release()
  assert not os.path.exists(tmp_path / lease_lib.LEASE_FILE)
  second = _lease(tmp_path)
  second.acquire()  # Free again.
  second.release()


def test_of_many_simultaneous_starts_exactly_one_wins(tmp_path):
  results, barrier = [], threading.Barrier(8)

  def start():
    lease = _lease(tmp_path)
    barrier.wait()
    try:
      lease.acquire()
      results.append(lease)
    except lease_lib.WorkdirInUseError:
      results.append(None)

  threads = [threading.Thread(target=start) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [r for r in results if r is not None]
  assert len(results) == 8 and len(winners) == 1
  assert _holder(tmp_path)["run_id"] == winners[0].holder.run_id
  winners[0].release()


def test_heartbeat_keeps_a_lease_and_its_absence_makes_it_stale(tmp_path):
  clock = Clock()
  first = _lease(tmp_path, clock, stale_seconds=300)
  first.acquire()
  clock.now += 250
  assert first.beat()  # Refreshed: 250 s later it is fresh again.
  assert _holder(tmp_path)["heartbeat"] == clock.now
  clock.now += 299
  with pytest.raises(lease_lib.WorkdirInUseError, match="heartbeat 299 s ago"):
    _lease(tmp_path, clock, stale_seconds=300).acquire()
  clock.now += 2  # 301 s without a heartbeat: stale.
  second = _lease(tmp_path, clock, stale_seconds=300)
  second.acquire()
  assert _holder(tmp_path)["run_id"] == second.holder.run_id
  # The old holder notices, refuses to write, and does not remove the new lease.
  with pytest.raises(lease_lib.WorkdirInUseError, match="taken over by another run"):
    first.check()
  assert first.lost
  first.release()
  assert _holder(tmp_path)["run_id"] == second.holder.run_id
  second.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  pid = int(dead.stdout)
  now = time.time()
  stale = lease_lib.Holder(host=socket.gethostname(), pid=pid, started=now, heartbeat=now,
                           run_id="killed")
  (tmp_path / lease_lib.LEASE_FILE).write_text(stale.to_json())
  assert "is gone" in lease_lib.stale_reason(stale, now, 300)
  # The same pid on another host is alive as far as this host can tell.
  assert lease_lib.stale_reason(stale, now, 300, host="elsewhere") is None
  lease = _lease(tmp_path)
  lease.acquire()
  assert _holder(tmp_path)["pid"] == os.getpid()
  lease.release()


def test_processes_of_one_run_share_the_lease(tmp_path):
  workdir = str(tmp_path / "run")
  told = []

  def broadcast(value):  # Process 0's value reaches every process.
    told.append(value)
    return value

  lease = lease_lib.acquire_for_run(workdir, 0, 2, broadcast)
  assert told == [0] and _holder(workdir)["process_count"] == 2
  # Process 1 takes no lease of its own and learns that process 0 holds one.
  assert lease_lib.acquire_for_run(workdir, 1, 2, lambda v: 0) is None
  # Another run's process 1 learns that its process 0 was refused.
  with pytest.raises(lease_lib.WorkdirInUseError):
    lease_lib.acquire_for_run(workdir, 1, 2, lambda v: 1)
  with pytest.raises(lease_lib.WorkdirInUseError, match="in use by"):
    lease_lib.acquire_for_run(workdir, 0, 2, lambda v: v)
  lease.release()


def _train(workdir, *extra, background=False):
  args = [sys.executable, "-m", "md4_jax.train", helpers.TINY_DIGITS, f"--workdir={workdir}",
          "--config.num_train_steps=12", "--config.checkpoint_every_steps=6",
          "--config.eval_every_steps=0", "--config.sample_every_steps=0", *extra]
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1),
             JAX_PLATFORMS="cpu")
  if background:
    return subprocess.Popen(args, cwd=helpers.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(args, cwd=helpers.REPO, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_two_trainings_on_one_workdir(tmp_path):
  shared, alone = tmp_path / "shared", tmp_path / "alone"
  first = _train(shared, background=True)
  deadline = time.time() + 300
  while not (shared / lease_lib.LEASE_FILE).exists():
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.2)
  # A second start with another network width: refused, naming the holder, nothing touched.
  held = _holder(shared)
  second = _train(shared, "--config.unet.channels=16")
  assert second.returncode == 2, second.stderr
  last = second.stderr.strip().splitlines()[-1]
  assert f"in use by {socket.gethostname()}:{first.pid} since" in last, last
  assert _holder(shared)["run_id"] == held["run_id"]
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err
  assert not (shared / lease_lib.LEASE_FILE).exists()  # Released at the end.
  # The first run ends exactly where a run alone ends.
  assert _train(alone).returncode == 0
  assert helpers.checkpoint_steps(str(shared)) == helpers.checkpoint_steps(str(alone)) == [6, 12]
  _, _, got = workdir_lib.restore_run(str(shared))
  _, _, want = workdir_lib.restore_run(str(alone))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (json.loads((shared / "final_metrics.json").read_text())["eval_loss"]
          == json.loads((alone / "final_metrics.json").read_text())["eval_loss"])


@pytest.mark.slow  # Writes and restores a checkpoint (~15 s).
def test_readers_never_see_a_checkpoint_still_being_written(tmp_path):
  # sample/evaluate take no lease and may run beside training: a step whose write is in
  # flight (orbax writes into a temporary directory and renames it when complete) is invisible.
  workdir = helpers.saved_workdir(tmp_path / "run", helpers.digits_tiny(), step=5)
  checkpoints = tmp_path / "run" / "checkpoints"
  shutil.copytree(checkpoints / "5", checkpoints / "7.orbax-checkpoint-tmp-1796440000")
  (checkpoints / "7.orbax-checkpoint-tmp-1796440000" / "commit_success.txt").unlink()
  assert workdir_lib.checkpoint_steps(workdir) == [5]
  _, _, state = workdir_lib.restore_run(workdir)
  assert int(state.step) == 5
