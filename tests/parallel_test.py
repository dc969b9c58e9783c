"""Meshes: FSDP / tensor-parallel shardings match one device; restore across meshes."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from md4_jax.configs import text8
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax.experiment import parallel
from md4_jax.experiment import build

import helpers

# The one-device reference is computed once: these tests stay on one xdist worker.
pytestmark = pytest.mark.xdist_group("parallel")


def _config():
  config = text8.get_config("tiny")
  config.data_shape = (16,)
  config.transformer.width = 64
  config.transformer.num_heads = 8
  config.transformer.depth = 2
  config.dropout_rate = 0.0
  config.batch_size = 16
  return config


def _check_constraints(text, mesh):
  # The networks' activation constraints are applied over this mesh: the
  # residual stream split over the batch axes, the logits' vocab over 'tensor'.
  if mesh.size > 1:
    assert 'sharding_constraint' in text and '[{"data", "fsdp"}, {}, {}]' in text, text[:2000]


def _grads_on(mesh_shape, config, batch):
  return helpers.grads_on(mesh_shape, config, batch, _check_constraints)


@pytest.fixture(scope="module")
def single_device():
  config = _config()
  rng = np.random.default_rng(0)
  batch = {"x": rng.integers(0, config.vocab_size, (16, 16)).astype(np.int32)}
  _, grads, loss = _grads_on((1, 1, 1), config, batch)
  return config, batch, grads, loss


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_mesh_matches_single_device_and_shards_params(single_device, mesh_shape):
  config, batch, grads1, loss1 = single_device
  state, grads, loss = _grads_on(mesh_shape, config, batch)
  np.testing.assert_allclose(loss, loss1, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
               grads, grads1)

  _, fsdp, tensor = mesh_shape
  def spec(a):
    return a.sharding.spec
  mlp = state.params["network"]["block_0"]["mlp"]["wi_gate"]["kernel"]  # ('embed', 'mlp')
  expected = P("fsdp", "tensor")  # The rules; size-1 axes simply do not split.
  assert _normal(spec(mlp)) == _normal(expected), spec(mlp)
  # EMA and Adam moments follow the parameters.
  ema = state.ema_params["network"]["block_0"]["mlp"]["wi_gate"]["kernel"]
  assert _normal(spec(ema)) == _normal(expected)
  mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
  mus = [s.mu for s in mu if hasattr(s, "mu")]
  assert _normal(spec(mus[0]["network"]["block_0"]["mlp"]["wi_gate"]["kernel"])) == _normal(expected)
  # A dimension the mesh axis does not divide stays replicated: vocab 27 + mask = 28 rows.
  emb = state.params["network"]["token_embedding"]["embedding"]  # ('vocab', 'embed')
  assert _normal(spec(emb))[0] == ("tensor" if 28 % tensor == 0 else None)
  sizes = {s.data.shape for s in mlp.addressable_shards}
  assert sizes == {(64 // fsdp, mlp.shape[1] // tensor)}


def _normal(spec):
  entries = tuple(spec) + (None,) * (2 - len(tuple(spec)))
  return entries[:2]


def test_data_shards_follow_the_batch_axes():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert parallel.data_shards(mesh) == (0, 1)  # One process holds every row.
  batch = {"x": np.arange(8 * 3).reshape(8, 3)}
  global_x = parallel.to_global(batch, mesh)["x"]
  assert global_x.shape == (8, 3)
  np.testing.assert_array_equal(np.asarray(global_x), batch["x"])


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  config = _config()
  mesh8 = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state = build.setup(config, mesh8).init_state()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path))
  ckpt.save(0, state)
  mesh1 = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  restored = build.setup(config, mesh1).restore(ckpt)
  leaf = restored.params["network"]["block_0"]["mlp"]["wi_gate"]["kernel"]
  assert leaf.sharding.mesh.devices.size == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
