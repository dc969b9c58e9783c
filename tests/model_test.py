"""MD4 loss: the analytic NELBO, discrete vs continuous time, input checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from md4_jax.configs import base
from md4_jax import networks
from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import schedules

V = 5
L = 8


def _fixed_logits(seed=0):
  return np.random.default_rng(seed).normal(size=(L, V)).astype(np.float32) * 2.0


def _ce(logits_LxV, x_BxL):
  logp = jax.nn.log_softmax(logits_LxV, axis=-1)
  return -np.take_along_axis(np.asarray(logp)[None], x_BxL[..., None], axis=-1)[..., 0].sum(-1)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "poly3", "poly0.5"])
@pytest.mark.parametrize("antithetic", [True, False])
def test_analytic_nelbo_for_input_ignoring_network(schedule, antithetic):
  logits = _fixed_logits()
  model, variables = helpers.fixed_logits_model(logits, schedule,
                                                antithetic_time_sampling=antithetic)
  x = np.random.default_rng(1).integers(0, V, size=(128, L)).astype(np.int32)
  sched = schedules.get_schedule(schedule)
  expected = (sched.alpha(0.0) - sched.alpha(1.0)) * _ce(logits, x).mean()
  expected += L * (1 - sched.alpha(0.0)) * math.log(V)  # Reconstruction.
  expected += L * sched.alpha(1.0) * math.log(V)  # Prior.

  @jax.jit
  def batch_loss(rng):
    return model.apply(variables, x, rngs={"sample": rng})["loss"]

  batch_means = np.asarray(jax.lax.map(batch_loss, jax.random.split(jax.random.key(0), 1000)))
  mean = batch_means.mean()
  stderr = batch_means.std(ddof=1) / np.sqrt(len(batch_means))
  assert abs(mean - expected) < 4 * stderr, (mean, expected, stderr)
  # poly0.5: near t = 0 the estimate w(t)·Σ_masked CE ~ 1/(2t) is hit with
  # probability ~ sqrt(t): a tail P(X > x) ~ x^-1.5, finite mean but infinite
  # variance, so the sample mean converges only as n^(-1/3).
  assert abs(mean - expected) < (0.06 if schedule == "poly0.5" else 0.02) * expected
  # A wrong weight (e.g. missing the 1/(1 − α) factor) is far outside the band.
  assert 4 * stderr < 0.2 * expected


def test_discrete_time_loss_approaches_continuous():
  # x has long runs, so CopyLeft predicts well when the left neighbour is visible.
  x = np.repeat(np.random.default_rng(2).integers(0, V, size=(64, L // 4)), 4, axis=1).astype(np.int32)
  num_t = 512
  t_grid = (np.arange(num_t) + 0.5) / num_t

  def expected_loss(cont_time, timesteps):
    model = helpers.md4(helpers.CopyLeft(V), "linear", V, (L,), cont_time=cont_time,
                        timesteps=timesteps)
    variables = model.init(jax.random.key(0), x[:1], t=jnp.ones((1,)), noise=jnp.zeros((1, L)))

    @jax.jit
    def at(t, rng):
      noise = jax.random.uniform(rng, x.shape)  # Common random numbers across T.
      return model.apply(variables, x, t=jnp.full((x.shape[0],), t), noise=noise)["loss"]

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
  model, variables = helpers.fixed_logits_model(np.zeros((L, big_v), np.float32), "cosine")
  x = jnp.zeros((2, L), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda r: model.apply(variables, x, rngs={"sample": r})["loss"])(
      jax.random.key(0))
  text = str(jaxpr)
  assert "one_hot" not in text
  # Count [2, L, V]-shaped intermediates: broadcast logits, f32 convert/softmax pieces only.
  eq_ops = [e.primitive.name for e in jaxpr.jaxpr.eqns if any(
      getattr(v.aval, "shape", None) == (2, L, big_v) for v in e.outvars)]
  assert "eq" not in eq_ops, eq_ops  # one-hot via comparison against an iota


def test_out_of_range_tokens_are_a_clear_error():
  model, variables = helpers.fixed_logits_model(_fixed_logits())
  for bad in (np.full((2, L), V, np.int32), np.full((2, L), -1, np.int32)):
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
      model.apply(variables, bad, rngs={"sample": jax.random.key(0)})
  with pytest.raises(ValueError, match="data_shape"):
    model.apply(variables, np.zeros((2, L + 1), np.int32), rngs={"sample": jax.random.key(0)})
  # Inside jit the check cannot see values: the loss becomes NaN instead.
  out = jax.jit(lambda x: model.apply(variables, x, rngs={"sample": jax.random.key(0)})["loss"])(
      np.full((2, L), V, np.int32))
  assert np.isnan(out)


@pytest.mark.parametrize("antithetic", [True, False])
def test_times_never_hit_zero_so_poly_below_one_stays_finite(antithetic):
  """poly0.5 has w(0) = ∞: t must lie in (0, 1] (regression: u = 0 gave t = 0 and a NaN step)."""
  t = np.asarray(losses.antithetic_times(jnp.float32(0.0), 512))
  assert t.min() > 0 and t.max() == 1.0
  assert len(np.unique(t)) == 512  # Still one stratum per example.
  t = np.asarray(losses.sample_times(jax.random.key(0), 4096, antithetic))
  assert 0 < t.min() and t.max() <= 1
  # Each t_b is uniform: the mean is 1/2 (and the strata cover (0, 1]).
  assert abs(t.mean() - 0.5) < 4 * math.sqrt(1 / 12 / (1 if antithetic else 4096))
  t_KxB = np.asarray(losses.stratified_times(jax.random.key(1), 4, 1000))
  assert t_KxB.min() > 0 and t_KxB.max() <= 1
  for k in range(4):
    assert (t_KxB[k] > k / 4).all() and (t_KxB[k] <= (k + 1) / 4).all()
  # With u = 0 the poly0.5 loss is finite for every example.
  model, variables = helpers.fixed_logits_model(_fixed_logits(), "poly0.5")
  x = np.random.default_rng(0).integers(0, V, size=(16, L)).astype(np.int32)
  t0 = losses.antithetic_times(jnp.float32(0.0), 16)
  noise = jax.random.uniform(jax.random.key(2), x.shape)
  terms = model.apply(variables, x, t=t0, noise=noise, method=model_lib.MD4.nelbo)
  assert np.isfinite(np.asarray(terms["loss"])).all()


def test_nelbo_is_an_upper_bound_on_the_exact_nll():
  """The prior term makes the NELBO ≥ −log p(x) even where the diffusion term vanishes.

  An input-ignoring network that predicts x_n with certainty, V = 2: under
  the generative model (prior: a token w.p. α(1) = eps, uniform; revealed
  tokens from the network; still-masked at t = 0 w.p. eps, uniform),
  p(x_n) = (1 − 2eps) + 2eps/V per position, so −log p(x) ≈ D·eps. Without the
  prior term the NELBO is D·eps·log 2 ≈ 0.69·D·eps < −log p(x).
  """
  vocab, length = 2, 1024
  x = np.zeros((4, length), np.int32)
  logits = np.tile(np.array([[30.0, -30.0]], np.float32), (length, 1))
  model, variables = helpers.fixed_logits_model(logits, "linear")
  eps = schedules.EPS
  exact_nll = -length * math.log((1 - 2 * eps) + 2 * eps / vocab)
  terms = jax.jit(lambda r: model.apply(variables, x, rngs={"sample": r},
                                        method=model_lib.MD4.nelbo))(jax.random.key(0))
  nelbo = np.asarray(terms["loss"], np.float64)
  assert (nelbo >= exact_nll).all(), (nelbo, exact_nll)
  np.testing.assert_allclose(terms["loss_prior"], length * eps * math.log(vocab), rtol=1e-3)
  # It is tight to within the prior and reconstruction terms (D·eps·log V each).
  assert (nelbo - exact_nll < 2 * length * eps * math.log(vocab)).all()


def test_loss_chunk_size_needs_a_fused_head_network():
  config = base.get_config()  # UNet on digits.
  config.loss_chunk_size = 16
  with pytest.raises(ValueError, match="loss_chunk_size=16.*unet"):
    model_lib.build_model(config, networks.build_network(config))
  # A toy network built by hand is refused when the loss runs, not silently plain.
  model = helpers.md4(helpers.CopyLeft(V), "linear", V, (L,), loss_chunk_size=4)
  x = np.zeros((2, L), np.int32)
  with pytest.raises(ValueError, match="FusedHeadNetwork"):
    model.init(jax.random.key(0), x, t=jnp.ones((2,)), noise=jnp.zeros((2, L)))
