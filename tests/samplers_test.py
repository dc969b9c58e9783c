"""Samplers: marginals, conditioning, caching, first hitting, exact draws, meshes.

Toy networks keep compiles short (each jit costs seconds on a 2-core CPU);
their logits come from parameters, not constants, so XLA does not spend the
compile constant-folding the chain. One smoke test runs the real UNet.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import CopyLeft
from md4_jax.experiment import parallel
from md4_jax.metrics import sample_stats
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import sampling
from md4_jax.diffusion.sampling import draws
from md4_jax.diffusion.sampling import grid
from md4_jax.diffusion.sampling import ordered
from md4_jax.diffusion.sampling import remdm
from md4_jax.diffusion import schedules
from md4_jax.experiment import build

V = 5
L = 8


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


class CountVisible(nn.Module):
  """Predicts, everywhere, the token (number of unmasked positions) mod V, surely."""

  vocab_size: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, cond, train
    scale = self.param("scale", nn.initializers.constant(40.0), ())
    count = jnp.sum(z < self.vocab_size, axis=-1) % self.vocab_size
    return jnp.broadcast_to(scale * jax.nn.one_hot(count, self.vocab_size)[:, None],
                            z.shape + (self.vocab_size,))


class Oracle(nn.Module):
  """Predicts a target x [B, L] (the parameter 'x') with near certainty."""

  vocab_size: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, cond, train
    x = self.param("x", nn.initializers.zeros_init(), z.shape, jnp.int32)
    return 40.0 * jax.nn.one_hot(x, self.vocab_size)


class LabelNet(nn.Module):
  """Predicts token = class label at every position."""

  vocab_size: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, train
    scale = self.param("scale", nn.initializers.constant(40.0), ())
    return jnp.broadcast_to(scale * jax.nn.one_hot(cond, self.vocab_size)[:, None],
                            z.shape + (self.vocab_size,))


_fixed_model = helpers.fixed_logits_model


def _init(model, batch=2):
  z = sampling.all_masked(model, batch)
  return model.init(jax.random.key(0), z, jnp.ones((batch,)), method=model_lib.MD4.predict)


def _sample(model, variables, rng, z_init=None, fixed=None, cond=None, **static):
  """sampling.sample jitted with the arrays as arguments (closed-over arrays
  would become constants that XLA spends the compile folding)."""
  fn = jax.jit(lambda v, r, z, f, c: sampling.sample(model, v, r, z_init=z, fixed=f, cond=c,
                                                     **static))
  return fn(variables, rng, z_init, fixed, cond)


def _counts(tokens_BxL, vocab):
  return np.stack([np.bincount(col, minlength=vocab) for col in np.asarray(tokens_BxL).T])


# A permuted copy of one distribution per position; top-p 0.85 keeps 3 tokens.
_BASE_PROBS = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
_PROBS = np.stack([np.random.default_rng(i).permutation(_BASE_PROBS) for i in range(L)])


@pytest.mark.parametrize("sampler,options", [
    ("ancestral", sampling.SamplerOptions()),
    ("ancestral", sampling.SamplerOptions(cache=False, temperature=2.0)),
    ("ancestral", sampling.SamplerOptions(exact=False)),
    (grid.TopP(top_p=0.85), sampling.SamplerOptions()),
    ("mean", sampling.SamplerOptions(exact=False)),
    ("first_hitting", sampling.SamplerOptions()),
])
def test_final_marginals_equal_the_prediction(sampler, options):
  model, variables = _fixed_model(np.log(_PROBS), schedule="cosine")
  batch = 4000
  tokens, stats = _sample(model, variables, jax.random.key(1), batch_size=batch, steps=32,
                          sampler=sampler, grid="cosine", options=options)
  probs = _PROBS ** (1.0 / options.temperature)
  if sampling.get(sampler).name == "topp":
    probs = np.where(probs >= np.sort(probs, axis=1)[:, -3:-2], probs, 0.0)
  probs = probs / probs.sum(axis=1, keepdims=True)
  counts = _counts(tokens, V)
  assert counts.sum() == batch * L  # No mask id left.
  assert helpers.chi_square_pvalue(counts, probs) > 1e-3
  if sampler == "first_hitting":
    assert int(stats["nfe"]) == L
  elif options.exact and options.cache:
    assert int(stats["nfe"]) <= L + 1
  else:
    assert int(stats["nfe"]) == 32


@pytest.mark.parametrize("sampler", ["ancestral", "topp", "mean", "first_hitting"])
def test_fixed_positions_never_change_and_no_mask_remains(sampler):
  model = helpers.md4(CopyLeft(V), "cosine", V, (16,))
  variables = _init(model)
  rng = np.random.default_rng(0)
  batch = 6
  x = rng.integers(0, V, size=(batch, 16)).astype(np.int32)
  fixed = rng.random((batch, 16)) < 0.4
  fixed[0] = False  # One unconditional row,
  fixed[1] = True   # one fully given row,
  fixed[2, :8] = True  # a prefix,
  fixed[2, 8:] = False
  fixed[3] = False  # and a middle span.
  fixed[3, :4] = fixed[3, 12:] = True
  tokens, stats = _sample(model, variables, jax.random.key(2), z_init=x, fixed=fixed, steps=20,
                          sampler=sampler, frames=5)
  tokens, frames = np.asarray(tokens), np.asarray(stats["frames"])
  assert tokens.min() >= 0 and tokens.max() < V
  np.testing.assert_array_equal(tokens[fixed], x[fixed])
  np.testing.assert_array_equal(frames[0], np.where(fixed, x, V))
  np.testing.assert_array_equal(frames[-1], tokens)
  for frame in frames:  # Fixed positions hold in every frame; masks only go away.
    np.testing.assert_array_equal(frame[fixed], x[fixed])
  masked = (frames == V).sum(axis=(1, 2))
  assert np.all(np.diff(masked) <= 0) and masked[-1] == 0


@pytest.mark.slow
@pytest.mark.parametrize("time_weight", [0.0, 1.0])
def test_skipping_idle_steps_changes_nothing_but_the_nfe(time_weight):
  # time_weight 0: a time-independent network; 1: one that depends on t.
  length, steps, batch = 64, 1024, 4
  model = helpers.md4(CopyLeft(V, time_weight), "linear", V, (length,))
  variables = _init(model)

  def run(cache, batch):
    options = sampling.SamplerOptions(cache=cache)
    return _sample(model, variables, jax.random.key(3), batch_size=batch, steps=steps,
                   options=options, frames=6)

  cached, cached_stats = run(True, batch)
  plain, plain_stats = run(False, batch)
  np.testing.assert_array_equal(cached, plain)
  np.testing.assert_array_equal(cached_stats["frames"], plain_stats["frames"])
  assert int(plain_stats["nfe"]) == steps
  assert int(cached_stats["nfe"]) <= length + 1 and 3 * int(cached_stats["nfe"]) < steps
  if time_weight == 0.0:  # Example b's draws depend on (rng, b) only, not on the batch.
    half, _ = run(True, batch // 2)
    np.testing.assert_array_equal(half, np.asarray(cached)[: batch // 2])


def test_first_hitting_reveals_exactly_one_token_per_call_and_example():
  # The token revealed at a call is the number of unmasked positions seen by
  # that call: one reveal per call per example ⇔ the generated tokens of an
  # example that starts with k visible positions are exactly k, k+1, ..., D−1.
  length, vocab = 8, 16
  model = helpers.md4(CountVisible(vocab), "cosine", vocab, (length,))
  variables = _init(model)
  batch = 64
  rng = np.random.default_rng(4)
  fixed = rng.random((batch, length)) < rng.random((batch, 1))
  fixed[0] = False
  x = np.full((batch, length), vocab - 1, np.int32)  # Never a count below L.
  tokens, stats = _sample(model, variables, jax.random.key(5), z_init=x, fixed=fixed, steps=None,
                          sampler="first_hitting")
  tokens = np.asarray(tokens)
  for b in range(batch):
    visible = int(fixed[b].sum())
    np.testing.assert_array_equal(np.sort(tokens[b][~fixed[b]]), np.arange(visible, length))
  assert int(stats["nfe"]) == length == int((~fixed).sum(axis=1).max())


def _float32_rare_frequency(p_rare, steps, top=2**14):
  """Probability that the float32 reference chain (exact=False) draws the rare token.

  Computed exactly instead of simulated: a simulation needs ~4e6 positions ×
  1000 steps × 3 outcomes ≈ 1e10 Gumbel draws (~5 min here; run it with
  `python benchmarks/sample.py --exactness`). jax.random.categorical adds
  float32 Gumbel noise g = −log(−log u), u uniform over {tiny, k·2^-23 : 0 < k <
  2^23}. Step i draws one of [p_u·p_rare, p_u·(1 − p_rare), 1 − p_u]; the rare
  outcome wins iff its l + g beats both others, so its probability is the
  sum over the values of its g of 2^-23 · Π_others P(g' ≤ l_rare + g − l').
  Only the `top` largest g can win (asserted).
  """
  n = 2**23
  k = np.arange(n - top, n, dtype=np.float64)
  g_top = np.asarray(-jnp.log(-jnp.log(jnp.asarray((k / n).astype(np.float32)))), np.float64)
  g_tiny = -math.log(-math.log(np.finfo(np.float32).tiny))

  def cdf(x):  # P(g ≤ x) for the float32 Gumbel.
    below = np.clip(np.floor(np.exp(-np.exp(-x)) * n), 0, n - 1)
    return (below + (x >= g_tiny)) / n

  alpha = np.asarray(schedules.get_schedule("linear").alpha(
      jnp.arange(steps + 1, dtype=jnp.float32) / steps), np.float64)
  total = 0.0
  for i in range(steps):
    a_t, a_s = alpha[steps - i], alpha[steps - i - 1]
    p_u = (a_s - a_t) / (1 - a_t)
    still_masked = (1 - a_t) / (1 - alpha[steps])
    l_rare = math.log(p_u * p_rare)
    wins = cdf(l_rare + g_top - math.log(p_u * (1 - p_rare)))
    wins = wins * cdf(l_rare + g_top - math.log1p(-p_u))
    assert wins[0] == 0.0, "raise `top`: smaller Gumbel values can still win"
    total += still_masked * wins.sum() / n
  return total


@pytest.mark.slow
def test_exact_draws_keep_a_rare_token_and_float32_draws_lose_it():
  # A fixed distribution with tokens of probability 1e-4 and 1e-5, 1000 linear
  # ancestral steps, 4e6 positions: the exact path's frequencies match.
  p_rare = np.array([1e-4, 1e-5])
  probs = np.concatenate([[1.0 - p_rare.sum()], p_rare])
  length, batch, steps = 4, 1_000_000, 1000
  model, variables = _fixed_model(np.log(np.tile(probs, (length, 1))))
  tokens, _ = _sample(model, variables, jax.random.key(6), batch_size=batch, steps=steps)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=3)
  num_draws = batch * length
  for token, p in zip((1, 2), p_rare):
    expected = num_draws * p
    assert abs(counts[token] - expected) < 4 * math.sqrt(expected), (token, counts, expected)

  # The float32 reference step (exact=False): one categorical over
  # [p_u·p, 1 − p_u] whose Gumbel noise is capped near 16. A token of
  # probability 1e-5 comes out ~7x too rarely (MD4_MATH.md measured 1.8e-6 by
  # simulation; benchmarks/RESULTS.md records ours).
  f32 = _float32_rare_frequency(1e-5, steps)
  assert 1e-6 < f32 < 0.3 * 1e-5, f32
  # Its noise is what the computation assumes: never above g(1 − 2^-23) ≈ 15.9.
  g = jax.random.gumbel(jax.random.key(7), (1 << 22,), jnp.float32)
  assert float(jnp.max(g)) <= -math.log(-math.log1p(-2.0**-23)) + 1e-3
  # The exact noise reaches beyond it (P(g > 16) ≈ 1.1e-7 per draw) ...
  assert float(jnp.max(draws.exact_gumbel(jax.random.key(8), (1 << 25,)))) > 16.0


def test_exact_gumbel_tails():
  g = np.asarray(draws.exact_gumbel(jax.random.key(9), (1 << 22,)), np.float64)
  n = g.size
  for x in (-1.5, 0.0, 2.0, 8.0):  # P(g > x) = 1 − exp(−e^{−x}).
    p = -math.expm1(-math.exp(-x))
    assert abs(np.mean(g > x) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-7, x
  u = np.asarray(draws.fine_uniform(jax.random.key(10), (1 << 22,)))
  assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 1e-3
  assert np.sum(u < 2.0**-24) <= 5  # Resolved below float32's 2^-24 step.


@pytest.mark.slow
def test_class_labels_and_reconstruction():
  label_model = helpers.md4(LabelNet(V), "cosine", V, (L,))
  cond = jnp.arange(8, dtype=jnp.int32) % V
  tokens, _ = _sample(label_model, {"params": {"network": {"scale": jnp.float32(40.0)}}},
                      jax.random.key(11), cond=cond, batch_size=8, steps=10)
  np.testing.assert_array_equal(tokens, np.repeat(np.asarray(cond)[:, None], L, axis=1))

  x = np.random.default_rng(12).integers(0, V, size=(512, L)).astype(np.int32)
  model = helpers.md4(Oracle(V), "cosine", V, (L,))
  variables = {"params": {"network": {"x": jnp.asarray(x)}}}
  t = 0.6
  for sampler in ("ancestral", "first_hitting"):
    z_t, tokens, stats = jax.jit(lambda v, r, x: sampling.reconstruct(
        model, v, r, x, t, steps=16, sampler=sampler, frames=3))(variables, jax.random.key(13), x)
    z_t = np.asarray(z_t)
    rate = np.mean(z_t == V)
    expected = 1 - float(model.schedule.alpha(t))
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / z_t.size)
    np.testing.assert_array_equal(z_t[z_t < V], x[z_t < V])
    np.testing.assert_array_equal(tokens, x)
    np.testing.assert_array_equal(stats["frames"][0], z_t)


@pytest.mark.slow
@pytest.mark.parametrize("sampler, options", [
    ("ancestral", sampling.SamplerOptions()), ("first_hitting", sampling.SamplerOptions()),
    (remdm.ReMDM(eta=0.3, remask="rescale"), sampling.SamplerOptions(cache=False)),
    (ordered.Ordered(order="margin"), sampling.SamplerOptions(cache=False))])
def test_sharded_sampling_equals_one_device(sampler, options):
  mesh = parallel.make_mesh({"data": -1})
  assert parallel.batch_size_per_shard(mesh) == 8
  model = helpers.md4(CopyLeft(V, time_weight=0.5), "cosine", V, (12,))
  variables = _init(model)
  # The mesh and its rules around a toy model.
  experiment = dataclasses.replace(build.setup(helpers.digits_tiny(), mesh), model=model)
  batch = 16
  z = np.full((batch, 12), V, np.int32)
  z[:, :3] = np.arange(3)  # A prefix.
  kwargs = dict(steps=64, sampler=sampler, frames=4, options=options)
  one = jax.jit(lambda v, r, z: sampling.sample(model, v, r, z_init=z, **kwargs))(
      variables, jax.random.key(14), z)
  fn = experiment.sampler(**kwargs)
  tokens, stats = fn(variables, jax.random.key(14), z)
  assert tokens.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
  np.testing.assert_array_equal(tokens, one[0])
  np.testing.assert_array_equal(stats["frames"], one[1]["frames"])
  assert int(stats["nfe"]) == int(one[1]["nfe"])
  with pytest.raises(ValueError, match="divisible"):
    fn(variables, jax.random.key(14), z[:12])


@pytest.mark.slow
def test_unet_smoke_class_conditional_inpainting():
  model = build.build_model(helpers.digits_tiny("tiny_cond"))
  variables = _init(model)
  batch = 4
  x = np.random.default_rng(15).integers(0, 17, size=(batch, 8, 8, 1)).astype(np.int32)
  fixed = np.zeros(x.shape, bool)
  fixed[:, :4] = True  # Inpaint the bottom half.
  cond = jnp.arange(batch, dtype=jnp.int32)

  tokens, stats = _sample(model, variables, jax.random.key(16), z_init=x, fixed=fixed, cond=cond,
                          steps=50)
  tokens = np.asarray(tokens)
  assert tokens.shape == x.shape and tokens.min() >= 0 and tokens.max() < 17
  np.testing.assert_array_equal(tokens[fixed], x[fixed])
  assert 0 < int(stats["nfe"]) <= 33  # At most one call per generated pixel (+1).


def test_bad_arguments_raise():
  model, variables = _fixed_model(np.zeros((L, V)))
  with pytest.raises(ValueError, match="Unknown sampler"):
    sampling.sample(model, variables, jax.random.key(0), batch_size=2, steps=4, sampler="nope")
  with pytest.raises(ValueError, match="time grid"):
    sampling.sample(model, variables, jax.random.key(0), batch_size=2, steps=4, grid="log")
  with pytest.raises(ValueError, match="steps"):
    sampling.sample(model, variables, jax.random.key(0), batch_size=2, steps=None)
  with pytest.raises(ValueError, match="batch_size or z_init"):
    sampling.sample(model, variables, jax.random.key(0), steps=4)
  with pytest.raises(ValueError, match="example shape"):
    sampling.sample(model, variables, jax.random.key(0), z_init=np.zeros((2, 3), np.int32), steps=4)


def test_unigram_entropy():
  tokens = np.array([[3, 3, 3, 3], [0, 1, 0, 1], [0, 1, 2, 3]])
  np.testing.assert_allclose(sample_stats.unigram_entropy(tokens),
                             [0.0, np.log(2), np.log(4)], atol=1e-12)
  images = np.random.default_rng(0).integers(0, 16, (2, 64, 64, 1))  # Extra axes: one sample.
  np.testing.assert_allclose(sample_stats.unigram_entropy(images), np.log(16), atol=0.01)


def test_top_p_one_keeps_every_token_and_ties_keep_the_smallest_prefix():
  # p = 1 over a GPT-2-sized vocabulary: nothing may be cut (float32 cumulative
  # sums used to drop a tail of ~50 tokens with mass ~2e-7).
  logits = jax.random.normal(jax.random.key(0), (2, 50257)) * 3.0
  kept = draws.top_p_logits(logits, 1.0)
  assert bool(jnp.all(jnp.isfinite(kept)))
  np.testing.assert_array_equal(kept, logits)
  # Four tied tokens, p = 0.5: the smallest prefix reaching p is two tokens,
  # the lower ids first (the rule in the docstring), never all four.
  tied = jnp.log(jnp.asarray([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3]]))
  out = np.isfinite(np.asarray(draws.top_p_logits(tied, 0.5)))
  np.testing.assert_array_equal(out, [[True, True, False, False], [False, True, True, False]])
  # Mass exactly reached by a prefix: no extra token.
  out = np.isfinite(np.asarray(draws.top_p_logits(jnp.log(jnp.asarray([0.5, 0.3, 0.2])), 0.8)))
  np.testing.assert_array_equal(out, [True, True, False])
  # Every kept set reaches p, and dropping its least likely token would not.
  probs = np.asarray(jax.nn.softmax(logits[:, :64]))
  for p in (0.1, 0.5, 0.9, 0.99):
    keep = np.isfinite(np.asarray(draws.top_p_logits(logits[:, :64], p)))
    for row, k in zip(probs, keep):
      assert row[k].sum() >= p - 1e-6 and row[k].sum() - row[k].min() < p


def test_class_labels():
  np.testing.assert_array_equal(sampling.class_labels(3, 5), [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(sampling.class_labels(3, 2, offset=4), [1, 2])
  np.testing.assert_array_equal(sampling.class_labels(10, 3, label=7), [7, 7, 7])
  assert sampling.class_labels(0, 4) is None
  with pytest.raises(ValueError, match="classes=0"):
    sampling.class_labels(0, 4, label=1)
  with pytest.raises(ValueError, match="label 10"):
    sampling.class_labels(10, 4, label=10)
