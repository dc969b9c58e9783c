"""A workdir written by an earlier release (cea09dd: configs/digits.py:tiny, 4 steps, on one
CPU device) still restores, scores what it scored then, samples and resumes training.

The workdir is stored in tests/data; its config.json and checkpoint predate every key added
since, so this also checks that the saved-config schema completes old configs.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from md4_jax import data as data_lib
from md4_jax.diffusion import sampling
from md4_jax.experiment import parallel
from md4_jax.experiment import validation
from md4_jax.metrics import evaluation
from md4_jax.run import loop
from md4_jax.run import saved_config
from md4_jax.run import workdir as workdir_lib
import helpers

LEGACY = os.path.join(os.path.dirname(__file__), "data", "workdir_cea09dd_digits_tiny")


def _copy(tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(LEGACY, workdir)
  return workdir


def test_old_workdir_restores_and_scores_what_it_scored(tmp_path):
  workdir = _copy(tmp_path)
  config, experiment, state = workdir_lib.restore_run(workdir)
  validation.validate(config)
  assert int(state.step) == 4
  # The same parameters give the same held-out NELBO as the old release's final eval.
  datasets = data_lib.create_datasets(config, *parallel.data_shards(experiment.mesh))
  metrics = evaluation.evaluate(experiment.eval_step(), state.ema_params, datasets,
                                experiment.mesh, experiment.model.num_positions, config.seed)
  with open(os.path.join(LEGACY, "final_metrics.json")) as f:
    then = json.load(f)
  assert metrics["eval_examples"] == then["eval_examples"]
  np.testing.assert_allclose(metrics["eval_loss"], then["eval_loss"], rtol=1e-4)
  n = jax.device_count()
  tokens, _ = experiment.sampler(steps=4)({"params": state.ema_params}, jax.random.key(0),
                                          sampling.all_masked(experiment.model, n))
  tokens = np.asarray(parallel.gather(tokens))
  assert tokens.shape == (n, 8, 8, 1) and tokens.min() >= 0 and tokens.max() < config.vocab_size


@pytest.mark.slow
def test_old_workdir_resumes_training(tmp_path):
  workdir = _copy(tmp_path)
  # The run predates EMA warm-up (today's default for digits): it resumes without it.
  config = helpers.digits_tiny(num_train_steps=6, checkpoint_every_steps=2, ema_warmup=False)
  # Today's config differs from the saved one only in the run length asked for here.
  assert saved_config.differences(workdir_lib.load_config(workdir), config) == {
      "num_train_steps": (4, 6)}
  metrics = loop.run(config, workdir, allow_config_change=True, mesh=helpers.one_device())
  assert metrics["step"] == 6
  assert helpers.checkpoint_steps(workdir)[-1] == 6


@pytest.mark.slow  # A fresh process importing TensorFlow; reliability_test checks md4_jax.train.
def test_the_first_training_command_is_an_alias(tmp_path):
  # `md4_jax.main` parses the training flags and reaches the same config checks.
  result = helpers.run_module("md4_jax.main", helpers.TINY_DIGITS, f"--workdir={tmp_path / 'w'}",
                              "--config.num_train_steps=0")
  assert result.returncode == 2, result.stderr
  assert "num_train_steps=0 is out of range" in result.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "w").exists()
