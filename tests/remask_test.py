"""Samplers beyond the paper: ReMDM remasking and confidence-ordered unmasking.

Invariants: ReMDM with σ = 0 is the ancestral chain (same key, same samples); with σ > 0 the
masked fraction at every grid time still follows the schedule (the extra reveal mass is what
keeps it there); prompt positions never change. Ordered unmasking reveals exactly the scheduled
count per step, never changes a revealed token, reveals the surest positions first and is
deterministic given the key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import sampling
from md4_jax.diffusion.sampling import draws
from md4_jax.diffusion.sampling import ordered
from md4_jax.diffusion.sampling import remdm

V, L = 6, 12


def _sample(model, variables, rng, z_init=None, **static):
  fn = jax.jit(lambda v, r, z: sampling.sample(model, v, r, z_init=z, **static))
  return fn(variables, rng, z_init)


def _copy_left(time_weight=0.5, schedule="linear"):
  """A network that reads z and t (the chains' predictions change with both)."""
  model = helpers.md4(helpers.CopyLeft(V, time_weight), schedule, V, (L,))
  z = sampling.all_masked(model, 2)
  return model, model.init(jax.random.key(0), z, jnp.ones((2,)), method=model_lib.MD4.predict)


NO_CACHE = sampling.SamplerOptions(cache=False)


@pytest.mark.slow
@pytest.mark.parametrize("remask", ["cap", "rescale"])
def test_remdm_with_eta_zero_is_the_ancestral_chain(remask):
  model, variables = _copy_left()
  rng = jax.random.key(3)
  z0 = sampling.all_masked(model, 64).at[:, 0].set(2)  # A prompt token too.
  ancestral, _ = _sample(model, variables, rng, z0, steps=10, sampler="ancestral")
  remasked, stats = _sample(model, variables, rng, z0, steps=10,
                            sampler=remdm.ReMDM(eta=0.0, remask=remask), options=NO_CACHE)
  np.testing.assert_array_equal(remasked, ancestral)
  assert int(stats["nfe"]) == 10
  # With remasking the samples differ (the extra draws are used).
  other, _ = _sample(model, variables, rng, z0, steps=10,
                     sampler=remdm.ReMDM(eta=0.5, remask=remask), options=NO_CACHE)
  assert np.mean(np.asarray(other) != np.asarray(ancestral)) > 0.05


@pytest.mark.parametrize("remask, eta", [
    ("rescale", 0.8), pytest.param("cap", 0.3, marks=pytest.mark.slow),
    pytest.param("loop", 0.5, marks=pytest.mark.slow)])
def test_remdm_keeps_the_masked_fraction_on_the_schedule(remask, eta):
  """At every frame time τ the fraction of masked positions is 1 − α(τ) (4 standard errors),
  though tokens are re-masked all along: the reveal probability carries σ's extra mass."""
  model, variables = helpers.fixed_logits_model(np.zeros((L, V)))
  sampler = remdm.ReMDM(eta=eta, remask=remask)
  steps, frames, batch = 20, 5, 1024
  tokens, stats = _sample(model, variables, jax.random.key(1), sampling.all_masked(model, batch),
                          steps=steps, sampler=sampler, options=NO_CACHE, frames=frames)
  traj = np.asarray(stats["frames"])  # [K, B, L] at τ = 1, .75, .5, .25, 0.
  ts = sampling.time_grid("uniform", steps)
  _, alpha, sigma = remdm.remdm_path(model.schedule, ts, sampler)
  tau = np.linspace(1, 0, frames)
  want = 1.0 - np.interp(tau, np.asarray(ts), np.asarray(alpha))
  masked = (traj == model.mask_id).mean(axis=(1, 2))
  se = np.sqrt(want * (1 - want) / (batch * L)) + 1e-9
  assert np.all(np.abs(masked - want) < 4 * se + 1e-6), (masked, want)
  assert not np.any(np.asarray(tokens) == model.mask_id)
  assert float(np.max(sigma)) > 0.05  # Remasking was on.
  # Re-masking happened: some position is revealed in one frame and masked in a later one.
  assert np.any((traj[1:-1] != model.mask_id) & (traj[2:] == model.mask_id))


@pytest.mark.slow
def test_remdm_never_touches_the_prompt_and_leaves_no_mask():
  model, variables = _copy_left()
  z0 = sampling.all_masked(model, 32).at[:, :4].set(jnp.array([1, 2, 3, 4]))
  tokens, _ = _sample(model, variables, jax.random.key(5), z0, steps=16,
                      sampler=remdm.ReMDM(eta=0.9, remask="rescale"), options=NO_CACHE)
  tokens = np.asarray(tokens)
  np.testing.assert_array_equal(tokens[:, :4], np.broadcast_to([1, 2, 3, 4], (32, 4)))
  assert tokens.max() < V


def test_remdm_loop_path_holds_alpha_in_the_window():
  model, _ = helpers.fixed_logits_model(np.zeros((L, V)))
  ts = sampling.time_grid("uniform", 20)
  sampler = remdm.ReMDM(eta=0.1, remask="loop", loop=(0.55, 0.05, 0.9))
  t_net, alpha, sigma = (np.asarray(a) for a in remdm.remdm_path(model.schedule, ts, sampler))
  window = (np.asarray(ts) >= 0.05) & (np.asarray(ts) <= 0.55)
  np.testing.assert_allclose(alpha[window], 0.9, atol=1e-6)
  assert np.all(np.diff(alpha) <= 1e-7)  # α falls as τ rises (the chain walks τ down).
  np.testing.assert_allclose(np.asarray(model.schedule.alpha(t_net)), alpha, atol=1e-5)
  # σ = η inside the loop (capped), 0 outside and at the last step.
  steps_in_loop = sigma > 0
  assert steps_in_loop.sum() == 10 and sigma[-1] == 0
  np.testing.assert_allclose(sigma[steps_in_loop], 0.1, atol=1e-6)


def test_ordered_reveals_the_scheduled_count_surest_first_and_never_changes_a_token():
  # Position n is sure of token n % V with confidence growing with n.
  logits = np.full((L, V), 0.0)
  for n in range(L):
    logits[n, n % V] = 0.5 + 0.4 * n
  model, variables = helpers.fixed_logits_model(logits)
  steps, batch = 6, 16
  for order in ordered.ORDERS:
    options = sampling.SamplerOptions(cache=False, temperature=0.0)
    tokens, stats = _sample(model, variables, jax.random.key(0), sampling.all_masked(model, batch),
                            steps=steps, sampler=ordered.Ordered(order=order), options=options,
                            frames=steps + 1)
    traj = np.asarray(stats["frames"])  # Frames on the grid: the state before each step.
    masked = (traj == model.mask_id).sum(axis=-1)  # [K, B]
    want = np.asarray(ordered.reveal_counts(
        model.schedule.alpha(sampling.time_grid("uniform", steps)),
        jnp.full((batch,), L)))[::-1]
    np.testing.assert_array_equal(masked, want)
    revealed = traj[:-1] != model.mask_id
    assert np.all(traj[1:][revealed] == traj[:-1][revealed]), order  # Never changed.
    # The surest positions go first: the last ones (largest n) are revealed at step 1.
    first = np.flatnonzero(traj[1, 0] != model.mask_id)
    np.testing.assert_array_equal(first, np.arange(L - len(first), L))
    np.testing.assert_array_equal(np.asarray(tokens)[0], np.arange(L) % V)  # Argmax tokens.


@pytest.mark.slow
def test_ordered_is_deterministic_given_the_key_and_draws_at_temperature_one():
  model, variables = _copy_left()
  margin = ordered.Ordered(order="margin")
  z0 = sampling.all_masked(model, 64)
  a, _ = _sample(model, variables, jax.random.key(2), z0, steps=8, sampler=margin,
                 options=NO_CACHE)
  b, _ = _sample(model, variables, jax.random.key(2), z0, steps=8, sampler=margin,
                 options=NO_CACHE)
  c, _ = _sample(model, variables, jax.random.key(9), z0, steps=8, sampler=margin,
                 options=NO_CACHE)
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))
  assert np.asarray(a).max() < V


@pytest.mark.parametrize("kwargs, match", [
    (dict(sampler="remdm", options=sampling.SamplerOptions()), "caching does not apply"),
    (dict(sampler="ordered", options=sampling.SamplerOptions()), "caching does not apply"),
    (dict(sampler=remdm.ReMDM(remask="max"), options=NO_CACHE), "Unknown remasking strategy"),
    (dict(sampler=remdm.ReMDM(eta=1.5), options=NO_CACHE), "eta must"),
    (dict(sampler=remdm.ReMDM(remask="loop", loop=(0.05, 0.55, 0.9)), options=NO_CACHE),
     "loop strategy needs"),
    (dict(sampler=ordered.Ordered(order="random"), options=NO_CACHE), "Unknown order"),
    (dict(sampler="ancestral", options=sampling.SamplerOptions(temperature=0.0)),
     "temperature 0"),
])
def test_bad_combinations_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.check_arguments(steps=8, grid="uniform", **kwargs)


# ------------------------------------------------------------ guidance ---

import flax.linen as nn  # noqa: E402

from md4_jax.experiment import validation  # noqa: E402

from md4_jax.run import saved_config  # noqa: E402
from md4_jax.experiment import step as step_lib  # noqa: E402


class ClassTable(nn.Module):
  """Logits = a table row per label; row `num_classes` is the null label (and cond=None)."""

  vocab_size: int
  num_classes: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, train
    table = self.param("table", nn.initializers.normal(1.0),
                       (self.num_classes + 1, self.vocab_size))
    if cond is None:
      cond = jnp.full((z.shape[0],), self.num_classes, jnp.int32)
    return jnp.broadcast_to(table[cond][:, None], z.shape + (self.vocab_size,))


def test_guided_logits_formula():
  c, u = jnp.log(jnp.array([0.5, 0.3, 0.2])), jnp.log(jnp.array([0.2, 0.3, 0.5]))
  np.testing.assert_allclose(draws.guided_logits(c, u, 0.0), jax.nn.log_softmax(c), atol=1e-6)
  np.testing.assert_allclose(draws.guided_logits(c + 3.0, u - 1.0, 2.0), 3 * c - 2 * u,
                             atol=1e-5)


@pytest.mark.slow
def test_guided_samples_follow_the_sharpened_law():
  """One step from all-mask: each token ~ softmax((1 + w) log p(x|c) − w log p(x|∅))."""
  model = helpers.md4(ClassTable(V, 3), "linear", V, (L,))
  cond = jnp.full((2048,), 1, jnp.int32)
  variables = model.init(jax.random.key(0), sampling.all_masked(model, 2), jnp.ones((2,)),
                         cond[:2], method=model_lib.MD4.predict)
  table = np.asarray(variables["params"]["network"]["table"])
  w = 1.5
  fn = jax.jit(lambda v, r, c: sampling.sample(
      model, v, r, batch_size=2048, cond=c, steps=1, sampler="ancestral",
      options=sampling.SamplerOptions(guidance=w)))
  tokens, stats = fn(variables, jax.random.key(4), cond)
  assert int(stats["nfe"]) == 1  # One batched call for both halves.
  # w = 0 is the conditional model: the same samples as without guidance, same key.
  draw = lambda options: jax.jit(lambda v, r, c: sampling.sample(
      model, v, r, batch_size=64, cond=c, steps=2, sampler="ancestral", options=options))(
          variables, jax.random.key(6), cond[:64])[0]
  np.testing.assert_array_equal(draw(sampling.SamplerOptions(guidance=0.0)),
                                draw(sampling.SamplerOptions()))
  logp = lambda row: row - np.log(np.exp(row).sum())
  law = np.exp((1 + w) * logp(table[1]) - w * logp(table[3]))
  law /= law.sum()
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=V)
  assert helpers.chi_square_pvalue(counts, law) > 1e-3, (counts / counts.sum(), law)
  conditional = np.exp(logp(table[1]))
  assert helpers.chi_square_pvalue(counts, conditional) < 1e-6  # Guidance changed the law.
  with pytest.raises(ValueError, match="guidance needs a class-conditional model"):
    sampling.sample(model, variables, jax.random.key(0), batch_size=4, steps=1,
                    options=sampling.SamplerOptions(guidance=1.0))


@pytest.mark.slow
def test_label_dropout_trains_on_the_null_label():
  """Every label dropped = training on the null label (id = classes); the drop rate is p."""
  model = helpers.md4(ClassTable(V, 3), "linear", V, (L,))
  x = jnp.asarray(np.random.default_rng(0).integers(0, V, (8, L)), jnp.int32)
  params = model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x,
                      jnp.zeros((8,), jnp.int32))["params"]
  grads = lambda labels, rate: step_lib.compute_grads(model, params, {"x": x, "label": labels},
                                                      jax.random.key(1), label_dropout=rate)[0]
  dropped_all = grads(jnp.arange(8, dtype=jnp.int32) % 3, 0.999999)
  on_null = grads(jnp.full((8,), 3, jnp.int32), 0.0)
  jax.tree.map(np.testing.assert_allclose, dropped_all, on_null)
  kept = grads(jnp.arange(8, dtype=jnp.int32) % 3, 0.0)
  assert not np.allclose(kept["network"]["table"], on_null["network"]["table"])
  dropped = step_lib.drop_labels(jnp.zeros((20000,), jnp.int32), 0.2, 10, jax.random.key(0))
  assert abs(float(jnp.mean(dropped == 10)) - 0.2) < 0.015
  config = helpers.digits_tiny(label_dropout=0.1, classes=0)
  with pytest.raises(ValueError, match="needs config.classes > 0"):
    validation.validate(config)
