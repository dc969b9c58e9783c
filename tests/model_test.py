"""MD4 loss: the analytic NELBO, discrete vs continuous time, input checks."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import schedules

V = 5
L = 8


class FixedLogits(nn.Module):
  """Ignores z_t and t: returns the same logits ℓ_n for every example."""

  logits_LxV: np.ndarray

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, cond, train
    return jnp.broadcast_to(jnp.asarray(self.logits_LxV), z.shape + (self.logits_LxV.shape[-1],))


class CopyLeft(nn.Module):
  """Predicts the visible left neighbour's token (a network that uses z_t)."""

  vocab_size: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, cond, train
    left = jnp.roll(z, 1, axis=-1)
    visible = left < self.vocab_size
    bonus = 3.0 * jax.nn.one_hot(jnp.where(visible, left, 0), self.vocab_size)
    return jnp.where(visible[..., None], bonus, 0.0)


def _fixed_logits(seed=0):
  return np.random.default_rng(seed).normal(size=(L, V)).astype(np.float32) * 2.0


def _ce(logits_LxV, x_BxL):
  logp = jax.nn.log_softmax(logits_LxV, axis=-1)
  return -np.take_along_axis(np.asarray(logp)[None], x_BxL[..., None], axis=-1)[..., 0].sum(-1)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "poly3", "poly0.5"])
@pytest.mark.parametrize("antithetic", [True, False])
def test_analytic_nelbo_for_input_ignoring_network(schedule, antithetic):
  logits = _fixed_logits()
  model = model_lib.MD4(FixedLogits(logits), schedule, V, (L,), antithetic_time_sampling=antithetic)
  x = np.random.default_rng(1).integers(0, V, size=(128, L)).astype(np.int32)
  sched = schedules.get_schedule(schedule)
  expected = (sched.alpha(0.0) - sched.alpha(1.0)) * _ce(logits, x).mean()
  expected += L * (1 - sched.alpha(0.0)) * math.log(V)

  @jax.jit
  def batch_loss(rng):
    return model.apply({}, x, rngs={"sample": rng})["loss"]

  batch_means = np.asarray(jax.lax.map(batch_loss, jax.random.split(jax.random.key(0), 300)))
  mean = batch_means.mean()
  stderr = batch_means.std(ddof=1) / np.sqrt(len(batch_means))
  assert abs(mean - expected) < 4 * stderr, (mean, expected, stderr)
  assert abs(mean - expected) < 0.03 * expected
  # A wrong weight (e.g. missing the 1/(1 − α) factor) is far outside the band.
  assert 4 * stderr < 0.2 * expected


def test_discrete_time_loss_approaches_continuous():
  # x has long runs, so CopyLeft predicts well when the left neighbour is visible.
  x = np.repeat(np.random.default_rng(2).integers(0, V, size=(64, L // 4)), 4, axis=1).astype(np.int32)
  num_t = 512
  t_grid = (np.arange(num_t) + 0.5) / num_t

  def expected_loss(cont_time, timesteps):
    model = model_lib.MD4(CopyLeft(V), "linear", V, (L,), cont_time=cont_time, timesteps=timesteps)

    @jax.jit
    def at(t, rng):
      noise = jax.random.uniform(rng, x.shape)  # Common random numbers across T.
      return model.apply({}, x, t=jnp.full((x.shape[0],), t), noise=noise)["loss"]

    keys = jax.random.split(jax.random.key(3), num_t)
    return float(np.mean(np.asarray(jax.lax.map(lambda a: at(*a), (jnp.asarray(t_grid), keys)))))

  l_inf = expected_loss(True, 0)
  gaps = {T: expected_loss(False, T) - l_inf for T in (2, 8, 64, 1024)}
  # L_T decreases to L_inf: the discrete bound is looser for few steps.
  assert gaps[2] > gaps[8] > gaps[64] > 0.0, gaps
  assert abs(gaps[1024]) < 0.02 * l_inf, (gaps, l_inf)
  assert gaps[2] > 0.05 * l_inf


def test_discrete_weight_formula_matches_log_snr_form():
  sched = schedules.get_schedule("cosine")
  t = jnp.linspace(0.0, 0.999, 50)
  T = 100
  t_used, w = losses.diffusion_weight(sched, t, False, T)
  s = t_used - 1.0 / T
  alt = -sched.alpha(s) * jnp.expm1(sched.log_snr(t_used) - sched.log_snr(s))
  np.testing.assert_allclose(w, T * alt, rtol=2e-3)


def test_mask_rate_is_one_minus_alpha():
  x = np.zeros((4, 20000), np.int32)
  t = jnp.array([0.1, 0.4, 0.7, 0.95])
  sched = schedules.get_schedule("cosine")
  noise = jax.random.uniform(jax.random.key(0), x.shape)
  z, masked = losses.forward_mask(jnp.asarray(x), sched.alpha(t), noise, V)
  rate = np.asarray(masked).mean(-1)
  np.testing.assert_allclose(rate, 1 - sched.alpha(t), atol=4 * np.sqrt(0.25 / 20000))
  assert np.all(np.asarray(z)[np.asarray(masked)] == V)
  assert np.all(np.asarray(z)[~np.asarray(masked)] == 0)


def test_token_nll_matches_log_softmax_and_nan_out_of_range():
  logits = jax.random.normal(jax.random.key(0), (3, 4, 7)).astype(jnp.bfloat16)
  x = jax.random.randint(jax.random.key(1), (3, 4), 0, 7)
  nll = losses.token_nll(logits, x)
  assert nll.dtype == jnp.float32
  ref = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), x[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, ref, rtol=1e-5, atol=1e-5)
  bad = x.at[0, 0].set(7).at[1, 1].set(-1)
  out = np.asarray(losses.token_nll(logits, bad))
  assert np.isnan(out[0, 0]) and np.isnan(out[1, 1]) and np.isfinite(out[2]).all()


def test_loss_has_no_one_hot_over_vocab():
  """The jaxpr of the loss never builds a [B, L, V] float tensor beyond the logits."""
  big_v = 1031
  model = model_lib.MD4(FixedLogits(np.zeros((L, big_v), np.float32)), "cosine", big_v, (L,))
  x = jnp.zeros((2, L), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda r: model.apply({}, x, rngs={"sample": r})["loss"])(jax.random.key(0))
  text = str(jaxpr)
  assert "one_hot" not in text
  # Count [2, L, V]-shaped intermediates: broadcast logits, f32 convert/softmax pieces only.
  eq_ops = [e.primitive.name for e in jaxpr.jaxpr.eqns if any(
      getattr(v.aval, "shape", None) == (2, L, big_v) for v in e.outvars)]
  assert "eq" not in eq_ops, eq_ops  # one-hot via comparison against an iota


def test_out_of_range_tokens_are_a_clear_error():
  model = model_lib.MD4(FixedLogits(_fixed_logits()), "linear", V, (L,))
  for bad in (np.full((2, L), V, np.int32), np.full((2, L), -1, np.int32)):
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
      model.apply({}, bad, rngs={"sample": jax.random.key(0)})
  with pytest.raises(ValueError, match="data_shape"):
    model.apply({}, np.zeros((2, L + 1), np.int32), rngs={"sample": jax.random.key(0)})
  # Inside jit the check cannot see values: the loss becomes NaN instead.
  out = jax.jit(lambda x: model.apply({}, x, rngs={"sample": jax.random.key(0)})["loss"])(
      np.full((2, L), V, np.int32))
  assert np.isnan(out)
