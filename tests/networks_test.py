"""Tests for md4_jax.networks: the (z, t, cond, train) -> logits contract.

Tiny sizes keep compile time down (each jit costs seconds on a 2-core CPU):
one jitted apply per network and config, reused across inputs. Parameters are
randomised on the host (numpy) for the dependence tests, because adaLN-zero and
zero-initialised convs make a freshly initialised network ignore t, cond and
other positions by design. Inits use an 'rbg' key: threefry init programs take
~4x longer to compile on CPU.
"""

import functools
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from md4_jax.configs import base
from md4_jax import networks
from md4_jax.diffusion import model as model_lib
from md4_jax.experiment import build
from md4_jax.experiment import validation
from md4_jax.networks import contract

import helpers

B = 2
# Tiny sizes per network; a network not listed runs with its configs/base.py group (small).
TINY = {
    "transformer": dict(data_shape=(16,), vocab_size=11,
                        transformer=dict(width=32, depth=2, num_heads=4)),
    "unet": dict(unet=dict(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(4,), embed_dim=8)),
}


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


def _config(network, **overrides):
  """A tiny config for `network`, with top-level overrides."""
  config = base.get_config()
  config.network = network
  config.classes = 3
  config.dropout_rate = 0.1
  config.time_features = "t"
  config.data_shape = (8, 8, 1)
  config.vocab_size = 17
  for k, v in TINY.get(network, {}).items():
    if isinstance(v, dict):
      config[k].update(v)
    else:
      config[k] = v
  for k, v in overrides.items():
    config[k] = v
  return config


def _inputs(config, seed=0):
  """(z, t, cond) with z including mask tokens."""
  rng = np.random.default_rng(seed)
  z = rng.integers(0, config.vocab_size + 1, (B, *config.data_shape))
  t = np.array([0.3, 0.7], np.float32)
  cond = np.array([0, 2], np.int32)
  return jnp.asarray(z, jnp.int32), jnp.asarray(t), jnp.asarray(cond)


def _randomize(params, seed=0, scale=0.2):
  """params + scale * N(0, 1), computed on the host (no compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(
          np.asarray(p) + scale * rng.standard_normal(p.shape), p.dtype
      ),
      params,
  )


def _apply_fn(model):
  return jax.jit(model.apply, static_argnames="train")


def _grad_fn(model, config, z, t, cond):
  """Jitted params -> gradient of the cross-entropy against z (mask -> V-1)."""
  x = jnp.minimum(z, config.vocab_size - 1)

  def loss(params):
    logits = model.apply(params, z, t, cond)
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, x[..., None], axis=-1))

  return jax.jit(jax.grad(loss))


class _Setup:
  """A built network, its init variables and randomised params."""

  def __init__(self, network):
    self.config = _config(network)
    self.model = networks.build_network(self.config)
    self.z, self.t, self.cond = _inputs(self.config)
    self.boxed = jax.jit(self.model.init)(
        jax.random.key(0, impl="rbg"), self.z, self.t, self.cond
    )
    self.params = nn.meta.unbox(self.boxed)
    self.random_params = _randomize(self.params)
    self.apply = _apply_fn(self.model)
    self.grad = _grad_fn(self.model, self.config, self.z, self.t, self.cond)

  def __call__(self, z=None, t=None, cond=None, params=None, **kw):
    return self.apply(
        self.random_params if params is None else params,
        self.z if z is None else z,
        self.t if t is None else t,
        self.cond if cond is None else cond,
        **kw,
    )


@functools.cache
def _get_setup(network):
  return _Setup(network)


@pytest.fixture(params=[n if n == "transformer" else pytest.param(n, marks=pytest.mark.slow)
                        for n in sorted(networks.NETWORKS)])
def setup(request):  # Image networks' compiles make their cases slow-tier; the fast tier builds
  # them below.
  return _get_setup(request.param)


def test_init_partitioning_and_output_shape(setup):
  config = setup.config
  leaves = jax.tree.leaves(
      setup.boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for box in leaves:
    assert len(box.names) == box.value.ndim, box.names
  specs = nn.get_partition_spec(setup.boxed)
  assert all(
      isinstance(s, jax.sharding.PartitionSpec) for s in jax.tree.leaves(specs)
  )

  logits = setup(params=setup.params)  # Plain (unboxed) params.
  assert logits.shape == (B, *config.data_shape, config.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_depends_on_time_and_class(setup):
  def max_diff_per_example(a, b):
    return np.abs(a - b).reshape(B, -1).max(axis=-1)

  logits = setup()
  other_t = setup(t=jnp.array([0.9, 0.1]))
  other_cond = setup(cond=jnp.array([1, 1], jnp.int32))
  assert np.all(max_diff_per_example(logits, other_t) > 1e-4)
  assert np.all(max_diff_per_example(logits, other_cond) > 1e-4)


def test_dropout(setup):
  eval_a = setup(train=False)
  eval_b = setup(train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_1 = setup(train=True, rngs={"dropout": jax.random.key(1)})
  train_1b = setup(train=True, rngs={"dropout": jax.random.key(1)})
  train_2 = setup(train=True, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(train_1, train_1b)
  assert not np.allclose(train_1, train_2)
  assert not np.allclose(train_1, eval_a)


def test_gradients_finite_and_reach_every_parameter(setup):
  grads = setup.grad(setup.random_params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


def test_bfloat16_close_to_float32(setup):
  config = _config(setup.config.network, dtype="bfloat16")
  model = networks.build_network(config)
  logits_bf16 = _apply_fn(model)(
      setup.random_params, setup.z, setup.t, setup.cond
  )
  logits_f32 = setup()
  assert logits_bf16.dtype == jnp.float32
  err = np.abs(logits_bf16 - logits_f32).mean() / np.abs(logits_f32).mean()
  assert err < 0.05, err


@pytest.mark.parametrize("network", sorted(networks.NETWORKS))
def test_time_features_none_ignores_t(network):
  config = _config(network, time_features="none", classes=0)
  model = networks.build_network(config)
  z, _, _ = _inputs(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), z, jnp.zeros((B,)))
  assert "conditioning" not in shapes["params"]
  params = _randomize(
      nn.meta.unbox(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  )
  apply = jax.jit(model.apply)
  out_a = apply(params, z, jnp.full((B,), 0.1))
  out_b = apply(params, z, jnp.full((B,), 0.9))
  out_nan = apply(params, z, jnp.full((B,), jnp.nan))  # t is never read.
  np.testing.assert_array_equal(out_a, out_b)
  np.testing.assert_array_equal(out_a, out_nan)
  assert np.all(np.isfinite(out_a))


def test_transformer_is_bidirectional():
  setup = _get_setup("transformer")
  v = setup.config.vocab_size
  z_last = setup.z.at[:, -1].set((setup.z[:, -1] + 1) % (v + 1))
  z_first = setup.z.at[:, 0].set((setup.z[:, 0] + 1) % (v + 1))
  logits = setup()
  assert np.all(np.abs(setup(z=z_last)[:, 0] - logits[:, 0]).max(-1) > 1e-4)
  assert np.all(np.abs(setup(z=z_first)[:, -1] - logits[:, -1]).max(-1) > 1e-4)


def test_transformer_remat_matches():
  """remat_policy='full' on unrolled blocks leaves the gradients unchanged.

  (tests/perf_test.py compares every policy, scanned layers and chunked
  attention against the plain network.)
  """
  setup = _get_setup("transformer")
  config = _config("transformer", remat_policy="full")
  model = networks.build_network(config)
  assert model.remat_policy == "full"
  grads = setup.grad(setup.random_params)
  grads_remat = _grad_fn(model, config, setup.z, setup.t, setup.cond)(
      setup.random_params
  )
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      grads,
      grads_remat,
  )


@pytest.mark.parametrize(
    "network,overrides",
    [
        ("unet", dict(data_shape=(32, 32, 3), vocab_size=256, classes=10)),
        ("unet", dict(data_shape=(64, 64, 3), vocab_size=256, classes=0)),
        ("transformer", dict(data_shape=(256,), vocab_size=27, classes=0)),
    ],
)
def test_full_size_shapes(network, overrides):
  """Paper-sized shapes trace (eval_shape only, nothing is compiled)."""
  config = _config(network, **overrides)
  if network == "transformer":
    config.transformer.width = 256
    config.transformer.depth = 4
  else:
    config.unet.channels = 128
    config.unet.channel_mult = (1, 2, 2, 2)
    config.unet.num_res_blocks = 2
    config.unet.attn_resolutions = (16, 8)
    config.unet.embed_dim = 16
  model = networks.build_network(config)
  z = jnp.zeros((B, *config.data_shape), jnp.int32)
  t = jnp.zeros((B,))
  cond = jnp.zeros((B,), jnp.int32) if config.classes else None
  shapes = jax.eval_shape(model.init, jax.random.key(0), z, t, cond)
  out = jax.eval_shape(model.apply, nn.meta.unbox(shapes), z, t, cond)
  assert out.shape == (B, *config.data_shape, config.vocab_size)
  assert out.dtype == jnp.float32
  num_params = sum(
      math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes))
  )
  assert num_params > 1e6


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="transformer.*unet"):
    config = _config("unet")
    config.network = "mlp_mixer"
    networks.build_network(config)
  with pytest.raises(ValueError, match="none.*t"):
    networks.build_network(_config("unet", time_features="log_snr"))
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    networks.build_network(_config("unet", data_shape=(16,)))
  with pytest.raises(ValueError, match="dots_saveable.*full.*none"):
    networks.build_network(_config("transformer", remat_policy="some"))
  with pytest.raises(ValueError, match="auto.*chunked.*cudnn.*xla"):
    networks.build_network(_config("unet", attention_impl="flash"))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "unet" else n
                                  for n in sorted(networks.NETWORKS)])
def test_every_registered_network_builds_and_declares_its_head_contract(name):
  """Each registry entry builds from a config into a module honouring the contract, and the
  fused-head interface (features + head) gives exactly the logits of __call__."""
  config = _config(name)
  model = networks.build_network(config)
  z, t, cond = _inputs(config)
  variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), z, t, cond))
  variables = _randomize(variables)
  logits = jax.jit(model.apply)(variables, z, t, cond)
  assert logits.shape == (B, *config.data_shape, config.vocab_size)
  if isinstance(model, contract.FusedHeadNetwork):
    feats = jax.jit(functools.partial(model.apply, method=type(model).features))(
        variables, z, t, cond)
    assert feats.h.shape == (B, *config.data_shape, config.transformer.width)
    np.testing.assert_allclose(feats.logits(feats.h), logits, rtol=1e-5, atol=1e-5)
  else:  # Refused by the model builder when asked to fuse the head with the loss.
    config.loss_chunk_size = 8
    with pytest.raises(ValueError, match="loss_chunk_size=8"):
      model_lib.build_model(config, model)


class _ToyNetwork(nn.Module):
  """A backbone a newcomer adds: token embedding + a time bias -> swish -> linear head.

  Declares two of the common facts (vocab_size, dtype) and one attribute of its own
  config group (hidden); the builder passes nothing else.
  """

  vocab_size: int
  hidden: int
  dtype: Any = jnp.float32

  @classmethod
  def check_kwargs(cls, kwargs: Mapping[str, Any], group: str) -> None:
    if kwargs["hidden"] % 2:
      raise ValueError(f"config.{group}.hidden={kwargs['hidden']} must be even.")

  @nn.compact
  def __call__(self, z, t, cond: Optional[jax.Array] = None, train: bool = False):
    h = nn.Embed(self.vocab_size + 1, self.hidden, dtype=self.dtype)(z)
    time_bias = nn.Dense(self.hidden, dtype=self.dtype)(t[:, None])
    h = h + time_bias.reshape((z.shape[0],) + (1,) * (z.ndim - 1) + (self.hidden,))
    return nn.Dense(self.vocab_size, dtype=self.dtype)(nn.swish(h)).astype(jnp.float32)


def test_a_new_network_is_its_class_one_registry_line_and_its_config_group(monkeypatch):
  """The documented recipe (docs/networks.md): register a class, give it a config group,
  and the normal path (validate, build.setup, a train step) runs it; its check and
  unknown group keys are one-line errors."""
  monkeypatch.setitem(networks.NETWORKS, "toy", _ToyNetwork)
  config = helpers.digits_tiny(network="toy")
  config.toy = ml_collections.ConfigDict(dict(hidden=8))
  validation.validate(config)
  experiment = build.setup(config)
  network = experiment.model.network
  assert type(network) is _ToyNetwork  # pylint: disable=unidiomatic-typecheck
  assert (network.vocab_size, network.hidden) == (config.vocab_size, 8)
  params = experiment.abstract_state.params
  assert params["network"]["Embed_0"]["embedding"].shape == (config.vocab_size + 1, 8)
  assert experiment.num_params == ((config.vocab_size + 1) * 8 + 2 * 8
                                   + 8 * config.vocab_size + config.vocab_size)
  state = experiment.init_state()
  rng = np.random.default_rng(0)
  x = rng.integers(0, config.vocab_size, (config.batch_size, *config.data_shape))
  _, metrics = experiment.train_step(state, {"x": jnp.asarray(x, jnp.int32)})
  assert np.isfinite(float(metrics["loss"]))

  config.toy.hidden = 7
  with pytest.raises(ValueError, match=r"config.toy.hidden=7 must be even"):
    validation.validate(config)
  config.toy = ml_collections.ConfigDict(dict(hidden=8, width=3))
  with pytest.raises(ValueError, match=r"config.toy.width is not an attribute of _ToyNetwork"):
    build.setup(config)
