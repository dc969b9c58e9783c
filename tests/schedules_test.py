"""Schedules: endpoints, derivative, weight, inverse and name parsing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax.diffusion import schedules

NAMES = ["linear", "cosine", "poly2", "poly3", "poly0.5", "poly1.5"]


@pytest.mark.parametrize("name", NAMES)
def test_endpoints_and_monotone(name):
  s = schedules.get_schedule(name)
  eps = schedules.EPS
  np.testing.assert_allclose(s.alpha(jnp.float32(0.0)), 1 - eps, rtol=0, atol=1e-7)
  np.testing.assert_allclose(s.alpha(jnp.float32(1.0)), eps, rtol=0, atol=1e-7)
  t = jnp.linspace(0.0, 1.0, 101)
  a = s.alpha(t)
  assert np.all(np.diff(np.asarray(a)) < 0)
  assert np.all((a > 0) & (a < 1))


@pytest.mark.parametrize("name", NAMES)
def test_derivative_matches_autodiff_and_finite_difference(name):
  s = schedules.get_schedule(name)
  t = jnp.linspace(0.05, 0.95, 19, dtype=jnp.float32)
  grad = jax.vmap(jax.grad(s.alpha))(t)
  np.testing.assert_allclose(s.dalpha(t), grad, rtol=1e-5, atol=1e-6)
  h = 1e-3
  fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
  np.testing.assert_allclose(s.dalpha(t), fd, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_weight_positive_and_formula(name):
  s = schedules.get_schedule(name)
  t = jnp.linspace(0.01, 1.0, 100)
  w = s.weight(t)
  # w ≥ 0 everywhere; strictly positive before t = 1 (cosine's α'(1) = 0).
  assert np.all(np.asarray(w) >= 0) and np.all(np.asarray(w[:-1]) > 0)
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(w, -s.dalpha(t) / (1 - s.alpha(t)), rtol=1e-6)
  # log-SNR decreases in t (away from t≈0, where float32 α rounds to 1 − eps).
  assert np.all(np.diff(np.asarray(s.log_snr(t[9:]))) < 0)


@pytest.mark.parametrize("name", NAMES)
def test_inverse(name):
  s = schedules.get_schedule(name)
  t = jnp.linspace(0.02, 0.98, 49)
  np.testing.assert_allclose(s.inverse(s.alpha(t)), t, atol=2e-4)


def test_known_values():
  t = jnp.float32(0.5)
  scale = 1 - 2 * schedules.EPS
  np.testing.assert_allclose(schedules.get_schedule("linear").alpha(t), scale * 0.5 + schedules.EPS, rtol=1e-6)
  np.testing.assert_allclose(schedules.get_schedule("poly3").alpha(t), scale * (1 - 0.125) + schedules.EPS, rtol=1e-6)
  np.testing.assert_allclose(
      schedules.get_schedule("cosine").alpha(t), scale * (1 - np.cos(np.pi / 4)) + schedules.EPS, rtol=1e-6)
  np.testing.assert_allclose(schedules.get_schedule("poly0.5").dalpha(jnp.float32(0.25)), -scale * 0.5 / 0.5, rtol=1e-6)


@pytest.mark.parametrize("bad", ["quadratic", "poly", "poly-1", "poly0", "polyx", "Linear", ""])
def test_unknown_names_raise_with_valid_forms(bad):
  with pytest.raises(ValueError, match="polyK"):
    schedules.get_schedule(bad)
