"""An EMA that has not warmed up is never reported as the model (issue: EMA headline)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from md4_jax import evaluate
from md4_jax.experiment import step as step_lib
from md4_jax.run import loop


def test_ema_warmup_decay():
  np.testing.assert_allclose(step_lib.ema_decay(0.9999, jnp.arange(4), True),
                             [1 / 10, 2 / 11, 3 / 12, 4 / 13], rtol=1e-6)
  assert float(step_lib.ema_decay(0.99, 10**6, True)) == pytest.approx(0.99)
  assert step_lib.ema_decay(0.9999, 3, False) == 0.9999


def test_the_headline_never_picks_an_ema_longer_than_the_run():
  assert step_lib.headline_params(0.9999, False, 1200)[0] == "raw"
  which, why = step_lib.headline_params(0.9999, False, 1200)
  assert "10000 steps exceeds the 1200 steps taken" in why
  assert step_lib.headline_params(0.9999, False, 10_000)[0] == "ema"
  assert step_lib.headline_params(0.9999, True, 5)[0] == "ema"
  assert step_lib.headline_params(0.0, False, 1)[0] == "ema"


def _run(tmp_path, name, **overrides):
  config = helpers.digits_tiny(**{**dict(num_samples=0, eval_every_steps=0,
                                         sample_every_steps=0, num_train_steps=30,
                                         checkpoint_every_steps=30, learning_rate=1e-2,
                                         warmup_steps=0), **overrides})
  workdir = str(tmp_path / name)
  return workdir, loop.run(config, workdir, mesh=helpers.one_device())


@pytest.mark.slow  # Two in-process trainings.
def test_a_short_run_reports_a_model_near_its_raw_parameters(tmp_path):
  # The paper's decay without warm-up: after 30 steps the EMA is ~the initialisation.
  workdir, cold = _run(tmp_path, "cold", ema_rate=0.9999, ema_warmup=False)
  assert cold["eval_params"] == "raw"
  assert cold["eval_bits_per_dim"] == cold["eval_raw_bits_per_dim"]
  assert cold["eval_ema_bits_per_dim"] > cold["eval_raw_bits_per_dim"] + 0.2
  saved = json.loads(open(f"{workdir}/final_metrics.json").read())
  assert saved["eval_params"] == "raw" and "eval_ema_loss" in saved and "eval_raw_loss" in saved
  # `evaluate` without --params follows the same rule and says which it used.
  report = evaluate.evaluate_checkpoint(workdir, mesh=helpers.one_device())
  assert report["params"] == "raw" and "exceeds" in report["params_reason"]
  np.testing.assert_allclose(report["bits_per_dim"], cold["eval_raw_bits_per_dim"], rtol=1e-5)
  # With warm-up the EMA is the headline, and it is near the raw parameters' value.
  _, warm = _run(tmp_path, "warm", ema_rate=0.9999, ema_warmup=True)
  assert warm["eval_params"] == "ema"
  gap = abs(warm["eval_ema_bits_per_dim"] - warm["eval_raw_bits_per_dim"])
  assert gap < 0.25 * abs(cold["eval_ema_bits_per_dim"] - cold["eval_raw_bits_per_dim"])
