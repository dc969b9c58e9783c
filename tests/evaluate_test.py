"""Tests of md4_jax.evaluate on a tiny digits checkpoint written once per module.

The checkpoint is a freshly initialised state saved in-process (config.json +
checkpoints/30): the evaluation does not care whether it was trained, and
writing it costs a fraction of a training subprocess.
"""

import json
import math
import subprocess
import sys
import shutil

import jax
import numpy as np
import pytest

import helpers
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax import evaluate
from md4_jax.experiment import parallel
from md4_jax.run import saved_config
from md4_jax.experiment import build

# The checkpoint is written once: these tests stay on one xdist worker.
pytestmark = pytest.mark.xdist_group("evaluate")

STEPS = 30


def _run(module, *args):
  return helpers.run_module(module, *args, devices=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A digits:tiny workdir with one checkpoint at step 30 (saved from 2 devices)."""
  workdir = tmp_path_factory.mktemp("evaluate") / "run"
  config = helpers.digits_tiny()
  workdir.mkdir()
  saved_config.save_config(config, str(workdir))
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(str(workdir)))
  mesh = parallel.make_mesh({"data": -1}, devices=jax.devices()[:2])
  checkpointer.save(STEPS, build.setup(config, mesh).init_state().replace(step=STEPS))
  checkpointer.close()
  return workdir


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh({"data": -1}, devices=jax.devices()[:2])


@pytest.mark.slow
def test_cli_reports_bits_per_dim_and_writes_json(run_dir):
  result = _run("md4_jax.evaluate", f"--workdir={run_dir}", "--num_t_samples=2")
  assert result.returncode == 0, result.stderr[-3000:]
  path = run_dir / "eval" / f"step_{STEPS:08d}_test_ema_k2.json"
  report = json.loads(path.read_text())
  assert (report["step"], report["split"], report["params"]) == (STEPS, "test", "ema")
  assert (report["examples"], report["num_t_samples"], report["metric"]) == (300, 2, "bits_per_dim")
  assert np.isfinite(report["bits_per_dim"]) and 0 < report["bits_per_dim"] < 10
  assert report["bits_per_dim"] == pytest.approx(report["nelbo"] / (64 * math.log(2)))
  assert 0 < report["bits_per_dim_stderr"] < 0.5
  assert (report["nelbo_diff"] + report["nelbo_recon"] + report["nelbo_prior"]
          == pytest.approx(report["nelbo"]))
  assert "perplexity" not in report
  [line] = result.stdout.strip().splitlines()
  assert "bits/dim" in line and "300 examples" in line and str(path) in line


@pytest.mark.slow
def test_more_time_samples_shrink_the_standard_error(run_dir, mesh):
  one, eight = (evaluate.evaluate_checkpoint(str(run_dir), num_t_samples=k, mesh=mesh, seed=k)
                for k in (1, 8))
  assert eight["nelbo_stderr"] < 0.5 * one["nelbo_stderr"], (one, eight)
  # Both estimate the same NELBO: they agree within their errors.
  gap = abs(one["nelbo"] - eight["nelbo"])
  assert gap < 4 * math.hypot(one["nelbo_stderr"], eight["nelbo_stderr"])


@pytest.mark.parametrize("split, batch_size, examples", [
    ("test", 64, 300), pytest.param("train", 200, 1497, marks=pytest.mark.slow)])
def test_every_example_counts_once(run_dir, mesh, split, batch_size, examples):
  # Neither split fills its last batch: the weight-0 padding must not count.
  report = evaluate.evaluate_checkpoint(str(run_dir), split=split, batch_size=batch_size,
                                        params="raw", mesh=mesh)
  assert (report["split"], report["examples"], report["params"]) == (split, examples, "raw")
  assert np.isfinite(report["nelbo"])


def test_bad_arguments_are_clear_errors(run_dir, tmp_path, mesh):
  with pytest.raises(ValueError, match=f"step 7 .*saved steps: {STEPS}"):
    evaluate.evaluate_checkpoint(str(run_dir), step=7, mesh=mesh)
  with pytest.raises(ValueError, match="no split 'valid'.*train, test"):
    evaluate.evaluate_checkpoint(str(run_dir), split="valid", mesh=mesh)
  with pytest.raises(ValueError, match="divisible"):
    evaluate.evaluate_checkpoint(str(run_dir), batch_size=99, mesh=mesh)
  with pytest.raises(FileNotFoundError, match="config.json"):
    evaluate.evaluate_checkpoint(str(tmp_path), mesh=mesh)
  with pytest.raises(ValueError, match="num_t_samples must be >= 1"):
    evaluate.evaluate_checkpoint(str(run_dir), num_t_samples=0, mesh=mesh)


@pytest.mark.slow
def test_no_checkpoint_is_a_one_line_error(run_dir, tmp_path):
  shutil.copy(run_dir / "config.json", tmp_path / "config.json")
  result = _run("md4_jax.evaluate", f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if "md4_jax.evaluate: error" in l]
  assert len(errors) == 1 and "No checkpoint" in errors[0], result.stderr[-2000:]
  assert not (tmp_path / "eval").exists()


def test_evaluate_needs_no_training_loop_clu_or_tensorflow():
  code = ("import sys, md4_jax.evaluate; "
          "print(sorted(m for m in ('md4_jax.run.loop', 'clu', 'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().splitlines()[-1] == "[]"
