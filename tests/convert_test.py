"""md4_jax.convert: reference (google-deepmind/md4) checkpoints into md4_jax workdirs.

Each test writes a synthetic checkpoint in the reference's orbax layout
(<dir>/checkpoints/<step>/train_state: rng, step, params, ema_params, opt_state of
optax.chain(identity, adamw), state) under the reference's Flax names, stated here by
hand from its networks (not from md4_jax/run/reference.py's tables), converts it, and
checks the restored md4_jax state and logits against md4_jax parameters built here
from the same seeded arrays: the text transformer (MD4 and GenMD4), the UNet and the
UViT. The restored text block equals the numpy re-statement of the paper's block
(tests/paper_numpy.py) on the reference's weights; a config whose network computes
another function from the same names and shapes (md4_jax's own sinusoid, LayerNorm
epsilon, DiT residual, label joining) is refused, naming the overrides.
"""

import json
import os
import re
import sys
from typing import Any
from unittest import mock

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl import flags

from md4_jax import cli
from md4_jax.configs import base
from md4_jax.configs import cifar10
from md4_jax.configs import imagenet64
from md4_jax.configs import synthetic_text
from md4_jax.experiment import build
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax.run import reference
from md4_jax.run import workdir as workdir_lib
from tests import helpers
from tests import paper_numpy


@flax.struct.dataclass
class RefTrainState:
  """The reference's TrainState fields (md4/train.py)."""

  rng: Any
  step: Any
  params: Any
  ema_params: Any
  opt_state: Any
  state: Any


def _text_config():
  """The paper's transformer design (adaLN from a narrow c, GLU, RoPE, outside embedding)
  at a tiny size, on the synthetic source (trains and evaluates offline)."""
  config = synthetic_text.get_config("tiny")
  base.paper_transformer(config, embed_dim=16)
  tc = config.transformer
  tc.width, tc.depth, tc.num_heads, tc.cond_dim = 32, 2, 4, 16
  config.num_train_steps, config.num_samples = 9, 0
  return config


def _unet_config():
  """The paper's VDM UNet (one resolution, FiLM shift, middle attention) at a tiny size."""
  config = cifar10.get_config("")
  uc = config.unet
  uc.channels, uc.channel_mult, uc.num_res_blocks = 32, (1,), 1
  uc.attn_resolutions, uc.embed_dim, uc.cond_dim = (), 8, 32
  config.batch_size = config.eval_batch_size = 8
  return config


def _normal(rng, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
  return {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dicts."""
  return traverse_util.unflatten_dict(flat, sep="/")


# ------------------------------------------------ the text transformer ---

def _text_reference_shapes(config) -> dict[str, tuple]:
  """The reference's names and shapes (md4/models/backward.py, md4/networks/transformer.py)
  of the text transformer with outside embedding and adaLN from the time embedding."""
  tc = config.transformer
  v, e, d, c, n = config.vocab_size, tc.embed_dim, tc.width, tc.cond_dim, tc.depth
  hidden = 32 * -(-int(2 * 4 * d / 3) // 32)
  t = "classifier/Transformer_0"
  shapes = {
      "classifier/Embed_0/embedding": (v + 1, e),
      "classifier/CondEmbedding_0/dense0/kernel": (c, 4 * c),
      "classifier/CondEmbedding_0/dense0/bias": (4 * c,),
      "classifier/CondEmbedding_0/Dense_0/kernel": (4 * c, c),
      "classifier/CondEmbedding_0/Dense_0/bias": (c,),
      f"{t}/Dense_0/kernel": (e, d), f"{t}/Dense_0/bias": (d,),
      f"{t}/Dense_1/kernel": (c, 2 * d), f"{t}/Dense_1/bias": (2 * d,),
      f"{t}/Dense_2/kernel": (d, v),
  }
  for i in range(n):
    b = f"{t}/TransformerBlock_{i}"
    shapes.update({f"{b}/attention/{w}/kernel": (d, d) for w in ("wq", "wk", "wv", "wo")})
    shapes.update({f"{b}/feed_forward/w1/kernel": (d, hidden),
                   f"{b}/feed_forward/w3/kernel": (d, hidden),
                   f"{b}/feed_forward/w2/kernel": (hidden, d),
                   f"{b}/Dense_0/kernel": (c, 6 * d), f"{b}/Dense_0/bias": (6 * d,)})
  return shapes


def _text_ours(ref: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """md4_jax's parameters from the reference's, restated here by hand."""
  tc = config.transformer
  d, h, c, n = tc.width, tc.num_heads, tc.cond_dim, tc.depth
  t = "classifier/Transformer_0"
  ours = {
      "network/token_embedding/embedding": ref["classifier/Embed_0/embedding"],
      "network/embed_proj/kernel": ref[f"{t}/Dense_0/kernel"],
      "network/embed_proj/bias": ref[f"{t}/Dense_0/bias"],
      "network/conditioning/time/dense_0/kernel": ref["classifier/CondEmbedding_0/dense0/kernel"],
      "network/conditioning/time/dense_0/bias": ref["classifier/CondEmbedding_0/dense0/bias"],
      "network/conditioning/time/dense_1/kernel": ref["classifier/CondEmbedding_0/Dense_0/kernel"],
      "network/conditioning/time/dense_1/bias": ref["classifier/CondEmbedding_0/Dense_0/bias"],
      "network/final_modulation/dense/kernel": ref[f"{t}/Dense_1/kernel"].reshape(c, 2, d),
      "network/final_modulation/dense/bias": ref[f"{t}/Dense_1/bias"].reshape(2, d),
      "network/head/kernel": ref[f"{t}/Dense_2/kernel"],
  }
  for i in range(n):
    b, o = f"{t}/TransformerBlock_{i}", f"network/block_{i}"
    for name, w in (("query", "wq"), ("key", "wk"), ("value", "wv")):
      ours[f"{o}/attn/{name}/kernel"] = ref[f"{b}/attention/{w}/kernel"].reshape(d, h, d // h)
    ours[f"{o}/attn/out/kernel"] = ref[f"{b}/attention/wo/kernel"].reshape(h, d // h, d)
    ours[f"{o}/mlp/wi_gate/kernel"] = ref[f"{b}/feed_forward/w1/kernel"]
    ours[f"{o}/mlp/wi_up/kernel"] = ref[f"{b}/feed_forward/w3/kernel"]
    ours[f"{o}/mlp/wo/kernel"] = ref[f"{b}/feed_forward/w2/kernel"]
    ours[f"{o}/modulation/dense/kernel"] = ref[f"{b}/Dense_0/kernel"].reshape(c, 6, d)
    ours[f"{o}/modulation/dense/bias"] = ref[f"{b}/Dense_0/bias"].reshape(6, d)
  return ours


# ----------------------------------------------------------- the UNet ---

def _image_stem_shapes(config, ch: int, c: int, e: int) -> dict[str, tuple]:
  """The reference's layers around both image networks (md4/networks/unet.py, uvit.py):
  the value embedding, the time MLP (c -> 4c -> c), the input and output convolutions."""
  u = "classifier/UNet5DWrapper_0/UNet_0"
  return {
      "classifier/Embed_0/embedding": (config.vocab_size + 1, e),
      "classifier/CondEmbedding_0/dense0/kernel": (c, 4 * c),
      "classifier/CondEmbedding_0/dense0/bias": (4 * c,),
      "classifier/CondEmbedding_0/Dense_0/kernel": (4 * c, c),
      "classifier/CondEmbedding_0/Dense_0/bias": (c,),
      f"{u}/Conv_0/kernel": (3, 3, 3 * e, ch), f"{u}/Conv_0/bias": (ch,),
      f"{u}/Conv_1/kernel": (3, 3, ch, 3 * config.vocab_size),
      f"{u}/Conv_1/bias": (3 * config.vocab_size,),
  }


def _unet_reference_shapes(config) -> dict[str, tuple]:
  """The reference's VDM UNet (md4/networks/unet.py) with one block per side: ResBlock_0
  (down), ResBlock_1, SelfAttention_0, ResBlock_2 (middle), ResBlock_3..4 (up, reading
  the concatenated skip, so with a skip Dense)."""
  uc = config.unet
  ch, c, e = uc.channels, uc.cond_dim, uc.embed_dim
  u = "classifier/UNet5DWrapper_0/UNet_0"
  shapes = {
      **_image_stem_shapes(config, ch, c, e),
      f"{u}/GroupNorm_0/scale": (ch,), f"{u}/GroupNorm_0/bias": (ch,),
      f"{u}/SelfAttention_0/GroupNorm_0/scale": (ch,),
      f"{u}/SelfAttention_0/GroupNorm_0/bias": (ch,),
  }
  mha = f"{u}/SelfAttention_0/MultiHeadDotProductAttention_0"
  for name in ("query", "key", "value"):
    shapes[f"{mha}/{name}/kernel"] = (ch, 1, ch)
  shapes[f"{mha}/out/kernel"] = (1, ch, ch)
  for name in ("query", "key", "value", "out"):  # The reference's attention has biases.
    shapes[f"{mha}/{name}/bias"] = (ch,) if name == "out" else (1, ch)
  for k, cin in enumerate((ch, ch, ch, 2 * ch, 2 * ch)):
    r = f"{u}/ResBlock_{k}"
    shapes.update({f"{r}/GroupNorm_0/scale": (cin,), f"{r}/GroupNorm_0/bias": (cin,),
                   f"{r}/Conv_0/kernel": (3, 3, cin, ch), f"{r}/Conv_0/bias": (ch,),
                   f"{r}/Dense_0/kernel": (c, ch),
                   f"{r}/GroupNorm_1/scale": (ch,), f"{r}/GroupNorm_1/bias": (ch,),
                   f"{r}/Conv_1/kernel": (3, 3, ch, ch), f"{r}/Conv_1/bias": (ch,)})
    if cin != ch:
      shapes.update({f"{r}/Dense_1/kernel": (cin, ch), f"{r}/Dense_1/bias": (ch,)})
  return shapes


def _unet_ours(ref: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  u = "classifier/UNet5DWrapper_0/UNet_0"
  ours = {
      "network/value_embedding/embedding": ref["classifier/Embed_0/embedding"],
      "network/conditioning/time/dense_0/kernel": ref["classifier/CondEmbedding_0/dense0/kernel"],
      "network/conditioning/time/dense_0/bias": ref["classifier/CondEmbedding_0/dense0/bias"],
      "network/conditioning/time/dense_1/kernel": ref["classifier/CondEmbedding_0/Dense_0/kernel"],
      "network/conditioning/time/dense_1/bias": ref["classifier/CondEmbedding_0/Dense_0/bias"],
  }
  for leaf in ("kernel", "bias"):
    ours[f"network/stem/{leaf}"] = ref[f"{u}/Conv_0/{leaf}"]
    ours[f"network/out_conv/{leaf}"] = ref[f"{u}/Conv_1/{leaf}"]
  for leaf in ("scale", "bias"):
    ours[f"network/out_norm/{leaf}"] = ref[f"{u}/GroupNorm_0/{leaf}"]
    ours[f"network/mid_attn/norm/{leaf}"] = ref[f"{u}/SelfAttention_0/GroupNorm_0/{leaf}"]
  mha = f"{u}/SelfAttention_0/MultiHeadDotProductAttention_0"
  for name in ("query", "key", "value", "out"):
    for leaf in ("kernel", "bias"):
      if f"{mha}/{name}/{leaf}" in ref:
        ours[f"network/mid_attn/attn/{name}/{leaf}"] = ref[f"{mha}/{name}/{leaf}"]
  blocks = {0: "down_0_res_0", 1: "mid_res_0", 2: "mid_res_1", 3: "up_0_res_0", 4: "up_0_res_1"}
  for k, ours_name in blocks.items():
    r, o = f"{u}/ResBlock_{k}", f"network/{ours_name}"
    for a, b in (("norm_0", "GroupNorm_0"), ("norm_1", "GroupNorm_1")):
      ours[f"{o}/{a}/scale"], ours[f"{o}/{a}/bias"] = ref[f"{r}/{b}/scale"], ref[f"{r}/{b}/bias"]
    for a, b in (("conv_0", "Conv_0"), ("conv_1", "Conv_1")):
      ours[f"{o}/{a}/kernel"], ours[f"{o}/{a}/bias"] = ref[f"{r}/{b}/kernel"], ref[f"{r}/{b}/bias"]
    ours[f"{o}/film/kernel"] = ref[f"{r}/Dense_0/kernel"]
    if f"{r}/Dense_1/kernel" in ref:  # The skip: a Dense there, a 1x1 convolution here.
      ours[f"{o}/skip/kernel"] = ref[f"{r}/Dense_1/kernel"][None, None]
      ours[f"{o}/skip/bias"] = ref[f"{r}/Dense_1/bias"]
  return ours


# ----------------------------------------------------------- the UViT ---

def _uvit_config():
  """The paper's UViT (residual blocks with conditional GroupNorms around h = DiT(h)) at the
  imagenet64 :tiny widths, on 8x8 images in 2x2 patches (16 tokens)."""
  config = imagenet64.get_config("tiny")
  config.data_shape = (8, 8, 3)
  config.uvit.patch_size = 2
  config.batch_size = config.eval_batch_size = 8
  return config


def _uvit_reference_shapes(config) -> dict[str, tuple]:
  """The reference's UViT (md4/networks/uvit.py, dit.py) with one residual block down:
  Conv_0, ResBlock_0 (down), DiT_0, ResBlock_1..2 (up, reading [DiT path | skip], so with a
  skip Dense), CondGroupNorm_0, Conv_1; fused q/k/v/out and adaLN Dense layers."""
  vc = config.uvit
  ch, c, e, w, p = vc.channels, vc.cond_dim, vc.embed_dim, vc.width, vc.patch_size
  tokens = (config.data_shape[0] // p) * (config.data_shape[1] // p)
  hidden = int(vc.mlp_ratio * w)
  u = "classifier/UNet5DWrapper_0/UNet_0"
  shapes = {
      **_image_stem_shapes(config, ch, c, e),
      f"{u}/CondGroupNorm_0/Dense_0/kernel": (c, 2 * ch),
      f"{u}/CondGroupNorm_0/Dense_0/bias": (2 * ch,),
      f"{u}/DiT_0/x_embedder/proj/kernel": (p, p, ch, w),
      f"{u}/DiT_0/x_embedder/proj/bias": (w,),
      f"{u}/DiT_0/pos_embed": (tokens, w),
      f"{u}/DiT_0/final_layer/Dense_0/kernel": (c, 2 * w),
      f"{u}/DiT_0/final_layer/Dense_0/bias": (2 * w,),
      f"{u}/DiT_0/final_layer/linear/kernel": (w, p * p * ch),
      f"{u}/DiT_0/final_layer/linear/bias": (p * p * ch,),
  }
  for i in range(vc.depth):
    b = f"{u}/DiT_0/blocks_{i}"
    for name in ("wq", "wk", "wv"):
      shapes[f"{b}/attn/{name}/kernel"], shapes[f"{b}/attn/{name}/bias"] = (w, w), (w,)
    shapes.update({f"{b}/attn/wo/kernel": (w, w),
                   f"{b}/mlp/fc1/kernel": (w, hidden), f"{b}/mlp/fc1/bias": (hidden,),
                   f"{b}/mlp/fc2/kernel": (hidden, w), f"{b}/mlp/fc2/bias": (w,),
                   f"{b}/Dense_0/kernel": (c, 6 * w), f"{b}/Dense_0/bias": (6 * w,)})
  ins = [ch] * vc.num_res_blocks + [2 * ch] * (vc.num_res_blocks + 1)
  for k, cin in enumerate(ins):
    r = f"{u}/ResBlock_{k}"
    shapes.update({f"{r}/CondGroupNorm_0/Dense_0/kernel": (c, 2 * cin),
                   f"{r}/CondGroupNorm_0/Dense_0/bias": (2 * cin,),
                   f"{r}/Conv_0/kernel": (3, 3, cin, ch), f"{r}/Conv_0/bias": (ch,),
                   f"{r}/CondGroupNorm_1/Dense_0/kernel": (c, 2 * ch),
                   f"{r}/CondGroupNorm_1/Dense_0/bias": (2 * ch,),
                   f"{r}/Conv_1/kernel": (3, 3, ch, ch), f"{r}/Conv_1/bias": (ch,)})
    if cin != ch:
      shapes.update({f"{r}/Dense_0/kernel": (cin, ch), f"{r}/Dense_0/bias": (ch,)})
  return shapes


def _uvit_ours(ref: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
  """md4_jax's UViT parameters from the reference's, restated here by hand: split heads,
  (scale, shift) and adaLN chunks, the skip Dense as a 1x1 convolution."""
  vc = config.uvit
  w, h, n = vc.width, vc.num_heads, vc.num_res_blocks
  u, d = "classifier/UNet5DWrapper_0/UNet_0", "classifier/UNet5DWrapper_0/UNet_0/DiT_0"
  chunks = lambda a, k: a.reshape(a.shape[:-1] + (k, a.shape[-1] // k))
  ours = {
      "network/value_embedding/embedding": ref["classifier/Embed_0/embedding"],
      "network/conditioning/time/dense_0/kernel": ref["classifier/CondEmbedding_0/dense0/kernel"],
      "network/conditioning/time/dense_0/bias": ref["classifier/CondEmbedding_0/dense0/bias"],
      "network/conditioning/time/dense_1/kernel": ref["classifier/CondEmbedding_0/Dense_0/kernel"],
      "network/conditioning/time/dense_1/bias": ref["classifier/CondEmbedding_0/Dense_0/bias"],
      "network/dit/pos_embedding": ref[f"{d}/pos_embed"],
  }
  for leaf in ("kernel", "bias"):
    ours[f"network/stem/{leaf}"] = ref[f"{u}/Conv_0/{leaf}"]
    ours[f"network/out_conv/{leaf}"] = ref[f"{u}/Conv_1/{leaf}"]
    ours[f"network/out_norm/modulation/{leaf}"] = chunks(
        ref[f"{u}/CondGroupNorm_0/Dense_0/{leaf}"], 2)
    ours[f"network/dit/patch_embed/{leaf}"] = ref[f"{d}/x_embedder/proj/{leaf}"]
    ours[f"network/dit/final_modulation/dense/{leaf}"] = chunks(
        ref[f"{d}/final_layer/Dense_0/{leaf}"], 2)
    ours[f"network/dit/final_dense/{leaf}"] = ref[f"{d}/final_layer/linear/{leaf}"]
  for i in range(vc.depth):
    b, o = f"{d}/blocks_{i}", f"network/dit/block_{i}"
    for name, ref_name in (("query", "wq"), ("key", "wk"), ("value", "wv")):
      ours[f"{o}/attn/{name}/kernel"] = ref[f"{b}/attn/{ref_name}/kernel"].reshape(w, h, w // h)
      ours[f"{o}/attn/{name}/bias"] = ref[f"{b}/attn/{ref_name}/bias"].reshape(h, w // h)
    ours[f"{o}/attn/out/kernel"] = ref[f"{b}/attn/wo/kernel"].reshape(h, w // h, w)
    for leaf in ("kernel", "bias"):
      ours[f"{o}/mlp/wi/{leaf}"] = ref[f"{b}/mlp/fc1/{leaf}"]
      ours[f"{o}/mlp/wo/{leaf}"] = ref[f"{b}/mlp/fc2/{leaf}"]
      ours[f"{o}/modulation/dense/{leaf}"] = chunks(ref[f"{b}/Dense_0/{leaf}"], 6)
  names = [f"down_res_{k}" for k in range(n)] + [f"up_res_{k}" for k in range(n + 1)]
  for k, ours_name in enumerate(names):
    r, o = f"{u}/ResBlock_{k}", f"network/{ours_name}"
    for leaf in ("kernel", "bias"):
      ours[f"{o}/norm_0/modulation/{leaf}"] = chunks(ref[f"{r}/CondGroupNorm_0/Dense_0/{leaf}"], 2)
      ours[f"{o}/norm_1/modulation/{leaf}"] = chunks(ref[f"{r}/CondGroupNorm_1/Dense_0/{leaf}"], 2)
      ours[f"{o}/conv_0/{leaf}"] = ref[f"{r}/Conv_0/{leaf}"]
      ours[f"{o}/conv_1/{leaf}"] = ref[f"{r}/Conv_1/{leaf}"]
    if f"{r}/Dense_0/kernel" in ref:  # The skip: a Dense there, a 1x1 convolution here.
      ours[f"{o}/skip/kernel"] = ref[f"{r}/Dense_0/kernel"][None, None]
      ours[f"{o}/skip/bias"] = ref[f"{r}/Dense_0/bias"]
  return ours


# --------------------------------------------------------- the writer ---

def write_reference(directory, step: int, params: dict, ema: dict = None,
                    with_adam: bool = True) -> tuple[dict, dict]:
  """A reference-layout checkpoint at <directory>/checkpoints/<step>/train_state.

  params, ema: flat {reference name: array}. Returns the flat Adam (mu, nu) written."""
  nested = _nest(params)
  optimizer = optax.chain(optax.identity(), optax.adamw(optax.linear_schedule(0.0, 1e-3, 10)))
  opt_state = optimizer.init(nested)
  rng = np.random.default_rng(7)
  mu = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
  nu = {k: rng.random(v.shape).astype(np.float32) for k, v in params.items()}
  if with_adam:
    adam = opt_state[1][0]._replace(count=jnp.asarray(step, jnp.int32), mu=_nest(mu), nu=_nest(nu))
    opt_state = (opt_state[0], (adam,) + tuple(opt_state[1][1:]))
  else:
    opt_state = (opt_state[0], ())
  state = RefTrainState(rng=jax.random.PRNGKey(0), step=step, params=nested,
                        ema_params=None if ema is None else _nest(ema), opt_state=opt_state,
                        state={})
  state = jax.tree.map(np.asarray, state)
  # The reference's calls (md4/train.py): the legacy manager with one PyTreeCheckpointer per
  # item (its data iterator's item is left out: md4_jax does not read it).
  manager = ocp.CheckpointManager(
      os.path.join(directory, "checkpoints"),
      checkpointers={reference.TRAIN_STATE: ocp.PyTreeCheckpointer()},
      options=ocp.CheckpointManagerOptions(max_to_keep=5, create=True))
  manager.save(step, items={reference.TRAIN_STATE: state})
  manager.wait_until_finished()
  manager.close()
  return mu, nu


def _flat_state(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for path, leaf in leaves}


def _logits_pair(config, direct: dict, restored: dict, z, t):
  """The network's logits on the weights given directly and on the restored ones (one jitted
  function, the direct weights placed like the restored ones)."""
  network = build.build_model(config).network
  apply = jax.jit(lambda p: network.apply({"params": p}, z, t))
  direct = jax.tree.map(lambda a, like: jax.device_put(a, like.sharding), direct, restored)
  return np.asarray(apply(direct)), np.asarray(apply(restored))


def _setup_text(directory, step=7):
  config = _text_config()
  ref = _normal(np.random.default_rng(0), _text_reference_shapes(config))
  ema = {k: 0.5 * v for k, v in ref.items()}
  mu, nu = write_reference(str(directory / "ref"), step, ref, ema)
  return config, ref, ema, mu, nu


@pytest.fixture(scope="module")
def text_reference(tmp_path_factory):
  """The text transformer's reference checkpoint (step 7, EMA, Adam moments), written once:
  (config, ref, ema, nu, its directory)."""
  directory = tmp_path_factory.mktemp("text")
  config, ref, ema, _, nu = _setup_text(directory)
  return config, ref, ema, nu, directory


@pytest.fixture(scope="module")
def converted_text(text_reference):
  """text_reference converted and restored once for the tests that read it:
  (config, ref, ema, nu, restored state, directory)."""
  config, ref, ema, nu, directory = text_reference
  config = config.copy_and_resolve_references()
  record = reference.convert(str(directory / "ref"), config, str(directory / "run"),
                             mesh=helpers.one_device())
  assert record == {"source": str(directory / "ref" / "checkpoints" / "7" / "train_state"),
                    "step": 7, "parameters": record["parameters"], "ema": "reference",
                    "adam_moments": "reference"}
  _, _, state = workdir_lib.restore_run(str(directory / "run"), mesh=helpers.one_device())  # Checksums.
  return config, ref, ema, nu, state, directory


def _text_inputs(config, seed=1):
  z = np.random.default_rng(seed).integers(0, config.vocab_size + 1,
                                           (2,) + tuple(config.data_shape)).astype(np.int32)
  return z, jnp.array([0.3, 0.8])


# ------------------------------------------------------------- tests ---

def test_text_transformer_converts_with_ema_and_adam_moments(converted_text):
  config, ref, ema, nu, state, directory = converted_text
  assert int(state.step) == 7
  want = _text_ours(ref, config)
  got = _flat_state(state.params)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  for k, v in _text_ours(ema, config).items():
    np.testing.assert_array_equal(_flat_state(state.ema_params)[k], v, err_msg=k)
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda n: isinstance(
      n, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
  assert int(adam.count) == 7
  for k, v in _text_ours(nu, config).items():
    np.testing.assert_array_equal(_flat_state(adam.nu)[k], v, err_msg=k)
  # The restored model computes what the same model computes on the weights given directly.
  z, t = _text_inputs(config)
  direct, restored = _logits_pair(config, _nest(want)["network"], state.params["network"], z, t)
  np.testing.assert_allclose(restored, direct, rtol=1e-6, atol=1e-6)
  assert np.abs(direct).max() > 1e-2  # Non-trivial logits (the head is not zero).
  saved = json.load(open(directory / "run" / "config.json"))
  assert saved["transformer"]["cond_dim"] == 16


def test_scanned_and_padded_convert_and_compute_the_same_logits(converted_text, tmp_path):
  """scan_layers=True: the reference's separate blocks are stacked along the scanned axis,
  block i at index i. transformer.vocab_multiple=16: the embedding's V + 1 = 9 rows and the
  head's V = 8 columns (no bias, as the paper's) are zero-padded to 16 (Adam's moments too). The scanned, padded
  network computes the plain conversion's logits."""
  config, ref, _, _, state, directory = converted_text
  scanned = config.copy_and_resolve_references()
  scanned.scan_layers = True
  scanned.transformer.vocab_multiple = 16
  vocab = config.vocab_size
  reference.convert(str(directory / "ref"), scanned, str(tmp_path / "run"), mesh=helpers.one_device())
  _, _, stacked = workdir_lib.restore_run(str(tmp_path / "run"), mesh=helpers.one_device())
  want = _text_ours(ref, config)
  got = _flat_state(stacked.params)
  for i in range(config.transformer.depth):
    np.testing.assert_array_equal(got["network/blocks/block/attn/query/kernel"][i],
                                  want[f"network/block_{i}/attn/query/kernel"])
  emb, kernel = got["network/token_embedding/embedding"], got["network/head/kernel"]
  assert emb.shape[0] == kernel.shape[-1] == 16 and "network/head/bias" not in got  # The paper's.
  np.testing.assert_array_equal(emb[:vocab + 1], want["network/token_embedding/embedding"])
  np.testing.assert_array_equal(kernel[:, :vocab], want["network/head/kernel"])
  assert not (emb[vocab + 1:].any() or kernel[:, vocab:].any())
  moments = [v for k, v in _flat_state(stacked.opt_state).items() if k.endswith("head/kernel")]
  assert len(moments) == 2 and all(m.shape[-1] == 16 and not m[:, vocab:].any() and m.any()
                                   for m in moments)
  z, t = _text_inputs(config)
  logits = lambda c, p: np.asarray(jax.jit(
      lambda p: build.build_model(c).network.apply({"params": p}, z, t))(p))
  np.testing.assert_allclose(logits(scanned, stacked.params["network"]),
                             logits(config, state.params["network"]), rtol=1e-5, atol=1e-5)


def test_restored_text_block_is_the_papers_block_on_the_reference_weights(converted_text):
  """Block 0 of the restored network, on the input and conditioning it sees inside the
  network, equals the numpy re-statement of the paper's block (eps 1e-5) on the
  reference's arrays (reshaped here by hand)."""
  config, ref, _, _, state, _ = converted_text
  network = build.build_model(config).network

  @jax.jit
  def block_0_io(params, z, t):
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.module.name == "block_0" and context.method_name == "__call__":
        seen["x"], seen["c"], seen["out"] = args[0], args[1], out
      return out
    with flax.linen.intercept_methods(interceptor):
      network.apply({"params": params}, z, t)
    return seen

  seen = block_0_io(state.params["network"], *_text_inputs(config, seed=5))
  weights = jax.tree.map(lambda a: np.asarray(a, np.float64),
                         _nest(_text_ours(ref, config))["network"]["block_0"])
  want = paper_numpy.block(weights, np.asarray(seen["x"], np.float64),
                           np.asarray(seen["c"], np.float64))
  np.testing.assert_allclose(seen["out"], want, rtol=1e-4, atol=1e-4)
  assert np.abs(want - seen["x"]).max() > 1e-1  # The block changes its input.


def test_genmd4_converts_its_schedule_exponents_and_computes_the_same_logits(tmp_path):
  """GenMD4: the transformer plus the reference's noise_schedule/w (softplus(w) are the
  per-token exponents), one block deep."""
  config = _text_config()
  base.genmd4(config)
  config.transformer.depth = 1
  shapes = _text_reference_shapes(config)
  shapes["noise_schedule/w"] = (config.vocab_size,)
  ref = _normal(np.random.default_rng(8), shapes)
  write_reference(str(tmp_path / "ref"), 4, ref, ema=None, with_adam=False)
  workdir = str(tmp_path / "run")
  reference.convert(str(tmp_path / "ref"), config, workdir, mesh=helpers.one_device())
  _, experiment, state = workdir_lib.restore_run(workdir, mesh=helpers.one_device())
  want = _text_ours(ref, config)
  assert set(_flat_state(state.params)) == set(want) | {"w_raw"}
  powers = experiment.model.apply({"params": state.ema_params}, method=lambda m: m.powers())
  np.testing.assert_allclose(powers, np.logaddexp(0.0, ref["noise_schedule/w"]), rtol=1e-6)
  z, t = _text_inputs(config)
  direct, restored = _logits_pair(config, _nest(want)["network"], state.ema_params["network"],
                                  z, t)
  np.testing.assert_allclose(restored, direct, rtol=1e-6, atol=1e-6)
  assert np.abs(direct).max() > 1e-2


def test_unet_converts_and_computes_the_same_logits(tmp_path):
  config = _unet_config()
  ref = _normal(np.random.default_rng(2), _unet_reference_shapes(config))
  write_reference(str(tmp_path / "ref"), 3, ref, ema=None, with_adam=False)
  workdir = str(tmp_path / "run")
  record = reference.convert(str(tmp_path / "ref" / "checkpoints"), config, workdir,
                             mesh=helpers.one_device())
  assert record["ema"] == "copied from params" and record["adam_moments"] == "zeros"
  _, _, state = workdir_lib.restore_run(workdir, mesh=helpers.one_device())
  want = _unet_ours(ref, config)
  assert set(_flat_state(state.params)) == set(want)
  z = np.random.default_rng(3).integers(0, 257, (2,) + tuple(config.data_shape)).astype(np.int32)
  t = jnp.array([0.2, 0.9])
  direct, restored = _logits_pair(config, _nest(want)["network"], state.ema_params["network"],
                                  z, t)
  np.testing.assert_allclose(restored, direct, rtol=1e-5, atol=1e-5)
  assert np.abs(direct).max() > 1e-2


@pytest.fixture(scope="module")
def uvit_reference(tmp_path_factory):
  """A reference UViT checkpoint at step 5 (no EMA, no Adam moments): (config, ref, dir)."""
  directory = tmp_path_factory.mktemp("uvit")
  config = _uvit_config()
  ref = _normal(np.random.default_rng(6), _uvit_reference_shapes(config))
  write_reference(str(directory / "ref"), 5, ref, ema=None, with_adam=False)
  return config, ref, directory


def test_uvit_converts_and_computes_the_same_logits(uvit_reference):
  config, ref, directory = uvit_reference
  workdir = str(directory / "run")
  reference.convert(str(directory / "ref"), config, workdir, mesh=helpers.one_device())
  _, _, state = workdir_lib.restore_run(workdir, mesh=helpers.one_device())
  assert int(state.step) == 5
  want = _uvit_ours(ref, config)
  assert set(_flat_state(state.params)) == set(want)
  z = np.random.default_rng(9).integers(0, 257, (2,) + tuple(config.data_shape)).astype(np.int32)
  t = jnp.array([0.4, 0.7])
  direct, restored = _logits_pair(config, _nest(want)["network"], state.ema_params["network"],
                                  z, t)
  np.testing.assert_allclose(restored, direct, rtol=1e-5, atol=1e-5)
  assert np.abs(direct).max() > 1e-2


# ------------------------------------------ the reference's function ---

def _parsed_config(spec: str, *overrides: str):
  """The config md4_jax.convert's --config flag yields for `spec` and --config.* overrides."""
  argv = ["md4_jax.convert", f"--config={spec}", *overrides]
  flag_values = flags.FlagValues()
  holder = cli.define_config_flag("config", "", flag_values=flag_values)
  with mock.patch.object(sys, "argv", argv):  # config_flags reads the overrides from sys.argv.
    flag_values(argv)
  return holder.value


@pytest.mark.parametrize("spec", ["text8", "text8:tiny", "text8:genmd4", "cifar10",
                                  "cifar10:tiny", "imagenet64", "imagenet64:tiny",
                                  "imagenet64:best_likelihood", "openwebtext", "fineweb_edu"])
def test_paper_configs_compute_the_reference_function_without_overrides(spec):
  assert reference.function_overrides(_parsed_config(spec)) == []


@pytest.mark.parametrize("spec, overrides, named", [
    ("text8:wide_cond", (), ["--config.transformer.sinusoid=md4",
                             "--config.transformer.norm_eps=1e-05"]),
    ("cifar10:wide_cond", (), ["--config.unet.sinusoid=md4"]),
    ("imagenet64:tiny", ("--config.uvit.dit_residual=True",), ["--config.uvit.dit_residual=False"]),
    ("cifar10", ("--config.classes=10", "--config.unet.label_cond=add"),
     ["--config.unet.label_cond=concat"]),
])
def test_the_named_overrides_give_the_reference_function(spec, overrides, named):
  """What the refusal names is exactly what is missing, and parsed as the CLI parses it."""
  config = _parsed_config(spec, *overrides)
  assert reference.function_overrides(config) == named
  with pytest.raises(ValueError, match=re.escape(" ".join(named))):
    reference.check_function(config)
  assert reference.function_overrides(_parsed_config(spec, *overrides, *named)) == []


@pytest.mark.parametrize("edit, named", [
    ({"transformer": {"sinusoid": "dit"}}, "--config.transformer.sinusoid=md4"),
    ({"uvit": {"dit_residual": True}}, "--config.uvit.dit_residual=False"),
])
def test_config_of_another_function_is_refused_in_one_line(text_reference, uvit_reference,
                                                           capsys, tmp_path, edit, named):
  """The reference checkpoint's names and shapes fit the config, its function does not:
  one line naming the override, exit 2, nothing written."""
  (group, values), = edit.items()
  config, directory = ((uvit_reference[0], uvit_reference[2]) if group == "uvit" else
                       (text_reference[0], text_reference[4]))
  config = config.copy_and_resolve_references()
  config[group].update(values)
  workdir = str(tmp_path / "run")
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda: reference.convert(str(directory / "ref"), config, workdir),
            "md4_jax.convert")
  assert exit_info.value.code == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.endswith(
      f"convert with {named} (see docs/convert.md)."), err
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("edit, needle", [
    ("drop", "classifier/Transformer_0/TransformerBlock_1/feed_forward/w3/kernel"),
    ("misshape", "classifier/Transformer_0/TransformerBlock_0/attention/wq/kernel"),
    ("extra", "classifier/Transformer_0/RMSNorm_0/scale"),
])
def test_mismatched_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, edit, needle):
  config = _text_config()
  ref = _normal(np.random.default_rng(0), _text_reference_shapes(config))
  if edit == "drop":
    del ref[needle]
  elif edit == "misshape":
    ref[needle] = np.ascontiguousarray(ref[needle][:, :-4])
  else:
    ref[needle] = np.ones((32,), np.float32)
  write_reference(str(tmp_path / "ref"), 1, ref, with_adam=False)
  workdir = str(tmp_path / "run")
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda: reference.convert(str(tmp_path / "ref"), config, workdir),
            "md4_jax.convert")
  assert exit_info.value.code == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and needle in err, err
  assert not os.path.exists(workdir)  # Nothing written.


def test_non_empty_workdir_is_refused(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda: reference.convert(str(tmp_path / "nowhere"), _text_config(), str(workdir)),
            "md4_jax.convert")
  assert exit_info.value.code == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "not empty" in err
  assert os.listdir(workdir) == ["notes.txt"]


CONFIG_FILE = '''
from md4_jax.configs import base, synthetic_text

def get_config(arg=None):
  config = synthetic_text.get_config("tiny")
  base.paper_transformer(config, embed_dim=16)
  tc = config.transformer
  tc.width, tc.depth, tc.num_heads, tc.cond_dim = 32, 2, 4, 16
  config.num_train_steps, config.num_samples = 9, 0
  return config
'''


@pytest.mark.slow
def test_cli_converts_then_training_resumes_and_evaluation_and_sampling_run(text_reference,
                                                                            tmp_path):
  from md4_jax.run import loop  # pylint: disable=g-import-not-at-top
  config, ref, _, _, directory = text_reference
  config = config.copy_and_resolve_references()
  config_file = tmp_path / "paper_tiny.py"
  config_file.write_text(CONFIG_FILE)
  workdir = str(tmp_path / "run")
  done = helpers.run_module("md4_jax.convert", f"--from_reference={directory / 'ref'}",
                            f"--config={config_file}", f"--workdir={workdir}",
                            "--config.eval_batch_size=40", devices=1)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "Converted reference step 7" in done.stdout
  # The commands a user runs next, on the converted checkpoint (step 7).
  report_file = tmp_path / "eval.json"
  done = helpers.run_module("md4_jax.evaluate", f"--workdir={workdir}", "--step=7",
                            "--num_t_samples=1", f"--output={report_file}", devices=1)
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(report_file.read_text())
  assert report["step"] == 7 and np.isfinite(report["nelbo"]) and report["examples"] > 0
  done = helpers.run_module("md4_jax.sample", f"--workdir={workdir}", "--step=7",
                            "--num_samples=4", "--batch_size=4", "--steps=4",
                            f"--out_dir={tmp_path / 'samples'}", devices=1)
  assert done.returncode == 0, done.stderr[-2000:]
  (info_file,) = (tmp_path / "samples").glob("*.json")
  info = json.loads(info_file.read_text())
  assert info["nfe"] == 4 and info["num_samples"] == 4
  tokens = np.load(str(info_file)[:-len(".json")] + ".npy")
  assert tokens.shape == (4,) + tuple(config.data_shape)
  assert tokens.min() >= 0 and tokens.max() < config.vocab_size  # Every mask revealed.
  config.eval_batch_size = 40
  # Training continues from the reference's step 7 to 9 and evaluates there.
  final = loop.run(config, workdir, mesh=helpers.one_device())
  assert helpers.checkpoint_steps(workdir) == [7, 9]
  assert final["step"] == 9 and np.isfinite(final["eval_loss"])
  _, _, state = workdir_lib.restore_run(workdir)
  # Two small steps moved the reference's weights (std 0.3) by far less than their size.
  embedding = np.asarray(state.params["network"]["token_embedding"]["embedding"])
  moved = np.abs(embedding - ref["classifier/Embed_0/embedding"]).max()
  assert 0 < moved < 0.05, moved


@pytest.mark.parametrize("name, variant", [("text8", ""), ("text8", "genmd4"),
                                           ("cifar10", ""), ("imagenet64", "")])
def test_every_paper_network_parameter_has_its_own_reference_name(name, variant):
  """Paper widths at reduced depth (shapes only): every md4_jax parameter maps to a distinct
  reference name of the same size, under the reference's module names for that network."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"md4_jax.configs.{name}").get_config(variant)
  config.transformer.depth = config.unet.num_res_blocks = config.uvit.num_res_blocks = 2
  config.uvit.depth = 2
  ours = checkpoint_lib.array_shapes(build.setup(config).abstract_state.params)
  names = reference.reference_names(ours, reference.TABLES[config.network],
                                    reference.context(config))
  refs = [n for n, _, _ in names.values()]
  assert len(set(refs)) == len(refs)
  for path, (_, _, shape) in names.items():
    assert np.prod(shape) == np.prod(ours[path]), path
  last = {"transformer": "classifier/Transformer_0/TransformerBlock_1/",
          "unet": "classifier/UNet5DWrapper_0/UNet_0/ResBlock_6/",  # 2 down, 2 middle, 3 up.
          "uvit": "classifier/UNet5DWrapper_0/UNet_0/ResBlock_4/"}[config.network]  # 2 + 3.
  assert any(r.startswith(last) for r in refs)
  assert all(r.startswith(("classifier/", "noise_schedule/w")) for r in refs)
