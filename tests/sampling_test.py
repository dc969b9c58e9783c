"""Samplers: marginals, fixed positions, caching, first-hitting, exact rare-token draws."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import samplers

V, L = 5, 8
P = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


class Fixed(nn.Module):
  """Ignores z and t: the same distribution p at every position."""

  probs: tuple = tuple(P)
  time_features: str = "none"

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    logp = jnp.log(jnp.asarray(self.probs, jnp.float32))
    return jnp.broadcast_to(logp, z.shape + (len(self.probs),))


MODEL = model_lib.MD4(Fixed(), "linear", V, (L,))


def _chi2_ok(tokens, probs, vocab):
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab)
  n = counts.sum()
  keep = probs > 0
  assert counts[~keep].sum() == 0
  stat = (((counts - n * probs) ** 2)[keep] / (n * probs[keep])).sum()
  return stat < 25.0  # chi2 with <= 4 dof: p-value ~ 4e-5


@pytest.mark.parametrize("sampler, steps", [("ancestral", 40), ("mean", 40), ("first_hitting", None)])
def test_marginals_equal_the_prediction(sampler, steps):
  tokens, stats = jax.jit(lambda r: samplers.sample(
      MODEL, {}, r, batch_size=2000, steps=steps, sampler=sampler))(jax.random.key(0))
  assert _chi2_ok(tokens, P, V)
  assert not bool(jnp.any(tokens == V))


def test_topp_marginals_are_the_renormalised_nucleus():
  tokens, _ = jax.jit(lambda r: samplers.sample(
      MODEL, {}, r, batch_size=2000, steps=40, sampler="topp",
      options=samplers.SamplerOptions(top_p=0.8)))(jax.random.key(1))
  nucleus = np.where(np.arange(V) < 3, P, 0.0)  # 0.5 + 0.2 + 0.15 >= 0.8
  assert _chi2_ok(tokens, nucleus / nucleus.sum(), V)


def test_fixed_positions_never_change_and_no_mask_remains():
  z = jnp.full((64, L), V, jnp.int32).at[:, :3].set(4).at[:, -1].set(3)
  for sampler, steps in (("ancestral", 16), ("first_hitting", None)):
    out, _ = samplers.sample(MODEL, {}, jax.random.key(2), z_init=z, steps=steps, sampler=sampler)
    assert bool(jnp.all(out[:, :3] == 4)) and bool(jnp.all(out[:, -1] == 3))
    assert not bool(jnp.any(out == V))


def test_cache_gives_identical_samples_with_fewer_network_calls():
  run = lambda cache: jax.jit(lambda r: samplers.sample(
      MODEL, {}, r, batch_size=16, steps=256,
      options=samplers.SamplerOptions(cache=cache)))(jax.random.key(3))
  (cached, stats_c), (plain, stats_p) = run(True), run(False)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))
  assert int(stats_p["nfe"]) == 256
  assert int(stats_c["nfe"]) <= 256 // 3  # At most one call per revealing step.


def test_first_hitting_makes_one_call_per_masked_position():
  z = jnp.full((4, L), V, jnp.int32).at[:, :2].set(0)
  _, stats = samplers.sample(MODEL, {}, jax.random.key(4), z_init=z, steps=None,
                             sampler="first_hitting")
  assert int(stats["nfe"]) == L - 2


def test_exact_draws_match_a_rare_token_and_float32_falls_short():
  """p(rare) = 1e-5 over 1000 ancestral steps, 4e6 positions (Zheng et al. 2024)."""
  rare = 1e-5
  probs = (1.0 - rare, rare)
  model = model_lib.MD4(Fixed(probs=probs), "linear", 2, (1000,))
  def count(exact, key):
    out, _ = samplers.sample(model, {}, key, batch_size=1000, steps=1000,
                             options=samplers.SamplerOptions(exact=exact, cache=False))
    return jnp.sum(out == 1)
  n = 1000 * 1000 * 4
  exact = sum(int(jax.jit(lambda k: count(True, k))(jax.random.key(s))) for s in range(4))
  f32 = sum(int(jax.jit(lambda k: count(False, k))(jax.random.key(s))) for s in range(4))
  expected, sd = n * rare, np.sqrt(n * rare)
  assert abs(exact - expected) < 4 * sd, (exact, expected)
  # float32 Gumbel noise caps near 16-17: the rare token is drawn far too seldom.
  assert f32 < expected - 4 * sd, (f32, expected)
