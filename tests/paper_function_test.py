"""The paper configs build the MD4 paper's networks: the function, the initialisation and the
dropout of its reference implementation, pinned independently of md4_jax's own code.

- the time sinusoid equals a numpy evaluation of the paper's formula, inside each network;
- one text block (adaLN, attention with RoPE, sigmoid GLU) equals a numpy re-statement of the
  paper's block on seeded weights;
- LayerNorm eps 1e-5, the UNet's middle-attention biases, the UViT's h = DiT(h) and class
  labels concatenated before the time MLP, asserted on the built networks;
- initial standard deviations of each paper network against the stated values (±5 %);
- the dropout measured: one channel mask per example shared by every position, and attention
  probabilities dropped at rate p.
Networks run at reduced depth and small batches; the paper's widths where a std depends on them.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax import networks
from md4_jax.configs import base
from md4_jax.configs import cifar10
from md4_jax.configs import imagenet64
from md4_jax.configs import text8
from md4_jax.networks import attention
from md4_jax.networks import conditioning
from md4_jax.networks import transformer
from md4_jax.networks import uvit
from tests import paper_numpy


def _text8(**overrides):
  """The paper's text8 transformer (64-dim token embedding), 4 blocks of width 128."""
  config = text8.get_config()
  config.data_shape = (32,)
  config.transformer.update(width=128, depth=4, num_heads=4)
  config.transformer.update(overrides)
  return config


def _cifar10(**overrides):
  """The paper's CIFAR-10 UNet (128 channels, 128-dim values), one block per side, 8x8."""
  config = cifar10.get_config()
  config.data_shape = (8, 8, 3)
  config.unet.num_res_blocks = 1
  config.unet.update(overrides)
  return config


def _imagenet64(**overrides):
  """The paper's ImageNet UViT (256-dim values), narrow and shallow, 8x8."""
  config = imagenet64.get_config()
  config.data_shape = (8, 8, 3)
  config.uvit.update(channels=16, num_res_blocks=1, width=32, depth=1, num_heads=2,
                     cond_dim=16)
  config.uvit.update(overrides)
  return config


CONFIGS = {"text8": _text8}
TIME_MLP = ("conditioning", "time", "dense_0")


def _inputs(config, batch, seed=0):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.integers(0, config.vocab_size + 1, (batch, *config.data_shape)), jnp.int32)
  t = jnp.asarray(rng.uniform(size=batch), jnp.float32)
  cond = jnp.asarray(rng.integers(0, config.classes, batch), jnp.int32) if config.classes else None
  return z, t, cond


@functools.lru_cache(maxsize=None)
def _params(name):
  """Initial parameters of a named test network (one compile each, shared by the tests)."""
  config = CONFIGS[name]()
  model = networks.build_network(config)
  z, t, cond = _inputs(config, 2)
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), z, t, cond))["params"]


class _Stop(Exception):
  pass


def _run_until(config, stop, replace=None, batch=2):
  """The network's init run op by op until the module at path `stop` is called (the module
  whose path is `replace` returns a constant 7 instead of running). Returns (t, cond,
  {path: (first positional input, output, parameters)} of every module called before and
  {path of `stop`: (input, None, its parent's parameters so far)})."""
  model = networks.build_network(config)
  z, t, cond = _inputs(config, batch)
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    path = context.module.path
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if path == stop:
      seen[path] = (args[0], None, context.module.parent.variables.get("params"))
      raise _Stop
    out = jnp.full_like(args[0], 7.0) if path == replace else next_fun(*args, **kwargs)
    seen[path] = (args[0] if args else None, out, context.module.variables.get("params"))
    return out

  with nn.intercept_methods(interceptor), pytest.raises(_Stop):
    model.init(jax.random.key(0), z, t, cond)
  return t, cond, seen


def _traced_modules(config, module_type, train=False, batch=2):
  """Every `module_type` the network's forward calls, traced abstractly (nothing computed)."""
  model = networks.build_network(config)
  z, t, cond = _inputs(config, batch)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), z, t, cond))
  modules = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, module_type) and context.method_name == "__call__":
      modules.append(context.module)
    return next_fun(*args, **kwargs)

  def apply(p):
    with nn.intercept_methods(interceptor):
      return model.apply(p, z, t, cond, train=train, rngs={"dropout": jax.random.key(1)})
  jax.eval_shape(apply, params)
  return modules


# ------------------------------------------------------------------------------- function ---

def test_time_sinusoid_is_the_papers_formula():
  t = jnp.array([0.0, 1e-3, 0.37, 0.999, 1.0])
  for dim in (64, 65, 128):
    np.testing.assert_allclose(conditioning.timestep_embedding(t, dim, sinusoid="md4"),
                               paper_numpy.sinusoid(t, dim), atol=2e-4)
  # md4_jax's own ('dit'): 10000^(-i / half) in [cos | sin].
  freqs = np.exp(-np.log(10_000.0) * np.arange(32) / 32)
  args = 1000.0 * np.asarray(t)[:, None] * freqs
  np.testing.assert_allclose(conditioning.timestep_embedding(t, 64, sinusoid="dit"),
                             np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-4)
  with pytest.raises(ValueError, match="Unknown sinusoid 'ddpm'"):
    conditioning.timestep_embedding(t, 64, sinusoid="ddpm")


@pytest.mark.parametrize("make,width", [(_text8, 64), (_cifar10, 128), (_imagenet64, 16)])
def test_each_paper_network_feeds_the_papers_sinusoid_to_its_time_mlp(make, width):
  t, _, seen = _run_until(make(), stop=TIME_MLP)
  np.testing.assert_allclose(seen[TIME_MLP][0], paper_numpy.sinusoid(t, width), atol=2e-4)


def test_one_text_block_is_the_papers_block():
  config = _text8()
  tc = config.transformer
  block = transformer.TransformerBlock(
      num_heads=2, mlp_hidden=32, mlp="glu", rope=True, cond_act="sigmoid",
      norm_eps=tc.norm_eps, dropout=tc.dropout, dropout_rate=config.dropout_rate)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 16)).astype(np.float32)
  c = rng.standard_normal((2, 8)).astype(np.float32)
  params = nn.meta.unbox(block.init(jax.random.key(0), x, c, False))
  params = jax.tree.map(  # Seeded weights everywhere (adaLN-zero starts at zero).
      lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32), params)
  got = block.apply(params, x, c, False)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  np.testing.assert_allclose(got, paper_numpy.block(p64, x.astype(np.float64), c), rtol=1e-4,
                             atol=1e-5)
  # eps is part of the function: 1e-6 gives another output on a near-constant input.
  x_flat = (1e-3 * rng.standard_normal((2, 6, 16))).astype(np.float32)
  np.testing.assert_allclose(block.apply(params, x_flat, c, False),
                             paper_numpy.block(p64, x_flat.astype(np.float64), c), rtol=1e-4,
                             atol=1e-5)
  assert not np.allclose(paper_numpy.block(p64, x_flat, c, 1e-5),
                         paper_numpy.block(p64, x_flat, c, 1e-6), rtol=1e-3)


def test_paper_text_transformer_norms_use_eps_1e5():
  for config, eps in ((_text8(), 1e-5), (_text8(norm_eps=1e-6), 1e-6)):
    norms = _traced_modules(config, nn.LayerNorm)
    assert len(norms) == 2 * config.transformer.depth + 1  # Two per block and the final one.
    assert {m.epsilon for m in norms} == {eps}


def test_paper_unet_middle_attention_has_qkv_and_output_biases():
  def attention_shapes(config):
    model = networks.build_network(config)
    z, t, _ = _inputs(config, 1)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), z, t))
    return nn.meta.unbox(params)["params"]["mid_attn"]["attn"]

  params = attention_shapes(_cifar10())
  for name in ("query", "key", "value"):
    assert params[name]["kernel"].shape == (128, 1, 128)
    assert params[name]["bias"].shape == (1, 128)
  assert params["out"]["kernel"].shape == (1, 128, 128)
  assert params["out"]["bias"].shape == (128,)
  own = attention_shapes(_cifar10(attn_bias=False))
  assert all("bias" not in own[n] for n in ("query", "key", "value", "out"))


@pytest.mark.parametrize("dit_residual", [False, True])
def test_uvit_applies_the_dit_without_a_residual(dit_residual):
  assert imagenet64.get_config().uvit.dit_residual is False  # The paper config's.
  config = _imagenet64(dit_residual=dit_residual, embed_dim=4, num_res_blocks=0)
  # The DiT replaced by a constant 7; the first up block's input is [DiT path | skip].
  _, _, seen = _run_until(config, stop=("up_res_0",), replace=("dit",))
  after_dit = seen[("up_res_0",)][0][..., :config.uvit.channels]
  expected = 7.0 + (seen[("dit",)][0] if dit_residual else 0.0)
  np.testing.assert_allclose(after_dit, expected, rtol=1e-6)


def test_class_labels_are_concatenated_with_the_sinusoid_before_the_time_mlp():
  config = _cifar10()
  config.classes = 10
  t, cond, seen = _run_until(config, stop=TIME_MLP, batch=32)
  label = np.asarray(seen[("conditioning", "label")][1])
  assert seen[TIME_MLP][0].shape == (32, 256)
  np.testing.assert_allclose(seen[TIME_MLP][0],
                             np.concatenate([paper_numpy.sinusoid(t, 128), label], axis=1),
                             atol=2e-4)
  # One embedding row per label, with the paper's init: Flax's default, std 1 / sqrt(128).
  rows = {int(y): tuple(e) for y, e in zip(cond, label)}
  assert all(rows[int(y)] == tuple(e) for y, e in zip(cond, label))
  np.testing.assert_allclose(np.std(list(rows.values())), 1 / math.sqrt(128), rtol=0.1)
  config.unet.label_cond = "add"  # md4_jax's own: added after the time MLP.
  t, _, seen = _run_until(config, stop=TIME_MLP)
  np.testing.assert_allclose(seen[TIME_MLP][0], paper_numpy.sinusoid(t, 128), atol=2e-4)


# ------------------------------------------------------------------------- initialisation ---

def _std(a):
  """Standard deviation of a parameter's entries."""
  return float(np.std(np.asarray(a)))


def test_paper_text_transformer_init():
  p = _params("text8")
  assert p["token_embedding"]["embedding"].shape == (28, 64)
  np.testing.assert_allclose(_std(p["token_embedding"]["embedding"]), 1 / 8, rtol=0.05)
  # The feed-forward kernels: variance 2 / (depth * fan_in) (0.0147 at 12 layers of 768).
  depth, hidden = 4, p["block_0"]["mlp"]["wo"]["kernel"].shape[0]
  for name, fan_in in (("wi_gate", 128), ("wi_up", 128), ("wo", hidden)):
    kernels = np.stack([p[f"block_{i}"]["mlp"][name]["kernel"] for i in range(depth)])
    np.testing.assert_allclose(_std(kernels), math.sqrt(2 / depth / fan_in), rtol=0.05,
                               err_msg=name)
  np.testing.assert_allclose(math.sqrt(2 / 12 / 768), 0.0147, rtol=0.01)
  # md4_jax's own init stays an option: std 0.02 embeddings, lecun MLP kernels.
  assert conditioning.embedding_init("md4_jax", 0.02) is not nn.linear.default_embed_init
  own = conditioning.embedding_init("md4_jax", 0.02)(jax.random.key(0), (28, 64))
  np.testing.assert_allclose(_std(own), 0.02, rtol=0.05)
  own = transformer.mlp_kernel_init("md4_jax", depth)(jax.random.key(0), (128, 512))
  np.testing.assert_allclose(_std(own), 1 / math.sqrt(128), rtol=0.05)


def test_paper_unet_init():
  config = _cifar10(num_res_blocks=0)
  config.data_shape = (2, 2, 3)
  _, _, seen = _run_until(config, stop=("mid_res_1",))
  embedding = nn.meta.unbox(seen[("value_embedding",)][2])["embedding"]
  np.testing.assert_allclose(_std(embedding), 1 / math.sqrt(128), rtol=0.05)  # 0.088.
  out = nn.meta.unbox(seen[("mid_attn",)][2])["attn"]["out"]["kernel"]
  np.testing.assert_allclose(_std(out), 1 / math.sqrt(128), rtol=0.05)  # lecun, not zeros.


def _column_first_table(grid, width):
  """The paper's DiT position table in numpy: token r * grid + c gets [column | row] halves,
  each [sin | cos] over 10000^(-k / (width / 4))."""
  omega = 1.0 / 10_000 ** (np.arange(width // 4) / (width / 4))
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  half = lambda pos: np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)],
                                    axis=1)
  return np.concatenate([half(cols), half(rows)], axis=1)


def test_paper_uvit_init():
  _, _, seen = _run_until(_imagenet64(num_res_blocks=0), stop=("dit", "block_0"))
  embedding = nn.meta.unbox(seen[("value_embedding",)][2])["embedding"]
  assert embedding.shape == (257, 256)
  np.testing.assert_allclose(_std(embedding), 1 / 16, rtol=0.05)
  table = nn.meta.unbox(seen[("dit", "block_0")][2])["pos_embedding"]
  np.testing.assert_allclose(table, _column_first_table(4, 32), atol=1e-6)
  # md4_jax's own: rows first.
  np.testing.assert_allclose(uvit.sincos_2d(4, 32, column_first=True), _column_first_table(4, 32),
                             atol=1e-6)
  assert not np.allclose(uvit.sincos_2d(4, 32), _column_first_table(4, 32))


# -------------------------------------------------------------------------------- dropout ---

def _dropout_io(name, rate, batch=16):
  """(input, output) of every dropout with rate > 0 in the named network's training forward."""
  config = CONFIGS[name]()
  config.dropout_rate = rate
  model = networks.build_network(config)
  z, t, _ = _inputs(config, batch)

  @jax.jit
  def run(params):
    io = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Dropout) and context.module.rate > 0:
        io.append((args[0], out))
      return out
    with nn.intercept_methods(interceptor):
      model.apply({"params": params}, z, t, train=True, rngs={"dropout": jax.random.key(1)})
    return io
  return [(np.asarray(x), np.asarray(y)) for x, y in run(_params(name))]


def test_paper_text_dropout_is_one_channel_mask_per_example_shared_by_positions():
  p = 0.3
  config = _text8()
  config.dropout_rate = p
  modules = [m for m in _traced_modules(config, nn.Dropout, train=True) if m.rate > 0]
  assert [m.broadcast_dims for m in modules] == [(1,)] * 2 * 4  # Attention and MLP outputs.
  masks = []
  for x, out in _dropout_io("text8", p):
    assert np.all(x != 0)
    keep = out != 0
    np.testing.assert_allclose(out[keep], x[keep] / (1 - p), rtol=1e-5)
    assert np.all(keep == keep[:, :1])  # Every position of an example shares the mask.
    masks.append(keep[:, 0])
  assert len(masks) == 8
  # 8 x 16 examples x 128 channels: the dropped fraction within 5 % of p (over 4 sigma).
  np.testing.assert_allclose(1 - np.mean(masks), p, rtol=0.05)


def test_element_dropout_stays_an_option():
  config = _text8(dropout="element")
  config.dropout_rate = 0.3
  modules = [m for m in _traced_modules(config, nn.Dropout, train=True) if m.rate > 0]
  assert [m.broadcast_dims for m in modules] == [()] * 2 * 4


def test_paper_dit_dropout_pattern():
  config = _imagenet64()
  config.dropout_rate = 0.3
  modules = [m for m in _traced_modules(config, nn.Dropout, train=True)
             if m.rate > 0 and m.path[0] == "dit"]
  # Attention output: a channel mask; MLP hidden and output: element by element.
  assert [(m.path[-2:], m.broadcast_dims) for m in modules] == [
      (("block_0", "Dropout_0"), (1,)), (("mlp", "Dropout_0"), ()),
      (("block_0", "Dropout_1"), ())]
@pytest.mark.parametrize("impl,length", [("xla", 64), ("chunked", 2 * attention.ATTENTION_CHUNK)])
def test_attention_probabilities_are_dropped_at_rate_p(impl, length):
  """Zero query/key kernels make every probability 1 / L; identity value and output kernels
  on one-hot positions return each query's row of (dropped) probabilities."""
  p, batch = 0.1, 8 if impl == "xla" else 2
  attn = attention.SelfAttention(1, attention_impl=impl, dropout_rate=p)
  x = jnp.broadcast_to(jnp.eye(length), (batch, length, length))
  params = nn.meta.unbox(attn.init(jax.random.key(0), x))["params"]
  params["query"]["kernel"] = jnp.zeros_like(params["query"]["kernel"])
  params["key"]["kernel"] = jnp.zeros_like(params["key"]["kernel"])
  params["value"]["kernel"] = jnp.eye(length)[:, None, :]
  params["out"]["kernel"] = jnp.eye(length)[None]
  np.testing.assert_allclose(attn.apply({"params": params}, x), 1 / length, rtol=1e-5)
  rows = np.asarray(attn.apply({"params": params}, x, True, rngs={"dropout": jax.random.key(2)}))
  keep = rows != 0
  np.testing.assert_allclose(rows[keep], 1 / length / (1 - p), rtol=1e-4)
  # 32768 probabilities: the dropped fraction within 5 % of p (3 sigma); not shared by rows.
  np.testing.assert_allclose(1 - keep.mean(), p, rtol=0.05)
  assert not np.all(keep == keep[:, :1])


def test_cudnn_attention_refuses_probability_dropout():
  from md4_jax.experiment import validation  # pylint: disable=g-import-not-at-top
  config = _text8()
  config.attention_impl = "cudnn"
  with pytest.raises(ValueError, match="transformer.dropout='channel' drops attention"):
    validation.validate(config)
  config.transformer.dropout = "element"
  validation.validate(config)


def test_paper_configs_set_the_papers_choices_and_the_defaults_keep_md4_jaxs():
  for group, config in (("transformer", text8.get_config()), ("unet", cifar10.get_config()),
                        ("uvit", imagenet64.get_config())):
    assert {k: config[group][k] for k in base.PAPER_DESIGN} == base.PAPER_DESIGN, group
    assert {k: base.get_config()[group][k] for k in base.OWN_DESIGN} == base.OWN_DESIGN, group
  assert text8.get_config().transformer.norm_eps == 1e-5
  assert text8.get_config().transformer.dropout == "channel"
  genmd4 = text8.get_config("genmd4").transformer.to_dict()
  assert genmd4 == text8.get_config().transformer.to_dict()
  assert cifar10.get_config().unet.attn_bias
  assert imagenet64.get_config().uvit.dropout == "dit"
  # md4_jax's own design stays a named variant.
  wide = text8.get_config("wide_cond").transformer
  assert (wide.sinusoid, wide.norm_eps, wide.dropout, wide.param_init) == (
      "dit", 1e-6, "element", "md4_jax")
  assert not cifar10.get_config("wide_cond").unet.attn_bias


def test_unknown_paper_options_are_one_line_errors():
  from md4_jax.experiment import validation  # pylint: disable=g-import-not-at-top
  for group, field, value in (("transformer", "sinusoid", "ddpm"),
                              ("unet", "label_cond", "film"), ("uvit", "param_init", "xavier"),
                              ("transformer", "dropout", "spatial"), ("uvit", "dropout", "rows")):
    config = base.get_config()
    config.network = group
    config[group][field] = value
    with pytest.raises(ValueError, match=f"Unknown {group}.{field} '{value}'"):
      validation.validate(config)
