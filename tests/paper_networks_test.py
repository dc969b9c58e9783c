"""The MD4 paper's network pieces: RoPE, the sigmoid GLU, narrow conditioning, zero-initialised
heads, the UViT (residual blocks around a DiT), and the UViT sharded over 8 devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax.configs import base
from md4_jax import networks
from md4_jax.networks import attention
from md4_jax.networks import transformer
from md4_jax.networks import uvit

import helpers


def test_rope_scores_depend_on_the_offset_only():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 12, 2, 8)), jnp.float32)
  # The same vectors at every position: scores then depend on m - n only ...
  qs = jnp.broadcast_to(q[:, :1], q.shape)
  ks = jnp.broadcast_to(k[:, :1], k.shape)
  scores = jnp.einsum("bmhk,bnhk->hmn", attention.apply_rope(qs), attention.apply_rope(ks))
  for offset in (-3, 0, 5):
    diag = np.diagonal(np.asarray(scores), offset=offset, axis1=1, axis2=2)
    np.testing.assert_allclose(diag, diag[:, :1] * np.ones_like(diag), rtol=1e-5, atol=1e-5)
  # ... norms are kept, and position 0 is untouched.
  np.testing.assert_allclose(jnp.linalg.norm(attention.apply_rope(q), axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(attention.apply_rope(q)[:, 0], q[:, 0], rtol=1e-6)
  # Adjacent pairs (x_0, x_1) turn at frequency 1: e_0 at position m -> (cos m, sin m, 0, ...)
  # (a rotate-halves layout would move it to x_4 instead).
  e0 = jnp.zeros((1, 12, 1, 8)).at[..., 0].set(1.0)
  m = np.arange(12)
  expected = np.zeros((12, 8))
  expected[:, 0], expected[:, 1] = np.cos(m), np.sin(m)
  np.testing.assert_allclose(attention.apply_rope(e0)[0, :, 0], expected, atol=1e-5)


def test_mlp_widths_follow_the_paper():
  assert transformer.mlp_hidden("glu", 768, 4.0, 32) == 2048
  assert transformer.mlp_hidden("glu", 1024, 4.0, 32) == 2752  # MD4-M.
  assert transformer.mlp_hidden("swiglu", 64, 4.0) == 176  # Unchanged for old runs.
  assert transformer.mlp_hidden("gelu", 768, 4.0) == 3072  # DiT.
  with pytest.raises(ValueError, match="Unknown mlp 'relu'"):
    transformer.mlp_hidden("relu", 64, 4.0)


def _paper_transformer_config():
  config = base.get_config()
  config.data_shape, config.vocab_size = (16,), 11
  base.paper_transformer(config, embed_dim=8)
  config.transformer.width, config.transformer.depth, config.transformer.num_heads = 32, 2, 4
  config.transformer.cond_dim = 16
  return config


def _randomized(params, seed=0, scale=0.2):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def _check_network(config):
  """Zero-initialised output: exactly uniform logits at init; with random parameters every
  parameter gets a finite, non-zero gradient of the cross-entropy."""
  model = networks.build_network(config)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.integers(0, config.vocab_size + 1, (2, *config.data_shape)), jnp.int32)
  t = jnp.array([0.2, 0.8])
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), z, t))
  logits = jax.jit(model.apply)(params, z, t)
  assert logits.shape == (2, *config.data_shape, config.vocab_size)
  np.testing.assert_array_equal(logits, 0.0)
  x = jnp.minimum(z, config.vocab_size - 1)

  def loss(p):
    log_p = jax.nn.log_softmax(model.apply(p, z, t))
    return -jnp.mean(jnp.take_along_axis(log_p, x[..., None], axis=-1))

  grads = jax.jit(jax.grad(loss))(_randomized(params))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
  return params


@pytest.mark.slow
def test_paper_transformer_structure_and_gradients():
  params = _check_network(_paper_transformer_config())["params"]
  assert "pos_embedding" not in params  # RoPE only.
  assert "bias" not in params["head"]
  assert params["token_embedding"]["embedding"].shape == (12, 8)  # V + 1 rows, projected.
  assert params["embed_proj"]["kernel"].shape == (8, 32)
  assert params["block_0"]["modulation"]["dense"]["kernel"].shape == (16, 6, 32)
  assert params["block_0"]["mlp"]["wi_gate"]["kernel"].shape == (32, 96)  # 8/3 x 32 -> 96.
  assert params["conditioning"]["time"]["dense_0"]["kernel"].shape == (16, 64)  # E -> 4E.


def _uvit_config(**uvit):
  config = base.get_config()
  config.network = "uvit"
  config.data_shape, config.vocab_size = (8, 8, 3), 9
  config.time_embedding = "md4"
  config.uvit.update(dict(channels=16, num_res_blocks=1, embed_dim=4, patch_size=2, width=32,
                          depth=2, num_heads=4, cond_dim=16), **uvit)
  config.dropout_rate = 0.0
  return config


@pytest.mark.slow
def test_uvit_forward_backward_and_structure():
  params = _check_network(_uvit_config())["params"]
  assert sorted(k for k in params if k.startswith(("down", "up"))) == [
      "down_res_0", "up_res_0", "up_res_1"]
  assert params["dit"]["pos_embedding"].shape == (16, 32)  # (8 / 2)^2 tokens.
  np.testing.assert_allclose(params["dit"]["pos_embedding"], uvit.sincos_2d(4, 32))
  assert "bias" in params["dit"]["block_0"]["attn"]["query"]  # DiT: q/k/v biases ...
  assert "bias" not in params["dit"]["block_0"]["attn"]["out"]  # ... none on the output.
  assert params["dit"]["block_0"]["mlp"]["wi"]["kernel"].shape == (32, 128)  # GELU MLP.
  assert params["up_res_0"]["norm_0"]["modulation"]["kernel"].shape == (16, 2, 32)


def test_sincos_2d_encodes_rows_and_columns():
  emb = uvit.sincos_2d(3, 8)
  assert emb.shape == (9, 8)
  np.testing.assert_allclose(emb[0], [0, 0, 1, 1, 0, 0, 1, 1])  # Position (0, 0).
  np.testing.assert_allclose(emb[1, :4], emb[0, :4])  # Same row: the row half agrees.
  np.testing.assert_allclose(emb[3, 4:], emb[0, 4:])  # Same column: the column half agrees.
  assert len({tuple(np.round(r, 6)) for r in emb}) == 9


def test_unknown_choices_are_one_line_errors():
  from md4_jax.experiment import validation  # pylint: disable=g-import-not-at-top
  from md4_jax.run import saved_config  # pylint: disable=g-import-not-at-top
  for group, field, value in (("transformer", "mlp", "relu"),
                              ("transformer", "positions", "alibi"),
                              ("transformer", "cond_act", "tanh"), ("unet", "film", "gate")):
    config = base.get_config()
    config.network = group  # The selected network's class checks its group.
    config[group][field] = value
    with pytest.raises(ValueError, match=f"Unknown {group}.{field} '{value}'"):
      validation.validate(config)
  config = base.get_config()
  config.time_embedding = "learned"
  with pytest.raises(ValueError, match="Unknown time_embedding 'learned'"):
    validation.validate(config)


@pytest.mark.slow
def test_uvit_sharded_equals_one_device():
  config = _uvit_config()
  config.batch_size = 8
  rng = np.random.default_rng(0)
  batch = {"x": rng.integers(0, config.vocab_size, (8, *config.data_shape)).astype(np.int32)}
  _, grads1, loss1 = helpers.grads_on((1, 1, 1), config, batch)
  for mesh_shape in ((2, 2, 2),):  # data, fsdp and tensor at once.
    state, grads, loss = helpers.grads_on(mesh_shape, config, batch)
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
                 grads, grads1)
    kernel = state.params["network"]["dit"]["block_0"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.spec[:2] == ("fsdp", "tensor"), kernel.sharding.spec
