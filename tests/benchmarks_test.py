"""The benchmark scripts run as the README says, at tiny settings.

Their numbers are recorded in benchmarks/RESULTS.md by full runs; these runs
only keep the scripts working and check what does not depend on timing: the
tables' shape and the network-call counts of the samplers. The training and
sampling benchmarks run with TensorFlow, TFDS, grain and clu made unimportable,
as on accelerator images that lack them (they need only md4_jax.experiment.build).
"""

import os
import subprocess
import sys

import pytest

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # Each script is a fresh process that compiles its rows.

# Runs a script with these top-level packages unimportable.
_WITHOUT = """
import importlib.abc, runpy, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Blocker())
sys.argv = {argv!r}
sys.path.insert(0, {repo!r})
runpy.run_path(sys.argv[0], run_name="__main__")
"""
NO_TF = ("tensorflow", "tensorflow_datasets", "grain", "clu")


def _run(script, *args, without=()):
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(1))
  argv = [os.path.join("benchmarks", script), *args]
  if without:
    argv = ["-c", _WITHOUT.format(blocked=tuple(without), argv=argv, repo=REPO)]
  out = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _table(stdout, first_header):
  """Rows of the markdown table whose first header cell is `first_header`."""
  lines = [l for l in stdout.splitlines() if l.startswith("|")]
  start = next(i for i, l in enumerate(lines) if l.split("|")[1].strip() == first_header)
  header = [c.strip() for c in lines[start].strip("|").split("|")]
  rows = []
  for line in lines[start + 2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) != len(header) or cells[0] == header[0]:
      break
    rows.append(dict(zip(header, cells)))
  return rows


def test_sample_benchmark():
  steps = 8
  rows = _table(_run("sample.py", "--only=digits", "--repeats=1", f"--digits_steps={steps}",
                     "--digits_batch=8", without=NO_TF), "setup")
  nfe = {r["sampler"]: int(r["NFE / sample"]) for r in rows}
  assert set(nfe) == {"ancestral (every step)", "ancestral (skip idle)",
                      "ancestral (float32 ref.)", "topp 0.9", "mean", "first_hitting"}
  assert nfe["ancestral (every step)"] == steps
  assert nfe["first_hitting"] == 8 * 8  # One call per position of the 8x8 image.
  assert 1 <= nfe["ancestral (skip idle)"] <= steps
  assert all(float(r["samples / s"]) > 0 for r in rows)


def test_train_benchmark():
  # The GenMD4 row: the UNet of the `image` row on K = 2 masked copies of each example, at
  # batch 1 (one device) instead of the row's 8, so each step costs an eighth.
  stdout = _run("train.py", "--variants=image_genmd4", "--warmup=1", "--steps=1",
                "--repeats=1", "--dot_size=256", "--peak_tflops=1", "--batch_per_device=1",
                without=NO_TF)
  (row,) = _table(stdout, "variant")
  assert row["variant"] == "image_genmd4" and row["params"] == "4.8M"
  # Twice the image row's 97.5 GFLOP at batch 8 (benchmarks/RESULTS.md), per example: the
  # network sees 2B examples.
  assert abs(float(row["model GFLOP/step"]) - 2 * 97.5 / 8) < 0.05, row
  assert float(row["steps/s"]) > 0
  assert float(row["model/dot (min-max)"].split()[0].strip("*")) > 0
  # MFU against the given 1 TFLOP/s peak (one device) = model GFLOP/s / 1000.
  mfu = float(row["MFU (datasheet)"].rstrip("%")) / 100
  assert abs(mfu - float(row["model GFLOP/s"]) / 1000) < 1e-3


def test_data_benchmark():
  stdout = _run("data.py", "--datasets=digits", "--workers=0", "--prefetch=2", "--repeats=1",
                "--batches=1", "--warmup=1", "--warmup_s=0", "--window_s=0")
  (row,) = _table(stdout, "dataset")
  assert row["dataset"] == "digits" and row["batch"] == "64"
  assert float(row["examples/s median (min-max)"].split()[0].replace(",", "")) > 0


def test_checkpoint_benchmark():
  rows = _table(_run("checkpoint.py", "--config=tiny", "--repeats=1"),
                "operation")
  assert [r["operation"] for r in rows] == ["checksums alone", "save", "restore"]
  assert float(rows[0]["with checksums s"]) > 0
  assert all(float(r["without checksums s"]) > 0 for r in rows[1:])


def test_sample_quality_benchmark(tmp_path):
  """The frontier script on untrained tiny runs: every row scored, the table, JSON and plot."""
  import json  # pylint: disable=g-import-not-at-top
  from md4_jax.configs import digits, synthetic_text  # pylint: disable=g-import-not-at-top
  text = helpers.saved_workdir(tmp_path / "text", synthetic_text.get_config("tiny"))
  image = helpers.saved_workdir(tmp_path / "image", digits.get_config("tiny_cond"))
  out = tmp_path / "quality"
  stdout = _run("sample_quality.py", f"--text_workdir={text}", f"--image_workdir={image}",
                "--steps=4", "--num_samples=20", "--guidance=0,1",
                "--text_samplers=remdm-cap0.02,first_hitting",
                "--image_samplers=ancestral", f"--out={out}")
  results = json.loads(open(f"{out}.json").read())
  text_rows = {r["sampler"]: r for r in results["text"]["rows"]}
  assert set(text_rows) == {"remdm-cap0.02", "first_hitting"}
  assert text_rows["remdm-cap0.02"]["nfe"] == 4 and text_rows["first_hitting"]["nfe"] == 32
  assert all(r["nll_bits"] > 0 for r in text_rows.values())
  image_rows = results["image"]["rows"]
  assert [r["guidance"] for r in image_rows] == [0.0, 1.0]
  assert all(0 <= r["accuracy"] <= 1 and r["fd"] >= 0 for r in image_rows)
  assert os.path.getsize(f"{out}.png") > 1000
  assert len(_table(stdout, "sampler")) == 2


def test_frechet_distance_is_zero_on_equal_sets_and_the_squared_shift_for_a_moved_one():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "sample_quality", os.path.join(REPO, "benchmarks", "sample_quality.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  rng = np.random.default_rng(0)
  a = np.maximum(rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)), 0.0)
  a[:, 2] = 0.0  # A dead feature: singular covariance.
  assert abs(module.frechet_distance(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))
  shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 0.0])
  assert module.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_paper_configs_benchmark():
  stdout = _run("paper_configs.py", "--configs=text8", "--batch=1", without=NO_TF)
  (row,) = _table(stdout, "config")
  assert row["config"] == "`text8`" and row["params"] == "88.7M", row
  # 3 x 2 x (matmul parameters per token) + attention: 12 blocks of 7.08M -> ~0.55 GFLOP.
  assert 0.5 < float(row["model GFLOP / position"]) < 0.6, row
  assert 0 < float(row["GiB at batch 1"]) < float(row["GiB at batch 2"]), row
  assert int(row["largest batch in 80 GiB"]) < int(row["largest batch in 141 GiB"]), row


def test_gcs_cache_benchmark():
  """text8 through the cache on the emulator: the copy once, then a hit."""
  stdout = _run("gcs_cache.py", "--megabytes=1", "--repeats=1")
  row = next(l for l in stdout.splitlines() if l.startswith("| 1 MB |"))
  assert "first start (copy)" in row and "later start" in row


def test_async_checkpoint_benchmark():
  """Tiny settings on the local disk (RESULTS.md has the MD4-S numbers, local and on the
  emulator): a stall per save for each mode, never longer than the save takes to be durable."""
  rows = _table(_run("async_checkpoint.py", "--config=tiny", "--repeats=1", "--targets=local"),
                "target")
  assert [(r["target"], r["save"]) for r in rows] == [("local", "sync"), ("local", "async")]
  for row in rows:
    assert 0 < float(row["loop stall per save s"]) <= float(row["durable after s"])
