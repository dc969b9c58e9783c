"""group_norm.GroupNorm: nn.GroupNorm's (+ swish) values, gradients and parameters.

The hand-written backward is checked against autodiff of flax's composed ops
(float32: same values up to summation order) on several group sizes, with a
random cotangent, and against the analytic property of the statistics (each
group of the output has mean 0 and variance 1 with unit scale and zero bias).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax.networks import group_norm as group_norm_lib
from md4_jax.networks import layers


def _flax(x, scale, bias, groups, activation):
  y = nn.GroupNorm(num_groups=groups, epsilon=1e-6).apply(
      {"params": {"scale": scale, "bias": bias}}, x)
  return nn.swish(y) if activation == "swish" else y


def _ours(x, scale, bias, groups, activation):
  return group_norm_lib.group_norm(x, scale, bias, groups, 1e-6, activation)


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = jnp.asarray(rng.standard_normal(shape) * 3.0 + 1.5, jnp.float32)  # Off-centre, wide.
  scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(c), jnp.float32)
  bias = jnp.asarray(0.3 * rng.standard_normal(c), jnp.float32)
  dy = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return x, scale, bias, dy


@pytest.mark.parametrize("activation", [None, "swish"])
@pytest.mark.parametrize("shape,groups", [((2, 4, 4, 8), 4), ((3, 5, 6, 12), 3),
                                          ((2, 7, 16), 16), ((2, 3, 3, 6), 1)])
def test_values_and_gradients_match_flax(shape, groups, activation):
  x, scale, bias, dy = _inputs(shape)
  value_and_grads = lambda f: jax.jit(  # One compile each (eager dispatch is slow).
      lambda *a: (f(*a, groups, activation),
                  jax.grad(lambda *a: jnp.sum(f(*a, groups, activation) * dy),
                           argnums=(0, 1, 2))(*a)))
  got, got_grads = value_and_grads(_ours)(x, scale, bias)
  want, want_grads = value_and_grads(_flax)(x, scale, bias)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name, a, b in zip(("x", "scale", "bias"), got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()),
                               err_msg=f"d/d{name}")


def test_gradient_is_finite_difference():
  """Independent of flax: the x-gradient against central differences in float64 terms."""
  x, scale, bias, dy = _inputs((1, 3, 2, 4), seed=1)
  f = lambda x: float(jnp.sum(_ours(x, scale, bias, 2, "swish") * dy))
  grad = np.asarray(jax.grad(lambda x: jnp.sum(_ours(x, scale, bias, 2, "swish") * dy))(x))
  eps = 1e-2
  for index in [(0, 0, 0, 0), (0, 1, 1, 2), (0, 2, 0, 3)]:
    step = np.zeros(x.shape, np.float32)
    step[index] = eps
    numeric = (f(x + step) - f(x - step)) / (2 * eps)
    np.testing.assert_allclose(grad[index], numeric, rtol=2e-2, atol=2e-3)


def test_output_statistics():
  x, _, _, _ = _inputs((2, 8, 8, 6), seed=2)
  y = np.asarray(_ours(x, jnp.ones(6), jnp.zeros(6), 3, None)).reshape(2, 64, 3, 2)
  np.testing.assert_allclose(y.mean(axis=(1, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(axis=(1, 3)), 1.0, rtol=1e-4)


def test_module_parameters_are_flax_groupnorm_parameters():
  x, _, _, _ = _inputs((2, 4, 4, 64))
  ours = layers.group_norm(64, dtype=jnp.float32, param_dtype=jnp.float32, activation="swish")
  params = nn.meta.unbox(ours.init(jax.random.key(0), x))
  flax_params = nn.GroupNorm(num_groups=32).init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_params)
  # A checkpoint of one applies to the other.
  params = jax.tree.map(lambda p: p + 0.1, params)
  np.testing.assert_allclose(ours.apply(params, x),
                             nn.swish(nn.GroupNorm(num_groups=32, epsilon=1e-6).apply(params, x)),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_activations():
  x, scale, bias, _ = _inputs((2, 4, 4, 8))
  got = _ours(x.astype(jnp.bfloat16), scale, bias, 4, "swish")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), _flax(x, scale, bias, 4, "swish"),
                             rtol=3e-2, atol=3e-2)
  dx = jax.grad(lambda x: jnp.sum(_ours(x, scale, bias, 4, "swish").astype(jnp.float32)))(
      x.astype(jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16


def test_errors():
  x, scale, bias, _ = _inputs((1, 2, 2, 6))
  with pytest.raises(ValueError, match="activation"):
    _ours(x, scale, bias, 3, "gelu")
  with pytest.raises(ValueError, match="divide"):
    _ours(x, scale, bias, 4, None)
