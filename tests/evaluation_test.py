"""md4_jax.metrics.evaluation: the one NELBO -> bits/perplexity conversion, and progress lines."""

import math

import pytest

from md4_jax import data
from md4_jax.data import common
from md4_jax.metrics import evaluation


def test_the_metrics_datasets_name_are_the_ones_evaluation_converts():
  assert set(common.METRICS) == set(evaluation.UNITS)


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_every_dataset_headline_metric_is_scored_and_described(name):
  info = data.get_info(name)
  if info.kind == "image":  # Pixels are dimensions; text datasets name their own positions.
    assert info.metric == "bits_per_dim"
  out = evaluation.headline(3.0, 0.5, 2, info.metric)  # 3 nats over 2 positions.
  assert out[info.metric] == pytest.approx(3.0 / (2 * math.log(2)))
  assert out[f"{info.metric}_stderr"] == pytest.approx(0.5 / (2 * math.log(2)))
  assert evaluation.describe(out, info.metric).endswith(evaluation.UNITS[info.metric])


def test_headline_bits_and_perplexity():
  out = evaluation.headline(3000.0, 10.0, 1024, "bits_per_token")
  assert out["bits_per_token"] == pytest.approx(3000 / (1024 * math.log(2)))
  assert out["perplexity"] == pytest.approx(2 ** out["bits_per_token"])
  assert out["perplexity"] == pytest.approx(math.exp(3000 / 1024))
  assert out["perplexity_stderr"] == pytest.approx(out["perplexity"] * 10 / 1024)
  chars = evaluation.headline(300.0, 1.0, 256, "bits_per_char")
  assert set(chars) == {"bits_per_char", "bits_per_char_stderr"}
  assert chars["bits_per_char_stderr"] == pytest.approx(1 / (256 * math.log(2)))
  with pytest.raises(ValueError, match="Unknown metric"):
    evaluation.headline(1.0, 0.0, 1, "bpd")


def test_describe_names_the_unit_of_the_dataset():
  values = {"eval_bits_per_char": 1.5, "eval_bits_per_char_stderr": 0.01}
  assert evaluation.describe(values, "bits_per_char", "eval_") == "1.5000 ± 0.0100 bits/char"
  tokens = {"bits_per_token": 4.5, "perplexity": 22.627}
  assert evaluation.describe(tokens, "bits_per_token") == "perplexity 22.627, 4.5000 bits/token"


def test_progress_logs_rate_and_time_left(monkeypatch):
  lines = []
  monkeypatch.setattr(evaluation.logging, "info", lambda msg, *args: lines.append(msg % args))
  now = [0.0]
  progress = evaluation.Progress(10, "eval text8/validation", bar=False, every_seconds=5.0,
                                 clock=lambda: now[0])
  seen = []
  for batch in progress(iter(range(10))):
    seen.append(batch)
    now[0] += 2.0  # Two seconds a batch.
  assert seen == list(range(10))
  # A line every 5 s (after batches 3, 6, 9 at 2 s each), none after the last batch.
  assert lines == [
      "eval text8/validation: 3/10 batches, 0.50 batches/s, 14 s left.",
      "eval text8/validation: 6/10 batches, 0.50 batches/s, 8 s left.",
      "eval text8/validation: 9/10 batches, 0.50 batches/s, 2 s left.",
  ]
