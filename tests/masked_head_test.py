"""The head strategies of fused_head.py, and masked_head: the head at the masked positions only.

Each check compares against the plain network and loss on the same
parameters, data, times and masks (tolerances as in perf_test.py: only the
order of float32 sums changes), plus the pure pieces: the capacity of the
packed buffer against Monte Carlo draws of the real times and masks, the
interleaved antithetic strata, and the packing itself.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4_jax.configs import base
from md4_jax import networks
from md4_jax.experiment import parallel
from md4_jax.diffusion import fused_head
from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import schedules
from md4_jax.experiment import build
from md4_jax.experiment import step as step_lib

import helpers

B, L, V = 8, 32, 11
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # atol relative to the largest |gradient|.


def _config(**overrides):
  return helpers.transformer_config(L, V, width=16, depth=1, num_heads=2, **overrides)


def _model(config, **attributes):
  return model_lib.build_model(config, networks.build_network(config)).clone(**attributes)


@functools.cache
def _params():
  """Randomised parameters (adaLN-zero would hide errors at init)."""
  model = _model(_config())
  x = jnp.zeros((B, L), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, t=jnp.ones((B,)),
                                             noise=jnp.zeros((B, L))))
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                      nn.meta.unbox(shapes)["params"])


def _inputs(groups: int = 1):
  """Tokens, antithetic times (strata interleaved over `groups`) and mask noise."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  t = losses.antithetic_times(jnp.float32(0.37), B, groups)
  noise = jnp.asarray(rng.uniform(size=(B, L)), jnp.float32)
  return x, t, noise


def _loss_and_grad(model, x, t, noise):
  """(batch-mean metrics, gradient of the loss) at the shared parameters."""
  def loss(p):
    metrics = model.apply({"params": p}, x, None, train=True, t=t, noise=noise)
    return metrics["loss"], metrics
  (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(_params())
  return metrics, grads


@functools.cache
def _reference(cont_time: bool, groups: int):
  x, t, noise = _inputs(groups)
  return _loss_and_grad(_model(_config(cont_time=cont_time, timesteps=10)), x, t, noise)


def _assert_equal(metrics, grads, ref_metrics, ref_grads):
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=LOSS_RTOL)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=GRAD_RTOL,
                                                       atol=GRAD_ATOL * scale), grads, ref_grads)


_SLOW = pytest.mark.slow  # The fast tier keeps one case of each check.


class _MaskedNLL(nn.Module):
  """fused_head.masked_nll around a network, so its parameters sit where MD4's do."""

  network: nn.Module
  strategy: fused_head.Strategy

  def __call__(self, z_t, t, x, masked):
    return fused_head.masked_nll(self.network, z_t, t, None, True, x, masked, self.strategy)


@pytest.mark.slow  # Five strategies x values and gradients (~40 s): the full suite.
def test_every_head_strategy_gives_the_same_sums_and_gradients():
  """fused_head.masked_nll, plain vs chunked vs masked-only (with and without chunks, and
  its overflow fallback): the same sum for every example, and the same gradient of a
  random combination of them (so a sum given to the wrong example fails too)."""
  x, t, noise = _inputs(2)
  z_t, masked = losses.forward_mask(x, schedules.get_schedule("linear").alpha(t), noise, V)
  most = int(jnp.max(jnp.sum(masked.reshape(2, -1), axis=-1)))
  room = lambda n: 8 * -(-most // 8) + 8  # Holds every group's masked positions ...
  assert room(B // 2) < B // 2 * L  # ... in fewer slots than the group has.
  strategies = {
      "chunked": fused_head.Strategy(chunk_size=12),  # 12 divides neither L nor C.
      "masked_only": fused_head.Strategy(masked_only=True, groups=2, capacity=room),
      "masked_only_chunked": fused_head.Strategy(chunk_size=12, masked_only=True, groups=2,
                                                 capacity=room),
      "overflow": fused_head.Strategy(masked_only=True, groups=2, capacity=lambda n: 16),
  }
  network = networks.build_network(_config())
  ct_B = jnp.asarray(np.random.default_rng(5).standard_normal(B), jnp.float32)

  def run(strategy):
    def combination(p):
      sums_B, stats = _MaskedNLL(network, strategy).apply({"params": p}, z_t, t, x, masked)
      return jnp.sum(sums_B * ct_B), (sums_B, stats)
    return jax.jit(jax.value_and_grad(combination, has_aux=True))(_params())

  (_, (ref_B, ref_stats)), ref_grads = run(fused_head.Strategy())
  assert ref_stats == {}
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for name, strategy in strategies.items():
    (_, (sums_B, stats)), grads = run(strategy)
    np.testing.assert_allclose(sums_B, ref_B, rtol=LOSS_RTOL, err_msg=name)
    if strategy.masked_only:
      assert float(stats["masked_head_overflow"]) == float(name == "overflow"), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=GRAD_RTOL,
                                                         atol=GRAD_ATOL * scale, err_msg=name),
                 grads, ref_grads)


@pytest.mark.parametrize("cont_time,chunk,groups",
                         [(True, 12, 2), pytest.param(True, 0, 1, marks=_SLOW),
                          pytest.param(False, 0, 2, marks=_SLOW),
                          pytest.param(False, 12, 1, marks=_SLOW)])
def test_packed_head_equals_plain(cont_time, chunk, groups):
  """Loss and every parameter's gradient; chunk 12 divides neither C nor L."""
  config = _config(cont_time=cont_time, timesteps=10, masked_head=True, loss_chunk_size=chunk)
  model = _model(config, head_groups=groups)
  capacity = model.head_buffer_size(B // groups)
  assert capacity < B // groups * L  # The buffer path exists ...
  metrics, grads = _loss_and_grad(model, *_inputs(groups))
  assert float(metrics["masked_head_overflow"]) == 0.0  # ... and was taken.
  _assert_equal(metrics, grads, *_reference(cont_time, groups))


@pytest.mark.parametrize("chunk", [12, pytest.param(0, marks=_SLOW)])
def test_overflow_falls_back_to_the_full_head(chunk):
  """A buffer too small for the step's masked positions: the full path, the same numbers."""
  model = _model(_config(masked_head=True, loss_chunk_size=chunk, cont_time=True, timesteps=10),
                 head_groups=2, head_capacity=16)
  metrics, grads = _loss_and_grad(model, *_inputs(2))
  assert float(metrics["masked_head_overflow"]) == 1.0
  _assert_equal(metrics, grads, *_reference(True, 2))


@pytest.mark.parametrize("head", ["plain", pytest.param("chunked", marks=_SLOW), "masked_only"])
def test_padded_vocabulary_gives_the_unpadded_loss_and_gradients(head):
  """transformer.vocab_multiple=8: V = 11 head columns and 12 embedding rows padded to 16,
  the real parameters copied in and the padding random. Every head path gives the unpadded
  network's loss and gradients, and the padding gets no gradient: a padding column that took
  any probability, or a target read past V, would fail."""
  knobs = {"plain": {}, "chunked": {"loss_chunk_size": 12},
           "masked_only": {"masked_head": True, "loss_chunk_size": 12}}[head]
  config = _config(cont_time=True, timesteps=10, **knobs)
  config.transformer.vocab_multiple = 8
  model = _model(config, head_groups=2) if head == "masked_only" else _model(config)
  rng = np.random.default_rng(7)
  def pad(real, axis):  # The real parameter, then random padding along `axis` up to 16.
    shape = list(real.shape)
    shape[axis] = 16 - shape[axis]
    return jnp.concatenate([real, jnp.asarray(rng.standard_normal(shape), real.dtype)], axis)
  real = _params()
  padded = jax.tree.map(lambda a: a, real)
  net = padded["network"]
  net["token_embedding"]["embedding"] = pad(net["token_embedding"]["embedding"], 0)
  net["head"]["kernel"] = pad(net["head"]["kernel"], 1)
  net["head"]["bias"] = pad(net["head"]["bias"], 0)
  x, t, noise = _inputs(2)
  def loss(p):
    metrics = model.apply({"params": p}, x, None, train=True, t=t, noise=noise)
    return metrics["loss"], metrics
  (_, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(padded)
  if head == "masked_only":
    assert float(metrics["masked_head_overflow"]) == 0.0
  g = grads["network"]
  assert not (g["token_embedding"]["embedding"][V + 1:].any() or g["head"]["kernel"][:, V:].any()
              or g["head"]["bias"][V:].any())
  g["token_embedding"]["embedding"] = g["token_embedding"]["embedding"][:V + 1]
  g["head"]["kernel"], g["head"]["bias"] = g["head"]["kernel"][:, :V], g["head"]["bias"][:V]
  _assert_equal(metrics, grads, *_reference(True, 2))


@pytest.mark.parametrize("schedule,batch,groups,antithetic,cont_time", [
    ("linear", 16, 1, True, True),
    # Four groups of four, interleaved strata.
    pytest.param("linear", 16, 4, True, True, marks=_SLOW),
    # Discrete time: t rounded up to the T = 10 grid.
    pytest.param("cosine", 16, 2, True, False, marks=_SLOW),
    # Independent times: the spread of t dominates.
    pytest.param("linear", 32, 1, False, True, marks=_SLOW),
])
def test_capacity_holds_the_real_draws(schedule, batch, groups, antithetic, cont_time):
  """No overflow in 2000 draws of the real times and masks (the normal tail at 4.5 sd is
  ~3e-6 per group even at the worst antithetic offset), and C is not wasteful."""
  positions, timesteps, draws = 1024, 10, 2000
  sched = schedules.get_schedule(schedule)
  per_group = batch // groups
  capacity = fused_head.masked_capacity(sched, per_group, positions, antithetic, cont_time,
                                        timesteps)

  @jax.jit
  def counts(keys):
    def one(key):
      t, noise = losses.draw_times_and_noise(key, (batch, positions), antithetic, groups=groups)
      t, _ = losses.diffusion_weight(sched, t, cont_time, timesteps)
      _, masked = losses.forward_mask(jnp.zeros((batch, positions), jnp.int32), sched.alpha(t),
                                      noise, V)
      return jnp.sum(masked.reshape(groups, -1), axis=-1)
    return jax.lax.map(one, keys)

  counts_DxG = np.asarray(counts(jax.random.split(jax.random.key(0), draws)))
  assert counts_DxG.max() <= capacity, (counts_DxG.max(), capacity)
  fraction = capacity / (per_group * positions)
  if (schedule, batch, groups, antithetic) == ("linear", 16, 1, True):
    # The mean count at the worst offset is N·(B + 1)/2: 0.531·B·N, plus 4.5 sd and slack.
    assert fraction <= 0.56, fraction
    assert counts_DxG.mean() / (per_group * positions) == pytest.approx(0.5, abs=0.01)
  # Never more than the worst-offset mean plus 5 binomial sd (≤ sqrt(N·n/4)) and the slack.
  if antithetic:
    t_worst = 1.0 - np.arange(per_group) / per_group
    with jax.ensure_compile_time_eval():
      t_worst, _ = losses.diffusion_weight(sched, jnp.asarray(t_worst, jnp.float32), cont_time,
                                           timesteps)
      worst = positions * float(np.sum(np.clip(1 - np.asarray(sched.alpha(t_worst)), 0, 1)))
    assert capacity <= worst + 5 * np.sqrt(positions * per_group / 4) + 16


def test_interleaved_strata_spread_each_group_and_keep_t_uniform():
  batch, groups = 16, 4
  per_group = batch // groups
  u = jax.random.uniform(jax.random.key(0), (2000,))
  t_UxB = np.asarray(jax.vmap(lambda v: losses.antithetic_times(v, batch, groups))(u))
  plain_UxB = np.asarray(jax.vmap(lambda v: losses.antithetic_times(v, batch))(u))
  # groups = 1 is the formula as it always was, bit for bit.
  np.testing.assert_array_equal(
      plain_UxB, np.asarray(1.0 - jnp.mod(u[:, None] + jnp.arange(batch, dtype=jnp.float32)
                                          / batch, 1.0)))
  # The same B times, only permuted among the examples.
  np.testing.assert_array_equal(np.sort(t_UxB, axis=1), np.sort(plain_UxB, axis=1))
  # Each group is an antithetic sweep of its own: mean within 1/(2n) of 1/2 ...
  means_UxG = t_UxB.reshape(-1, groups, per_group).mean(-1)
  assert np.abs(means_UxG - 0.5).max() <= 1 / (2 * per_group) + 1e-6
  # ... where contiguous strata give whole groups of high or low times.
  assert np.abs(plain_UxB.reshape(-1, groups, per_group).mean(-1) - 0.5).max() > 0.3
  # Every example's t is still U(0, 1].
  for b in (0, 5, batch - 1):
    assert stats.kstest(t_UxB[:, b], "uniform").pvalue > 1e-3
  # The model interleaves over every packed group of every microbatch, and only with
  # masked_head (the plain path keeps contiguous strata).
  assert _model(_config(masked_head=True), head_groups=4).time_groups(2) == 8
  assert _model(_config(), head_groups=4).time_groups(2) == 1


def test_pack_positions_and_packed_sum():
  masked = np.zeros((2, 12), bool)
  masked[0, [1, 4, 5, 11]] = True  # Group 0: 4 masked (examples of 3 positions each).
  masked[1, [0, 2]] = True
  pos, valid, count, slot = fused_head.pack_positions(jnp.asarray(masked), 5)
  np.testing.assert_array_equal(count, [4, 2])
  np.testing.assert_array_equal(slot[0], [5, 0, 5, 5, 1, 2, 5, 5, 5, 5, 5, 3])
  np.testing.assert_array_equal(pos, [[1, 4, 5, 11, 11], [0, 2, 11, 11, 11]])
  np.testing.assert_array_equal(valid, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
  values = jnp.asarray([[1.0, 2.0, 3.0, 4.0, jnp.nan], [5.0, 6.0, jnp.inf, 7.0, 8.0]])
  sums = fused_head.packed_sum(values, pos, valid, positions=3, examples=4)
  np.testing.assert_array_equal(sums, [[1.0, 5.0, 0.0, 4.0], [11.0, 0.0, 0.0, 0.0]])
  # Empty slots pass no gradient, not even a NaN one.
  grad = jax.grad(lambda v: jnp.sum(fused_head.packed_sum(v, pos, valid, 3, 4)))(values)
  np.testing.assert_array_equal(grad, np.asarray(valid, np.float32))


def test_gather_packed_gradient_is_the_gather_transpose():
  """The custom gradient (a gather by slot) equals take_along_axis's scatter-add transpose."""
  masked = np.zeros((2, 12), bool)
  masked[0, [1, 4, 5, 11]] = True
  masked[1, [0, 2]] = True
  pos, valid, _, slot = fused_head.pack_positions(jnp.asarray(masked), 5)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((2, 12, 3)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32) * valid[..., None]
  fast = jax.grad(lambda h: jnp.sum(fused_head.gather_packed(h, pos, slot) * ct))(h)
  plain = jax.grad(lambda h: jnp.sum(jnp.take_along_axis(h, pos[..., None], axis=1) * ct))(h)
  np.testing.assert_allclose(fast, plain, rtol=1e-6)
  np.testing.assert_array_equal(fused_head.gather_packed(h, pos, slot),
                                jnp.take_along_axis(h, pos[..., None], axis=1))


def test_out_of_range_token_at_an_unmasked_position_gives_a_nan_row():
  """The packed path never scores unmasked positions; the row must still be NaN."""
  model = _model(_config(masked_head=True))
  plain = _model(_config())
  x, t, noise = _inputs()
  x = x.at[1, 3].set(V).at[5, 0].set(-1)
  noise = noise.at[1, 3].set(0.0).at[5, 0].set(0.0)  # noise 0 < α: never masked.
  params = _params()  # Outside the trace: the cache must hold arrays, not tracers.
  run = lambda m: jax.jit(lambda x: m.apply({"params": params}, x, t=t, noise=noise,
                                            method=model_lib.MD4.nelbo))(x)
  out, ref = run(model), run(plain)
  bad = np.zeros(B, bool)
  bad[[1, 5]] = True
  assert np.isnan(out["loss_diff"][bad]).all() and np.isnan(ref["loss_diff"][bad]).all()
  np.testing.assert_allclose(out["loss_diff"][~bad], ref["loss_diff"][~bad], rtol=LOSS_RTOL)


@pytest.mark.slow
def test_sharded_groups_equal_one_device_and_stay_local():
  """8 batch shards (one group each) give what one device gives with head_groups=8, and
  XLA moves no activations between devices to pack them."""
  config = _config(masked_head=True, batch_size=32, data_shape=(64,))
  batch = {"x": np.random.default_rng(2).integers(0, V, (32, 64)).astype(np.int32)}
  results = {}
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices()[:8])):
    mesh = parallel.make_mesh({"data": -1}, devices=devices)
    experiment = build.setup(config, mesh)
    model = experiment.model.clone(head_groups=8)
    assert experiment.model.head_groups == len(devices)
    assert model.head_buffer_size(4) < 4 * 64
    params = experiment.init_state().params
    shardings = jax.tree.map(lambda a: a.sharding, params)
    jitted = experiment.jit(lambda p, b: step_lib.compute_grads(model, p, b, jax.random.key(5)),
                            in_shardings=(shardings, parallel.batch_sharding(mesh)),
                            out_shardings=(shardings, parallel.replicated(mesh)))
    global_batch = parallel.to_global(batch, mesh)
    compiled = jitted.lower(params, global_batch).compile()
    if name == "eight":
      # Parameters are replicated: the only collectives are the gradient/metric all-reduces
      # (and the overflow flag's); no all-gather / all-to-all of the features.
      hlo = compiled.as_text()
      assert "all-gather" not in hlo and "all-to-all" not in hlo
    grads, metrics = compiled(params, global_batch)
    results[name] = (jax.device_get(grads), jax.device_get(metrics))
  (g1, m1), (g8, m8) = results["one"], results["eight"]
  assert float(m1["masked_head_overflow"]) == float(m8["masked_head_overflow"]) == 0.0
  _assert_equal(m8, g8, m1, g1)


def test_config_checks():
  unet = base.get_config()  # The digits UNet: no fused head.
  unet.masked_head = True
  with pytest.raises(ValueError, match="masked_head=True.*unet"):
    model_lib.build_model(unet, networks.build_network(unet))
  genmd4 = base.genmd4(_config(masked_head=True))
  with pytest.raises(ValueError, match="masked_head=True.*genmd4"):
    build.check_model(genmd4)
  with pytest.raises(ValueError, match="divisible by 8 x grad_accum_steps=2"):
    build.setup(_config(masked_head=True, batch_size=24, grad_accum_steps=2),
                parallel.make_mesh({"data": -1}))
