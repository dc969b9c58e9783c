"""Tests of md4_jax.evaluate on a tiny digits checkpoint trained once per module."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from md4_jax import evaluate
from md4_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def _run(module, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 30-step digits run (2 devices); no periodic samples, to save compiling the sampler."""
  workdir = tmp_path_factory.mktemp("evaluate") / "run"
  result = _run("md4_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
                f"--config.num_train_steps={STEPS}", "--config.unet.channels=8",
                "--config.unet.channel_mult=(1,)", "--config.unet.attn_resolutions=()",
                "--config.unet.embed_dim=4", "--config.batch_size=16",
                "--config.eval_batch_size=100", "--config.num_samples=0")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh({"data": -1}, devices=jax.devices()[:2])


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
  assert report["nelbo_diff"] + report["nelbo_recon"] == pytest.approx(report["nelbo"])
  assert "perplexity" not in report
  [line] = result.stdout.strip().splitlines()
  assert "bits/dim" in line and "300 examples" in line and str(path) in line


def test_more_time_samples_shrink_the_standard_error(run_dir, mesh):
  one, eight = (evaluate.evaluate_checkpoint(str(run_dir), num_t_samples=k, mesh=mesh, seed=k)
                for k in (1, 8))
  assert eight["nelbo_stderr"] < 0.5 * one["nelbo_stderr"], (one, eight)
  # Both estimate the same NELBO: they agree within their errors.
  gap = abs(one["nelbo"] - eight["nelbo"])
  assert gap < 4 * math.hypot(one["nelbo_stderr"], eight["nelbo_stderr"])


@pytest.mark.parametrize("split, batch_size, examples", [("test", 64, 300), ("train", 200, 1497)])
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


def test_units_by_dataset_and_perplexity():
  assert evaluate.bits_metric("digits", "image") == "bits_per_dim"
  assert evaluate.bits_metric("text8", "text") == "bits_per_char"
  assert evaluate.bits_metric("openwebtext", "text") == "bits_per_token"
  out = evaluate.bits_and_perplexity(3000.0, 10.0, 1024, "bits_per_token")
  assert out["perplexity"] == pytest.approx(2 ** out["bits_per_token"])
  assert out["perplexity"] == pytest.approx(math.exp(3000 / 1024))
  assert out["perplexity_stderr"] == pytest.approx(out["perplexity"] * 10 / 1024)
  assert "perplexity" not in evaluate.bits_and_perplexity(300.0, 1.0, 256, "bits_per_char")
  report = dict(workdir="/w", step=5, split="train[:100]", params="ema", num_t_samples=4,
                dataset="openwebtext", examples=7, metric="bits_per_token", nelbo=3000.0,
                nelbo_stderr=10.0, **out)
  assert evaluate.report_path(report) == "/w/eval/step_00000005_train_100_ema_k4.json"
  line = evaluate.summary(report)
  assert "perplexity 18.7" in line and "bits/token" in line and "nats/example" in line


def test_no_checkpoint_is_a_one_line_error(run_dir, tmp_path):
  shutil.copy(run_dir / "config.json", tmp_path / "config.json")
  result = _run("md4_jax.evaluate", f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if "md4_jax.evaluate: error" in l]
  assert len(errors) == 1 and "No checkpoint" in errors[0], result.stderr[-2000:]
  assert not (tmp_path / "eval").exists()
