"""Every memory/speed optimisation computes the same loss and gradients.

Each knob is compared against the plain network and loss on the same
parameters, data, times and masks:

  loss_chunk_size   fused head + cross-entropy over chunks of positions
  remat_policy      per-block rematerialisation (jax.checkpoint policies)
  scan_layers       blocks as one nn.scan over stacked parameters
  attention_impl    'chunked': query-chunked, rematerialised attention
  dtype             bfloat16 activations with float32 parameters (loose)

Tolerances (float32, conftest sets 'highest' matmul precision): these change
only the order of float32 sums, so the loss agrees to a relative 1e-6 and each
gradient element to rtol 1e-4 + atol 1e-5 * (largest |gradient element|);
gradients that are analytically zero (a conv bias before a GroupNorm) are
float noise either way, hence the global scale. bfloat16
activations keep ~3 significant digits: the loss agrees within 1% and the
gradient within 5% in norm.
"""

import ast
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax.configs import base
from md4_jax import networks
from md4_jax.diffusion import model as model_lib
from md4_jax.networks import attention
from md4_jax.networks import layers

import helpers

B, L, V = 2, 256, 67  # L > attention.ATTENTION_CHUNK, so 'chunked' really chunks.
LOSS_RTOL = 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # atol relative to the largest |gradient|.


def _config(**overrides):
  return helpers.transformer_config(L, V, width=32, depth=2, num_heads=4, **overrides)


def _inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  t = jnp.asarray([0.3, 0.8], jnp.float32)
  noise = jnp.asarray(rng.uniform(size=(B, L)), jnp.float32)
  return x, t, noise


def _loss_and_grad(config, params):
  """(loss, grads) of the batch-mean NELBO for `config` at `params`."""
  model = model_lib.build_model(config, networks.build_network(config))
  x, t, noise = _inputs()

  def loss(p):
    return model.apply({"params": p}, x, None, train=True, t=t, noise=noise)["loss"]

  return jax.jit(jax.value_and_grad(loss))(params)


@functools.cache
def _reference():
  """Randomised plain params (adaLN-zero would hide errors at init) and results."""
  config = _config()
  model = model_lib.build_model(config, networks.build_network(config))
  x, t, noise = _inputs()
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, x, t=t, noise=noise)
  )
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
      nn.meta.unbox(shapes)["params"],
  )
  loss, grads = _loss_and_grad(config, params)
  return params, float(loss), grads


def _stack_blocks(params, depth):
  """Unrolled params (block_0 ... block_{depth-1}) -> scan_layers layout."""
  net = dict(params["network"])
  blocks = [net.pop(f"block_{i}") for i in range(depth)]
  net["blocks"] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
  return {**params, "network": net}


def _unstack_blocks(params, depth):
  net = dict(params["network"])
  stacked = net.pop("blocks")["block"]
  for i in range(depth):
    net[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return {**params, "network": net}


def _assert_close(a, b, scale):
  np.testing.assert_allclose(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL * scale)


def _assert_equal(loss, grads, ref_loss, ref_grads):
  np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(lambda a, b: _assert_close(a, b, scale), grads, ref_grads)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(loss_chunk_size=48),  # Does not divide L: zero-padded.
                     marks=pytest.mark.slow),
        pytest.param(dict(remat_policy="dots_saveable"),  # Unrolled blocks, nn.remat each.
                     marks=pytest.mark.slow),
        # Every knob at once, as in the paper-scale memory rows.
        pytest.param(dict(scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable",
                          loss_chunk_size=64, attention_impl="chunked"),
                     marks=pytest.mark.slow),
        pytest.param(dict(scan_layers=True, remat_policy="full"), marks=pytest.mark.slow),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_optimisation_equals_plain(overrides):
  params, ref_loss, ref_grads = _reference()
  config = _config(**overrides)
  scan = overrides.get("scan_layers", False)
  depth = config.transformer.depth
  loss, grads = _loss_and_grad(config, _stack_blocks(params, depth) if scan else params)
  if scan:
    grads = _unstack_blocks(grads, depth)
  _assert_equal(loss, grads, ref_loss, ref_grads)


def test_scan_layers_stacks_params_with_a_layers_axis():
  config = _config(scan_layers=True)
  model = networks.build_network(config)
  z = jnp.zeros((B, L), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.key(0), z, jnp.zeros((B,)))
  kernel = boxed["params"]["blocks"]["block"]["mlp"]["wi_gate"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp")
  assert kernel.value.shape[0] == config.transformer.depth


@pytest.mark.slow
def test_bfloat16_activations_close_to_float32():
  params, ref_loss, ref_grads = _reference()
  loss, grads = _loss_and_grad(_config(dtype="bfloat16", loss_chunk_size=64), params)
  assert jax.tree.leaves(grads)[0].dtype == jnp.float32  # float32 params/grads.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
  flat, ref = (np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)]) for t in (grads, ref_grads))
  assert np.linalg.norm(flat - ref) < 0.05 * np.linalg.norm(ref)


@pytest.mark.slow
def test_chunked_attention_equals_xla():
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 64, 3, 8)), jnp.float32) for _ in range(3))
  ct = jnp.asarray(rng.standard_normal((2, 64, 3, 8)), jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * ct)

  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  chunked = lambda q, k, v: attention.chunked_attention(q, k, v, chunk=16)
  ref = jax.value_and_grad(functools.partial(loss, plain), argnums=(0, 1, 2))(q, k, v)
  out = jax.value_and_grad(functools.partial(loss, chunked), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in ref[1])
  for a, b in zip(out[1], ref[1]):
    _assert_close(a, b, scale)


@pytest.mark.slow
@pytest.mark.parametrize("length, span", [(128, 128), (130, 130)])
def test_pallas_flash_attention_equals_xla_in_interpret_mode(length, span):
  """JAX's Pallas TPU kernel (run by the Pallas TPU interpreter on this CPU): the values and
  the gradients of q, k and v equal the plain path's. 130 is padded to two 128-blocks and the
  padding masked out of the softmax (segment ids), which an unmasked padding would fail."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  q, ct = (jnp.asarray(rng.standard_normal((1, length, 1, 32)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((1, span, 1, 32)), jnp.float32) for _ in range(2))

  def output_and_grads(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)

  ref = output_and_grads(attention.xla_attention)
  with pltpu.force_tpu_interpret_mode():
    out = output_and_grads(attention.pallas_flash_attention)
  assert out[0].shape == ref[0].shape == q.shape
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-4, atol=1e-5)
  scale = max(float(np.abs(g).max()) for g in ref[1])
  for a, b in zip(out[1], ref[1]):
    _assert_close(a, b, scale)


def test_pallas_attention_runs_per_shard_and_its_flops_are_counted():
  """Under a data x tensor mesh the kernel runs in a shard_map over the batch and heads axes
  (XLA cannot partition a Mosaic kernel), and the plan's FLOP count (aot.matmul_flops) sees
  through it: every grid point of the kernel, every shard. Forward: the XLA path's count;
  backward: the kernel's recomputation of the scores (once for dq, once for dk/dv)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  from md4_jax.experiment import aot  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  rules = (("activation_batch", "data"), ("heads", "tensor"))
  q = jnp.zeros((8, 256, 4, 32))
  counts = {}
  for fn in (attention.xla_attention, attention.pallas_flash_attention):
    with (pltpu.force_tpu_interpret_mode(), jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
          nn.logical_axis_rules(rules)):
      forward = jax.make_jaxpr(lambda q, fn=fn: fn(q, q, q))(q)
      step = jax.make_jaxpr(jax.grad(lambda q, fn=fn: fn(q, q, q).sum()))(q)
    counts[fn] = aot.matmul_flops(forward), aot.matmul_flops(step)
  assert "shard_map" in str(forward)
  scores = 2.0 * 8 * 4 * 256 * 256 * 32  # One [L, L] x K matmul over every example and head.
  assert counts[attention.xla_attention] == (2 * scores, 6 * scores)
  assert counts[attention.pallas_flash_attention] == (2 * scores, 9 * scores)


def test_pallas_attention_refuses_a_non_tpu_target_and_probability_dropout():
  from md4_jax.experiment import validation  # pylint: disable=g-import-not-at-top
  q = jnp.zeros((1, 128, 2, 32))
  with pytest.raises(ValueError, match="compiles for TPU devices only"):
    attention.pallas_flash_attention(q, q, q)
  config = _config(attention_impl="pallas", dropout_rate=0.1)
  config.transformer.dropout = "channel"
  with pytest.raises(ValueError, match="which the pallas kernel cannot"):
    validation.validate(config)


@pytest.mark.slow
def test_unet_remat_equals_plain():
  config = base.get_config()  # The digits UNet (8x8x1, V=17, attention at 4x4).
  config.unet.channels = 16
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.integers(0, config.vocab_size, (B, 8, 8, 1)), jnp.int32)
  t = jnp.asarray([0.2, 0.6], jnp.float32)
  noise = jnp.asarray(rng.uniform(size=x.shape), jnp.float32)
  params = None

  def run(policy):
    nonlocal params
    config.remat_policy = policy
    model = model_lib.build_model(config, networks.build_network(config))
    if params is None:
      shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x, t=t, noise=noise))
      params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype),
                            nn.meta.unbox(shapes)["params"])
    fn = lambda p: model.apply({"params": p}, x, None, train=True, t=t, noise=noise)["loss"]
    return jax.jit(jax.value_and_grad(fn))(params)

  ref_loss, ref_grads = run("none")
  loss, grads = run("full")
  _assert_equal(loss, grads, ref_loss, ref_grads)


@pytest.mark.slow
def test_paper_scale_memory_target():
  """MD4-S as shipped keeps the grad step's temporaries ≤ 2 GiB at batch 8 (1.28 on
  2026-12-05; 8.85 with the chunked loss and attention alone, 31.6 naive).

  Compile-only XLA memory analysis (benchmarks/memory.py) in a fresh process;
  the naive one-hot baseline on the same compiler must need far more, so the
  bound is one the knobs earn.
  """
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import sys; sys.path.insert(0, 'benchmarks'); import memory; "
          "print([memory.grad_step_memory(r, 8)['temp'] / 2**30 for r in ('shipped', 'naive')])")
  # The compiler as shipped (no helpers.xla_flags): the bound is on its memory analysis.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  shipped, naive = ast.literal_eval(out.stdout.strip().splitlines()[-1])
  assert shipped <= 2.0, shipped
  assert naive >= 10 * shipped, (naive, shipped)


def _value_and_grads(fn, *args):
  rng = np.random.default_rng(7)
  out_shape = jax.eval_shape(fn, *args).shape
  ct = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
  return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * ct),
                                    argnums=tuple(range(len(args)))))(*args)


def _assert_same_function(fast, plain, *args):
  """Same value and same gradients w.r.t. every argument (float32 summation order only)."""
  v_fast, g_fast = _value_and_grads(fast, *args)
  v_ref, g_ref = _value_and_grads(plain, *args)
  np.testing.assert_allclose(v_fast, v_ref, rtol=LOSS_RTOL, atol=1e-4)
  for a, b in zip(g_fast, g_ref):
    _assert_close(a, b, float(np.abs(b).max()))


def test_flat_dot_general_is_lax_dot_general():
  rng = np.random.default_rng(0)
  arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  dims = lambda lc, rc, lb=(), rb=(): ((lc, rc), (lb, rb))
  cases = [(arr(2, 5, 8), arr(8, 6), dims((2,), (0,))),  # A dense layer.
           (arr(2, 5, 3, 4), arr(3, 4, 8), dims((2, 3), (0, 1))),  # Heads -> width.
           (arr(2, 5, 8), arr(8, 3, 4), dims((2,), (0,))),  # Width -> heads.
           (arr(4, 5, 8), arr(4, 8, 6), dims((2,), (1,), (0,), (0,)))]  # Batched: lax itself.
  for lhs, rhs, numbers in cases:
    _assert_same_function(lambda a, b: layers.flat_dot_general(a, b, numbers),
                          lambda a, b: jax.lax.dot_general(a, b, numbers), lhs, rhs)
  # The projections reach the matmul as 2-D operands (what makes the gradient fast).
  jaxpr = jax.make_jaxpr(lambda a, b: layers.flat_dot_general(a, b, cases[1][2]))(*cases[1][:2])
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert [tuple(e.invars[0].aval.shape) for e in dots] == [(10, 12)]


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (2, 2)])  # (2, 2): uneven SAME padding.
def test_same_conv_is_xla_conv(kernel):
  from md4_jax.networks import unet  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel + (4, 3)), jnp.float32)
  plain = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  fast = lambda x, w: unet.conv_general_dilated(x, w, (1, 1), "SAME", (1, 1), (1, 1), numbers)
  _assert_same_function(fast, plain, x, w)
  # On this (CPU) backend nn.Conv layers built by unet.conv take the custom gradient.
  layer = unet.conv(3, kernel[0], dtype=jnp.float32, param_dtype=jnp.float32)
  params = layer.init(jax.random.key(0), x)
  assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: layer.apply(p, x))(params))


@pytest.mark.parametrize("method", ["taps", "split"])
@pytest.mark.parametrize("kernel,pads", [((3, 3), ((1, 1), (1, 1))), ((1, 1), ((0, 0), (0, 0))),
                                         ((2, 3), ((0, 1), (1, 1))), ((3, 1), ((2, 0), (0, 0))),
                                         ((1, 3), ((0, 0), (0, 2)))])
def test_conv_weight_gradient_methods(method, kernel, pads):
  """Both weight-gradient formulations equal XLA's, for odd, even and one-sided padding."""
  from md4_jax.networks import unet  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
  conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), pads,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  w0 = jnp.zeros(kernel + (4, 3), jnp.float32)
  expected = jax.vjp(conv, w0)[1](g)[0]
  got = unet._weight_grad(x, g, *kernel, pads, method=method)  # pylint: disable=protected-access
  _assert_close(got, expected, float(np.abs(expected).max()))
  with pytest.raises(ValueError, match="weight-gradient method"):
    unet._weight_grad(x, g, *kernel, pads, method="im2col")  # pylint: disable=protected-access


def test_xla_attention_is_dot_product_attention():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 16, 3, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 12, 3, 8)), jnp.float32) for _ in range(2))
  _assert_same_function(attention.xla_attention,
                        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
                        q, k, v)
