"""`python -m md4_jax.sample`: images with labels and a trajectory, a text
prompt, and a clean error without a checkpoint.

The workdirs are written in-process (config.json + an untrained checkpoint),
which is much faster than a training subprocess; each CLI run still costs
~10 s, so there are three.
"""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import helpers
from md4_jax.configs import digits
from md4_jax.configs import text8 as text8_config
from md4_jax.run import saved_config

# Each CLI run is a fresh process (~10 s of start-up and compiles): marked slow.


def _make_workdir(path, config):
  """config.json and one checkpoint of a freshly initialised state (8-device mesh)."""
  return helpers.saved_workdir(path, config, step=0)


def _sample_cli(workdir, *flags):
  return helpers.run_module("md4_jax.sample", f"--workdir={workdir}", *flags)


@pytest.mark.slow
def test_class_conditional_images_with_trajectory(tmp_path):
  config = helpers.digits_tiny("tiny_cond")
  workdir = _make_workdir(tmp_path / "digits", config)
  result = _sample_cli(workdir, "--num_samples=3", "--steps=8", "--label=3", "--trajectory",
                       "--frames=4", "--sampler=topp", "--grid=cosine", "--guidance=0.5")
  assert result.returncode == 0, result.stderr[-3000:]
  base = os.path.join(workdir, "samples", "ckpt00000000_topp_8steps_seed0_label3")
  info = json.loads(open(base + ".json").read())
  assert info["files"] == [base + ".png", base + ".npy", base + "_trajectory.png",
                           base + "_trajectory.gif"]
  assert 1 <= info["nfe"] <= 8 and info["label"] == 3 and info["params"] == "ema"
  assert info["guidance"] == 0.5
  tokens = np.load(base + ".npy")
  assert tokens.shape == (3, 8, 8, 1) and tokens.min() >= 0 and tokens.max() < config.vocab_size
  assert info["sample_seconds"] > 0 and info["samples_per_second"] > 0
  grid = np.asarray(Image.open(base + "_trajectory.png"))
  assert grid.shape == (4 * (3 * 9 + 1), 4 * (4 * 9 + 1), 3)  # 3 rows × 4 frames, scale 4.
  red = (grid[..., 0] == 255) & (grid[..., 1] == 0)
  assert red[: 4 * 10, : 4 * 10].mean() > 0.5  # The first frame is all mask,
  assert not red[:, -4 * 9:].any()  # the last has none.
  assert Image.open(base + "_trajectory.gif").n_frames == 4


@pytest.mark.slow
def test_text_prompt_infilling(tmp_path):
  config = text8_config.get_config("tiny")
  config.data_shape = (32,)
  config.transformer.width = 32
  workdir = _make_workdir(tmp_path / "text", config)
  result = _sample_cli(workdir, "--num_samples=2", "--batch_size=1", "--sampler=first_hitting",
                       "--prompt=the _____ of ", "--params=raw", "--trajectory", "--frames=3")
  assert result.returncode == 0, result.stderr[-3000:]
  base = os.path.join(workdir, "samples", "ckpt00000000_first_hitting_seed0")
  lines = open(base + ".txt").read().splitlines()
  samples = [lines[i + 1] for i, line in enumerate(lines) if line.startswith("=== sample")]
  assert len(samples) == 2
  for text in samples:
    assert len(text) == 32 and text.startswith("the ") and text[9:13] == " of "
    assert "_" not in text
  info = json.loads(open(base + ".json").read())
  assert info["num_batches"] == 2 and "Batch 2/2" in result.stderr
  assert info["nfe_per_batch"] == [32 - 8] * 2  # One call per generated character.
  assert 0 < info["unigram_entropy"] <= math.log(27)
  tokens = np.load(base + ".npy")
  assert tokens.shape == (2, 32) and not (tokens[0] == tokens[1]).all()  # Batches differ.
  trajectory = open(base + "_trajectory.txt").read()
  assert "[0] the _____ of " + "_" * 19 in trajectory


@pytest.mark.slow  # Two sampling processes.
def test_workdir_without_checkpoint_is_a_clean_error(tmp_path):
  workdir = tmp_path / "empty"
  workdir.mkdir()
  saved_config.save_config(digits.get_config(), str(workdir))
  result = _sample_cli(str(workdir))
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("md4_jax.sample: error: No checkpoint")
  result = _sample_cli(str(workdir), "--steps=0")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "md4_jax.sample: error: --steps must be >= 1 (or unset for the run's sampling_steps), got 0.")



@pytest.mark.slow
def test_remdm_and_ordered_samplers_from_the_cli(tmp_path):
  from md4_jax.configs import synthetic_text  # pylint: disable=g-import-not-at-top
  workdir = _make_workdir(tmp_path / "synth", synthetic_text.get_config("tiny"))
  for flags, stem in ((["--sampler=remdm", "--eta=0.3", "--remask=rescale"],
                       "ckpt00000000_remdm_rescale0.3_6steps_seed0"),
                      (["--sampler=ordered", "--order=entropy", "--temperature=0"],
                       "ckpt00000000_ordered_entropy_6steps_seed0")):
    result = _sample_cli(workdir, "--num_samples=4", "--steps=6", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(open(os.path.join(workdir, "samples", stem + ".json")).read())
    assert info["nfe"] == 6 and info["cache"] is False and "Exact sample NLL" in result.stdout
    assert info.get("eta", info.get("order")) in (0.3, "entropy")
  result = _sample_cli(workdir, "--sampler=remdm", "--cache")
  assert result.returncode == 2
  assert "caching does not apply to 'remdm'" in result.stderr.strip().splitlines()[-1]
