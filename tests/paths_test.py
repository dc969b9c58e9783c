"""The path layer (md4_jax/paths.py) without a bucket: local files, schemes no client serves,
a missing gcs extra. Everything on gs:// itself is in tests/gcs_test.py (an emulator)."""

import os
import subprocess
import sys

import pytest

from md4_jax import paths

import helpers


def test_local_files_round_trip_and_glob(tmp_path):
  target = paths.join(str(tmp_path), "a", "b", "x.txt")
  paths.write_text(target, "hi")  # Parent folders are created.
  paths.write_bytes(paths.join(str(tmp_path), "a", "y.bin"), b"\0\1")
  assert paths.read_text(target) == "hi"
  assert paths.glob(str(tmp_path / "a"), "*.bin") == [str(tmp_path / "a" / "y.bin")]
  assert paths.local_copy(target) == target  # Local: no copy.
  paths.move_tree(str(tmp_path / "a"), str(tmp_path / "moved" / "a"))
  assert paths.read_text(str(tmp_path / "moved" / "a" / "b" / "x.txt")) == "hi"


def test_a_scheme_no_client_serves_is_one_line():
  with pytest.raises(ValueError, match=r"^--workdir=s3://b/run: md4_jax reads and writes local "
                     r"paths and gs:// only, not s3://\.$"):
    paths.check_served("s3://b/run", "--workdir")
  paths.check_served("/tmp/local", "--workdir")  # Local paths pass.


def test_gs_without_the_gcs_extra_names_the_extra(monkeypatch):
  monkeypatch.setattr(paths, "_missing", lambda modules: list(modules))
  with pytest.raises(ValueError, match=r'gs:// paths need the Cloud Storage clients \(gcsfs, '
                     r'google.cloud.storage missing\): pip install -e "\.\[gcs\]"$'):
    paths.check_reachable("gs://bucket/run", "--workdir")


def test_the_mirror_uploads_only_new_or_changed_files(tmp_path, monkeypatch):
  sent = {}
  monkeypatch.setenv("MD4_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(paths, "write_bytes", lambda p, data: sent.__setitem__(p, data))
  os.makedirs(tmp_path / "cache" / "gs" / "b" / "run", exist_ok=True)
  old = tmp_path / "cache" / "gs" / "b" / "run" / "old.events"
  old.write_bytes(b"earlier run")
  os.utime(old, (1, 1))  # Written long before this mirror: not sent again.
  mirror = paths.Mirror("gs://b/run")
  assert mirror.local == str(tmp_path / "cache" / "gs" / "b" / "run")
  (tmp_path / "cache" / "gs" / "b" / "run" / "plugins").mkdir()
  (tmp_path / "cache" / "gs" / "b" / "run" / "plugins" / "t.pb").write_bytes(b"1")
  assert mirror.sync() == ["gs://b/run/plugins/t.pb"] and sent == {"gs://b/run/plugins/t.pb": b"1"}
  assert mirror.sync() == []  # Unchanged.
  assert paths.Mirror(str(tmp_path / "local")).sync() == []  # A local target is written in place.


@pytest.mark.slow
def test_train_on_an_unservable_scheme_is_one_line_and_creates_nothing(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "md4_jax.train", f"--config={helpers.REPO}/configs/digits.py:tiny",
       "--workdir=s3://b/run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=helpers.REPO))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "md4_jax: error: --workdir=s3://b/run: md4_jax reads and writes local paths and gs:// "
      "only, not s3://.")
  assert os.listdir(tmp_path) == []
