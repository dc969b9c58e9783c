"""A GPT-2-family causal language model in Flax, read from the published files.

A GPT-2 directory (a local copy or a Hugging Face hub snapshot) holds
`config.json` (n_layer, n_head, n_embd, n_positions, vocab_size,
layer_norm_epsilon) and `model.safetensors` with PyTorch names: wte, wpe,
h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_f,
optionally under a `transformer.` prefix. GPT-2's Conv1D layers store their
weight as [in, out], which is a Dense kernel as it is.

The network: token + position embeddings, pre-LN blocks (causal multi-head
attention through one fused q/k/v projection; an MLP with the tanh GELU,
"gelu_new"), a final LayerNorm and the head tied to the token embedding.
"""

import dataclasses
import glob
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Causal-mask buffers some GPT-2 checkpoints store beside the weights.
_BUFFERS = (".attn.bias", ".attn.masked_bias")
# Activation names of the tanh approximation of GELU.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The architecture, with config.json's names."""

  vocab_size: int  # V.
  n_positions: int  # C, the longest sequence.
  n_embd: int  # D.
  n_layer: int
  n_head: int  # H; D / H per head.
  n_inner: int | None = None  # MLP width (None: 4 D).
  layer_norm_epsilon: float = 1e-5

  @classmethod
  def from_json(cls, values: dict[str, Any]) -> "GPT2Config":
    """From config.json's dict; ValueError for a variant this network does not compute."""
    activation = values.get("activation_function", "gelu_new")
    if activation not in _TANH_GELU:
      raise ValueError(f"GPT-2 judge: activation_function {activation!r} is not supported "
                       f"(only {' / '.join(_TANH_GELU)}).")
    if values.get("scale_attn_by_inverse_layer_idx") or values.get("scale_attn_weights") is False:
      raise ValueError("GPT-2 judge: only the standard 1/sqrt(head dim) attention scale is "
                       "supported.")
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
      raise ValueError(f"GPT-2 judge: config.json lacks {', '.join(missing)}; the judge reads "
                       f"GPT-2-family models (model_type {values.get('model_type')!r}).")
    return cls(**{n: values[n] for n in names if n in values})


_INIT = nn.initializers.normal(0.02)


class _Attention(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BxTxD, allowed_Bx1xTxT):
    b, t, d = x_BxTxD.shape
    heads = self.config.n_head
    qkv = nn.Dense(3 * d, kernel_init=_INIT, name="c_attn")(x_BxTxD)
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in jnp.split(qkv, 3, axis=-1))
    scores_BxHxTxT = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
    scores_BxHxTxT = jnp.where(allowed_Bx1xTxT, scores_BxHxTxT,
                               jnp.finfo(scores_BxHxTxT.dtype).min)
    weights = jax.nn.softmax(scores_BxHxTxT, axis=-1)
    out_BxTxD = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return nn.Dense(d, kernel_init=_INIT, name="c_proj")(out_BxTxD)


class _MLP(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BxTxD):
    d = x_BxTxD.shape[-1]
    h = nn.Dense(self.config.n_inner or 4 * d, kernel_init=_INIT, name="c_fc")(x_BxTxD)
    return nn.Dense(d, kernel_init=_INIT, name="c_proj")(nn.gelu(h, approximate=True))


class _Block(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, x_BxTxD, allowed_Bx1xTxT):
    eps = self.config.layer_norm_epsilon
    h = nn.LayerNorm(epsilon=eps, name="ln_1")(x_BxTxD)
    x_BxTxD = x_BxTxD + _Attention(self.config, name="attn")(h, allowed_Bx1xTxT)
    h = nn.LayerNorm(epsilon=eps, name="ln_2")(x_BxTxD)
    return x_BxTxD + _MLP(self.config, name="mlp")(h)


class GPT2(nn.Module):
  """GPT-2 language model: ids [B, T] (and a 0/1 key mask [B, T]) -> logits [B, T, V]."""

  config: GPT2Config

  @nn.compact
  def __call__(self, ids_BxT, mask_BxT=None):
    c = self.config
    t = ids_BxT.shape[1]
    if t > c.n_positions:
      raise ValueError(f"GPT-2 judge: {t} tokens exceed its context of {c.n_positions}.")
    wte = nn.Embed(c.vocab_size, c.n_embd, embedding_init=_INIT, name="wte")
    wpe = nn.Embed(c.n_positions, c.n_embd, embedding_init=_INIT, name="wpe")
    x_BxTxD = wte(ids_BxT) + wpe(jnp.arange(t))[None]
    allowed_Bx1xTxT = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if mask_BxT is not None:
      allowed_Bx1xTxT = allowed_Bx1xTxT & (mask_BxT[:, None, None, :] > 0)
    for i in range(c.n_layer):
      x_BxTxD = _Block(c, name=f"h_{i}")(x_BxTxD, allowed_Bx1xTxT)
    x_BxTxD = nn.LayerNorm(epsilon=c.layer_norm_epsilon, name="ln_f")(x_BxTxD)
    return wte.attend(x_BxTxD)


def _param_path(name: str) -> tuple[str, ...]:
  """A checkpoint name ('h.3.ln_1.weight') as its parameter path (h_3, ln_1, scale)."""
  parts = name.split(".")
  if parts[0] == "h":
    parts = [f"h_{parts[1]}", *parts[2:]]
  *modules, leaf = parts
  if leaf == "weight":
    leaf = ("embedding" if modules[-1] in ("wte", "wpe") else
            "scale" if modules[-1].startswith("ln") else "kernel")
  return (*modules, leaf)


def _tensor_name(path: tuple[str, ...]) -> str:
  """The inverse of _param_path."""
  *modules, leaf = path
  if modules[0].startswith("h_"):
    modules = ["h", modules[0][2:], *modules[1:]]
  return ".".join([*modules, "bias" if leaf == "bias" else "weight"])


def param_shapes(config: GPT2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Every parameter's path and shape."""
  abstract = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0),
                                                       jnp.zeros((1, 1), jnp.int32)))
  return {p: v.shape for p, v in traverse_util.flatten_dict(abstract["params"]).items()}


def params_from_tensors(tensors: dict[str, np.ndarray], config: GPT2Config) -> dict:
  """Checkpoint tensors (GPT-2's names) as GPT2 parameters (float32).

  Raises:
    ValueError: a weight missing, unexpected or of the wrong shape; an untied head.
  """
  shapes = param_shapes(config)
  flat, head = {}, None
  for name, array in tensors.items():
    bare = name.removeprefix("transformer.")
    if bare.endswith(_BUFFERS):
      continue
    if bare == "lm_head.weight":
      head = array
      continue
    path = _param_path(bare)
    if path not in shapes:
      raise ValueError(f"GPT-2 judge: unexpected weight {name!r} for {config}.")
    if tuple(array.shape) != shapes[path]:
      raise ValueError(f"GPT-2 judge: {name} has shape {tuple(array.shape)}, the config "
                       f"implies {shapes[path]}.")
    flat[path] = jnp.asarray(array, jnp.float32)
  missing = [_tensor_name(p) for p in shapes if p not in flat]
  if missing:
    raise ValueError(f"GPT-2 judge: the checkpoint lacks {len(missing)} weights, e.g. "
                     f"{missing[0]}.")
  if head is not None and not np.array_equal(head, flat[("wte", "embedding")]):
    raise ValueError("GPT-2 judge: lm_head.weight differs from wte.weight; only the tied head "
                     "is supported.")
  return traverse_util.unflatten_dict(flat)


def load(directory: str) -> tuple[GPT2Config, dict]:
  """The config and parameters of a GPT-2 directory (config.json, model*.safetensors)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, "config.json")) as f:
    config = GPT2Config.from_json(json.load(f))
  files = sorted(glob.glob(os.path.join(glob.escape(directory), "model*.safetensors")))
  if not files:
    raise FileNotFoundError(f"GPT-2 judge: no model.safetensors in {directory}.")
  tensors = {}
  for path in files:
    tensors.update(safetensors.numpy.load_file(path))
  return config, params_from_tensors(tensors, config)


def save(directory: str, config: GPT2Config, params: dict, **extra_config) -> None:
  """Writes config.json (+ `extra_config`, e.g. bos_token_id) and model.safetensors in the
  published layout (what `load` and other GPT-2 readers read)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  values = {"model_type": "gpt2", "activation_function": "gelu_new",
            **dataclasses.asdict(config), **extra_config}
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(values, f, indent=2)
  tensors = {_tensor_name(p): np.ascontiguousarray(np.asarray(v, np.float32))
             for p, v in traverse_util.flatten_dict(params).items()}
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"),
                              metadata={"format": "pt"})
