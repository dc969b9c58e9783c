"""Scoring a split: the evaluation loop and the one NELBO -> bits/perplexity conversion.

Used by the training loop (periodic evaluation) and by `md4_jax.evaluate`
(the CLI); it needs no TensorFlow, clu or training loop. A dataset's headline
metric (`DatasetInfo.metric`) names bits per position as the field does:
bits per dim (images), bits per char (text8), bits per token (GPT-2 tokens,
which also get a perplexity).
"""

import math
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm
from absl import logging
from jax.sharding import Mesh

from md4_jax.experiment import parallel

EVAL_RNG_SALT = 1  # Eval noise is fixed per seed: fold_in(key(seed), salt).

UNITS = {"bits_per_dim": "bits/dim", "bits_per_char": "bits/char", "bits_per_token": "bits/token"}


def headline(nelbo: float, stderr: float, positions: int, metric: str) -> dict[str, float]:
  """A NELBO in nats per example as the dataset's metric: the only such conversion.

  Args:
    nelbo: mean NELBO, nats per example.
    stderr: its standard error.
    positions: D, positions per example.
    metric: a `DatasetInfo.metric` (a key of UNITS).

  Returns:
    {metric, metric_stderr} in bits per position and, for bits_per_token,
    perplexity = exp(nelbo / D) with perplexity_stderr from the delta method.
  """
  if metric not in UNITS:
    raise ValueError(f"Unknown metric {metric!r}; valid: {sorted(UNITS)}.")
  bits = positions * math.log(2.0)
  out = {metric: nelbo / bits, f"{metric}_stderr": stderr / bits}
  if metric == "bits_per_token":
    perplexity = math.exp(nelbo / positions)
    out.update(perplexity=perplexity, perplexity_stderr=perplexity * stderr / positions)
  return out


def describe(values: dict[str, float], metric: str, prefix: str = "") -> str:
  """'1.2345 ± 0.0012 bits/char' (and 'perplexity 22.1 ± 0.3, ' first for tokens).

  values holds `prefix + metric` (and its _stderr, and prefix + perplexity;
  and, for a synthetic source, its entropy and the gap to it).
  """
  def one(key, unit, digits):
    text = f"{values[prefix + key]:.{digits}f}"
    if prefix + key + "_stderr" in values:
      text += f" ± {values[prefix + key + '_stderr']:.{digits}f}"
    return f"{text} {unit}".strip()
  parts = [one(metric, UNITS[metric], 4)]
  if prefix + "perplexity" in values:
    parts.insert(0, "perplexity " + one("perplexity", "", 3))
  if prefix + "gap_bits_per_token" in values:  # A synthetic source with exact entropy.
    gap = f"gap {values[prefix + 'gap_bits_per_token']:+.4f}"
    if prefix + "gap_bits_per_token_stderr" in values:
      gap += f" ± {values[prefix + 'gap_bits_per_token_stderr']:.4f}"
    parts.append(f"source entropy {values[prefix + 'source_entropy_bits_per_token']:.4f} "
                 f"bits/token, {gap}")
  return ", ".join(parts)


class Progress:
  """A tqdm bar over the batches (process 0, stderr), or periodic log lines.

  Both give the batches done, their rate and the time left, so a long
  evaluation never runs silently.
  """

  def __init__(self, total: int, desc: str, bar: bool, every_seconds: float = 30.0,
               clock: Callable[[], float] = time.monotonic):
    self._total, self._desc, self._bar = total, desc, bar
    self._every, self._clock = every_seconds, clock

  def __call__(self, batches):
    if self._bar:
      yield from tqdm.tqdm(batches, total=self._total, desc=self._desc, unit="batch",
                           dynamic_ncols=True, disable=jax.process_index() != 0, file=sys.stderr)
      return
    start = last = self._clock()
    for i, batch in enumerate(batches):
      yield batch
      now = self._clock()
      if now - last >= self._every and i + 1 < self._total:
        last = now
        rate = (i + 1) / (now - start)
        logging.info("%s: %d/%d batches, %.2f batches/s, %.0f s left.", self._desc, i + 1,
                     self._total, rate, (self._total - i - 1) / rate)


def evaluate(eval_step, params, datasets, mesh: Mesh, num_positions: int, seed: int,
             progress: Optional[Progress] = None) -> dict[str, Any]:
  """NELBO over the whole eval split (every example once), with standard errors.

  Batch i draws its times and masks from fold_in(fold_in(key(seed), salt), i).
  Results are fetched one batch late, so the device never waits for the host;
  the statistics are computed on the host in float64.

  Args:
    eval_step: from `Experiment.eval_step` (any number of time samples K).
    params: the parameters to evaluate (e.g. the EMA ones).
    datasets: `eval_batches()` covers the split once; padding has weight 0.
    mesh: the device mesh the batches are sharded over.
    num_positions: D, positions per example.
    seed: base seed of the times and masks.
    progress: optional wrapper of the batch iterator (a `Progress`).

  Returns:
    eval_loss (mean NELBO, nats per example), eval_loss_diff, eval_loss_recon,
    eval_loss_prior, eval_loss_stderr (the sample std of the N per-example
    estimates / sqrt(N): data spread plus the estimator's noise, which falls
    with K), eval_examples (N), eval_metric (the dataset's metric name) and
    eval_<metric>, eval_<metric>_stderr (and eval_perplexity[_stderr] for
    tokens) from `headline`.
  """
  base = jax.random.fold_in(jax.random.key(seed), EVAL_RNG_SALT)
  batches = datasets.eval_batches()
  if progress is not None:
    batches = progress(batches)
  source = datasets.exact_source
  chunks, exact_nll, pending = [], [], None
  for i, batch in enumerate(batches):
    out = eval_step(params, parallel.to_global(batch, mesh), jax.random.fold_in(base, i))
    if source is not None:  # −log p_source(x) of the global batch, in its order.
      exact_nll.append(parallel.gather(-source.log_prob(batch["x"]).astype(np.float32)))
    if pending is not None:
      chunks.append(parallel.fetch(pending))
    pending = out
  if pending is None:
    raise ValueError("The evaluation split is empty.")
  chunks.append(parallel.fetch(pending))
  real = np.concatenate([c["weight"] for c in chunks]) > 0
  values = {k: np.concatenate([c[k] for c in chunks]).astype(np.float64)[real]
            for k in chunks[0] if k != "weight"}
  n = int(real.sum())
  result: dict[str, Any] = {f"eval_{k}": float(np.mean(v)) for k, v in values.items()}
  stderr = float(np.std(values["loss"], ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  metric = datasets.info.metric
  result.update(eval_loss_stderr=stderr, eval_examples=n, eval_metric=metric)
  result.update({f"eval_{k}": v for k, v in
                 headline(result["eval_loss"], stderr, num_positions, metric).items()})
  if source is not None:
    paired = values["loss"] - np.concatenate(exact_nll).astype(np.float64)[real]
    result.update({f"eval_{k}": v for k, v in
                   source_gap(result["eval_loss"], source, num_positions, paired).items()})
  return result


def source_gap(nelbo: float, source, num_positions: int,
               paired: Optional[np.ndarray] = None) -> dict[str, float]:
  """The NELBO next to the exact entropy of a synthetic source, bits per token.

  Args:
    nelbo: mean NELBO, nats per example.
    source: the exact source (`entropy(L)`).
    num_positions: L.
    paired: optional per-example NELBO_i − (−log p_source(x_i)) in nats: the
      gap estimated example by example, whose spread excludes the data's own
      variance (the NELBO and the exact NLL of a sequence move together), so
      its standard error is much smaller.

  Returns:
    source_entropy_bits_per_token (H_L / (L ln 2)) and gap_bits_per_token
    (the model's excess bits; ≥ 0 up to noise, since the NELBO bounds the
    model's NLL, which is ≥ the entropy on average): the mean of `paired`
    when given, with gap_bits_per_token_stderr, else NELBO / (L ln 2) minus
    the entropy.
  """
  bits = num_positions * math.log(2)
  entropy = source.entropy(num_positions) / bits
  if paired is None:
    return {"source_entropy_bits_per_token": entropy, "gap_bits_per_token": nelbo / bits - entropy}
  n = len(paired)
  stderr = float(np.std(paired, ddof=1) / math.sqrt(n)) / bits if n > 1 else float("nan")
  return {"source_entropy_bits_per_token": entropy,
          "gap_bits_per_token": float(np.mean(paired)) / bits,
          "gap_bits_per_token_stderr": stderr}
