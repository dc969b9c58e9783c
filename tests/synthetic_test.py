"""The synthetic text source: exact probabilities, entropy, sampling, and the benchmark run."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

import helpers
from md4_jax.configs import synthetic_text
from md4_jax import data as data_lib
from md4_jax.metrics import evaluation
from md4_jax.data import synthetic


def _enumerate(source, length):
  xs = np.array(list(itertools.product(range(source.vocab_size), repeat=length)))
  return xs, source.log_prob(xs)


@pytest.mark.parametrize("order", [1, 2])
def test_exact_log_probs_and_entropy_match_brute_force(order):
  source = synthetic.MarkovSource(vocab_size=3, order=order, concentration=0.7, seed=3)
  xs, log_p = _enumerate(source, 4)
  p = np.exp(log_p)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(-(p * log_p).sum(), source.entropy(4), rtol=1e-10)
  # One sequence by hand: the stationary law of its first context, then the transitions.
  x = xs[37]
  context = lambda toks: int(np.ravel_multi_index(tuple(toks), (3,) * order))
  want = math.log(source.stationary[context(x[:order])])
  for n in range(order, 4):
    want += math.log(source.transitions[context(x[n - order:n]), x[n]])
  np.testing.assert_allclose(log_p[37], want, rtol=1e-12)
  # Stationarity: the context law after one step is the same law.
  move = np.zeros((source.num_contexts,) * 2)
  for c in range(source.num_contexts):
    for y in range(3):
      move[c, (c * 3) % source.num_contexts + y] += source.transitions[c, y]
  np.testing.assert_allclose(source.stationary @ move, source.stationary, atol=1e-12)


def test_samples_follow_the_exact_probabilities():
  source = synthetic.MarkovSource(vocab_size=3, order=2, concentration=0.7, seed=3)
  xs, log_p = _enumerate(source, 3)
  draws = source.sample(30_000, 3, seed=5)
  index = np.ravel_multi_index(tuple(draws.T), (3, 3, 3))
  counts = np.bincount(index, minlength=27)
  expected = len(draws) * np.exp(log_p)
  stat = float(np.sum((counts - expected) ** 2 / expected))
  assert scipy_stats.chi2.sf(stat, 26) > 1e-3
  # score(): the mean exact NLL of true samples is the entropy, within its error.
  scores = source.score(source.sample(20_000, 16, seed=6))
  assert abs(scores["source_nll_per_token"] - scores["source_entropy_per_token"]) < (
      4 * scores["source_nll_per_token_stderr"])


def test_dataset_record_generates_fixed_splits_and_decodes_letters():
  config = synthetic_text.get_config("tiny")
  datasets = data_lib.create_datasets(config, 0, 1)
  batch = next(datasets.train_iter)
  assert batch["x"].shape == (16, 32) and batch["x"].max() < 8
  assert datasets.num_eval_examples == synthetic.SPLIT_SIZES["validation"]
  again = data_lib.create_datasets(config, 0, 1)
  np.testing.assert_array_equal(next(again.train_iter)["x"], batch["x"])  # Seeded.
  assert isinstance(datasets.exact_source, synthetic.MarkovSource)
  codec = datasets.info.text_codec("")
  assert codec.decode(np.array([0, 1, 7, 8])) == "abh_"
  ids, fixed = codec.encode_prompt("ab_h")
  np.testing.assert_array_equal(ids[fixed], [0, 1, 7])
  assert list(fixed) == [True, True, False, True]


def test_gap_to_the_entropy_is_reported():
  source = synthetic.MarkovSource()
  entropy_bits = source.entropy(32) / (32 * math.log(2))
  nelbo = (entropy_bits + 0.25) * 32 * math.log(2)
  gap = evaluation.source_gap(nelbo, source, 32)
  np.testing.assert_allclose(gap["gap_bits_per_token"], 0.25, rtol=1e-9)
  values = {"eval_bits_per_token": 1.0, "eval_bits_per_token_stderr": 0.01,
            **{f"eval_{k}": v for k, v in gap.items()}}
  assert "gap +0.2500" in evaluation.describe(values, "bits_per_token", "eval_")


def test_paired_gap_matches_each_loss_to_its_own_sequence():
  """A stand-in eval step whose NELBO is each sequence's exact NLL + 1 nat: the paired gap
  is exactly 1 nat / (L ln 2) with zero spread — only if losses and sequences stay aligned
  (padding rows and batch order included)."""
  config = synthetic_text.get_config("tiny")
  config.eval_batch_size = 48  # 2000 = 41 × 48 + 32: the last batch has padding rows.
  datasets = data_lib.create_datasets(config, 0, 1)
  source = datasets.exact_source
  mesh = helpers.one_device()

  def eval_step(params, batch, rng):
    del params, rng
    x = np.asarray(batch["x"])
    loss = -source.log_prob(x) + 1.0
    zero = np.zeros_like(loss)
    return {"loss": jnp.asarray(loss, jnp.float32), "loss_diff": jnp.asarray(loss, jnp.float32),
            "loss_recon": jnp.asarray(zero), "loss_prior": jnp.asarray(zero),
            "weight": jnp.asarray(batch["weight"])}

  result = evaluation.evaluate(eval_step, None, datasets, mesh, 32, seed=0)
  assert result["eval_examples"] == 2000
  np.testing.assert_allclose(result["eval_gap_bits_per_token"], 1 / (32 * math.log(2)), rtol=1e-4)
  assert result["eval_gap_bits_per_token_stderr"] < 1e-5
  # Unpaired, the same numbers carry the data's spread: a far wider error bar.
  assert result["eval_bits_per_token_stderr"] > 100 * result["eval_gap_bits_per_token_stderr"]
  assert "gap +0.0451 ± 0.0000" in evaluation.describe(result, "bits_per_token", "eval_")


@pytest.mark.slow
def test_trained_model_beats_the_unigram_bound_and_samples_are_scored(tmp_path):
  """configs/synthetic_text.py, a few hundred steps: the held-out NELBO is below the
  unigram entropy (what a model without context could reach); the sampling CLI prints
  the samples' exact NLL under the source."""
  workdir = tmp_path / "run"
  result = helpers.run_module(
      "md4_jax.train", "--config=configs/synthetic_text.py", f"--workdir={workdir}",
      "--config.num_train_steps=300", "--config.ema_rate=0.98", "--config.eval_every_steps=0",
      "--config.checkpoint_every_steps=300", "--config.num_samples=0", fast_compile=False)
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((workdir / "final_metrics.json").read_text())
  source = synthetic.source_from_config(synthetic_text.get_config())
  x = source.sample(50_000, 32, seed=1)
  freq = np.bincount(x.ravel(), minlength=8) / x.size
  unigram_bits = float(-(freq * np.log2(freq)).sum())
  assert metrics["eval_bits_per_token"] < unigram_bits - 0.3, (metrics, unigram_bits)
  assert "gap" in result.stdout and metrics["eval_gap_bits_per_token"] > -0.05
  result = helpers.run_module("md4_jax.sample", f"--workdir={workdir}", "--num_samples=64",
                              "--steps=16", f"--out_dir={tmp_path / 's'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Exact sample NLL under the source" in result.stdout
  (info_file,) = (tmp_path / "s").glob("*.json")
  info = json.loads(info_file.read_text())
  assert info["source_nll_bits_per_token"] > 0 and info["source_entropy_bits_per_token"] > 1
