"""Reference checkpoints into md4_jax workdirs: the name and shape tables, and the conversion.

The reference implementation (google-deepmind/md4) saves with orbax under
<workdir>/checkpoints/<step>/train_state a TrainState of fields rng, step, params,
ema_params (None when its ema_rate is 0), opt_state (optax.chain(clip or identity,
adamw)) and state (empty). Its parameters are Flax names under

  classifier/CondEmbedding_0/{dense0, Dense_0}     the time MLP ([sin | cos] sinusoid in)
  classifier/Transformer_0/...                     text (MD4, GenMD4)
  classifier/UNet5DWrapper_0/UNet_0/...            images (the UNet, or the UViT with a DiT)
  classifier/Embed_0                               token / value embedding outside the net
  cond_embeddings                                  class labels (class-conditional runs)
  noise_schedule/w                                 GenMD4's exponents, softplus(w)

One table per network (TABLES) maps each md4_jax parameter to its reference name
and to how the array changes on the way:

  same        the same array (names differ only)
  fuse_last   md4_jax [..., A, B] from the reference's [..., A * B]: q/k/v DenseGeneral
              [D, H, Dh] from Dense [D, H * Dh] (and their biases), adaLN [C, K, D]
              from [C, K * D] in the reference's chunk order
  fuse_first  md4_jax [A, B, ...] from [A * B, ...]: the attention output [H, Dh, D]
  conv1x1     md4_jax's 1x1 skip convolution [1, 1, I, O] from the reference's Dense [I, O]
  vocab_rows  the token embedding [V' >= V + 1, D] from [V + 1, D], and
  vocab_cols  the head [D, V' >= V] (bias [V']) from [D, V]: equal, or zero-padded when the
              config pads the vocabulary (transformer.vocab_multiple; the padding is never
              predicted, so the function is the reference's)

The time MLP maps as it is ('same'): the config must compute the reference's function,
so its sinusoid is the reference's ([sin | cos] over 10000^(-i/(half-1))) and a label
embedding is concatenated after it, as there. Names and shapes cannot tell the options
that change the function but no parameter (REFERENCE_FUNCTION: the sinusoid, where class
labels join, the text LayerNorm epsilon, the UViT's DiT residual), so `check_function`
refuses a config with md4_jax's own values, naming the --config overrides that give the
reference's (the paper configs need none). The other differences of md4_jax's own designs
(UNet attention biases, a head bias, learned positions, other widths) show in the
parameters and are refused by the tables below.

A table is consulted for the parameters the md4_jax network of the config has, so an
optional parameter (q/k/v/out biases, a head bias) is mapped exactly when the network
has it. Every md4_jax parameter must find its reference array with the expected shape,
and every reference array must be used; otherwise `ReferenceMismatchError` names the
first one that does not fit (the CLI prints it as one line and exits 2).

`convert(source, config, workdir)` writes config.json and one checkpoint through
run/checkpoint.py (with checksums): params, EMA params, the optimiser state with the
reference's Adam moments (and step counts), at the reference's step.
"""

import dataclasses
import json
import os
import re
from typing import Any, Callable, Optional

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from md4_jax.experiment import build
from md4_jax.experiment import validation
from md4_jax.networks import conditioning
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax.run import saved_config
from md4_jax.run import workdir as workdir_lib

TRAIN_STATE = "train_state"  # The reference's item name under <step>/.
RECORD_FILE = "converted_from.json"

_CLASSIFIER = "classifier"
_TEXT = "classifier/Transformer_0"
_IMAGE = "classifier/UNet5DWrapper_0/UNet_0"
_TIME = "classifier/CondEmbedding_0"


class ReferenceMismatchError(ValueError):
  """The reference checkpoint does not hold the network the config builds (CLI exit 2)."""


# ------------------------------------------------------------ the tables ---

@dataclasses.dataclass(frozen=True)
class Context:
  """What the tables need to know about the config's network.

  Attributes:
    blocks: transformer / DiT depth, or residual blocks per level of a UNet / UViT.
    embed_outside: the reference embeds tokens outside its transformer (md4_jax's
      embed_dim > 0: a narrow embedding projected to the width).
    cond: the network reads a conditioning vector (its residual blocks have FiLM).
    vocab: V, the real tokens (the reference's head has V columns, its embedding V + 1 rows).
  """

  blocks: int
  embed_outside: bool
  cond: bool
  vocab: int = 0


# (our path regex, reference path from the match and the context, transform: a name of the
# module docstring's list, or a function of the match that returns one).
Rule = tuple[str, Callable[[re.Match, Context], str], "str | Callable[[re.Match], str]"]


def _time_rules() -> list[Rule]:
  return [
      (r"network/conditioning/time/dense_0/(kernel|bias)",
       lambda m, c: f"{_TIME}/dense0/{m[1]}", "same"),
      (r"network/conditioning/time/dense_1/(kernel|bias)",
       lambda m, c: f"{_TIME}/Dense_0/{m[1]}", "same"),
      (r"network/conditioning/label/embedding", lambda m, c: "cond_embeddings/embedding", "same"),
      (r"w_raw", lambda m, c: "noise_schedule/w", "same"),  # GenMD4's exponents.
  ]


_QKV = {"query": "wq", "key": "wk", "value": "wv"}


def _text_final(c: Context) -> int:
  """Index of the reference transformer's final adaLN Dense (its head is the next one):
  Dense_0 is the input projection when tokens are embedded outside."""
  return 1 if c.embed_outside else 0


TRANSFORMER: list[Rule] = _time_rules() + [
    (r"network/token_embedding/embedding",
     lambda m, c: (f"{_CLASSIFIER}/Embed_0/embedding" if c.embed_outside
                   else f"{_TEXT}/Embed_0/embedding"), "vocab_rows"),
    (r"network/embed_proj/(kernel|bias)", lambda m, c: f"{_TEXT}/Dense_0/{m[1]}", "same"),
    (r"network/block_(\d+)/attn/(query|key|value)/(kernel|bias)",
     lambda m, c: f"{_TEXT}/TransformerBlock_{m[1]}/attention/{_QKV[m[2]]}/{m[3]}",
     "fuse_last"),
    (r"network/block_(\d+)/attn/out/kernel",
     lambda m, c: f"{_TEXT}/TransformerBlock_{m[1]}/attention/wo/kernel", "fuse_first"),
    (r"network/block_(\d+)/mlp/wi_gate/kernel",
     lambda m, c: f"{_TEXT}/TransformerBlock_{m[1]}/feed_forward/w1/kernel", "same"),
    (r"network/block_(\d+)/mlp/wi_up/kernel",
     lambda m, c: f"{_TEXT}/TransformerBlock_{m[1]}/feed_forward/w3/kernel", "same"),
    (r"network/block_(\d+)/mlp/wo/kernel",
     lambda m, c: f"{_TEXT}/TransformerBlock_{m[1]}/feed_forward/w2/kernel", "same"),
    # adaLN: shift, scale, gate (attention), shift, scale, gate (MLP) in both.
    (r"network/block_(\d+)/modulation/dense/(kernel|bias)",
     lambda m, c: f"{_TEXT}/TransformerBlock_{m[1]}/Dense_0/{m[2]}", "fuse_last"),
    (r"network/final_modulation/dense/(kernel|bias)",
     lambda m, c: f"{_TEXT}/Dense_{_text_final(c)}/{m[1]}", "fuse_last"),
    (r"network/head/(kernel|bias)",
     lambda m, c: f"{_TEXT}/Dense_{_text_final(c) + 1}/{m[1]}", "vocab_cols"),
]


def _unet_res(inner: str, c: Context) -> str:
  """A VDM residual block's parameter: GroupNorm_0, Conv_0, Dense_0 (the FiLM shift, when
  conditioned), GroupNorm_1, Conv_1, then the skip Dense (when the channels change)."""
  name, leaf = inner.split("/")
  skip = "Dense_1" if c.cond else "Dense_0"
  return {"norm_0": "GroupNorm_0", "conv_0": "Conv_0", "film": "Dense_0",
          "norm_1": "GroupNorm_1", "conv_1": "Conv_1", "skip": skip}[name] + "/" + leaf


def _unet_kind(m: re.Match) -> str:
  """The residual block's skip kernel is a 1x1 convolution here, a Dense there."""
  return "conv1x1" if m[0].endswith("/skip/kernel") else "same"


_RES_INNER = r"((?:norm_0|conv_0|film|norm_1|conv_1|skip)/(?:kernel|bias|scale))"

# The reference's UNet has one resolution: Conv_0, ResBlock_0..n-1 (down), ResBlock_n,
# SelfAttention_0, ResBlock_n+1 (middle), ResBlock_n+2..2n+2 (up), GroupNorm_0, Conv_1.
# md4_jax's UNet with channel_mult (1,) and no attention resolutions is that network; its
# other levels have no reference counterpart.
UNET: list[Rule] = _time_rules() + [
    (r"network/value_embedding/embedding", lambda m, c: f"{_CLASSIFIER}/Embed_0/embedding",
     "same"),
    (r"network/stem/(kernel|bias)", lambda m, c: f"{_IMAGE}/Conv_0/{m[1]}", "same"),
    (r"network/down_0_res_(\d+)/" + _RES_INNER,
     lambda m, c: f"{_IMAGE}/ResBlock_{int(m[1])}/{_unet_res(m[2], c)}", _unet_kind),
    (r"network/mid_res_([01])/" + _RES_INNER,
     lambda m, c: f"{_IMAGE}/ResBlock_{c.blocks + int(m[1])}/{_unet_res(m[2], c)}", _unet_kind),
    (r"network/up_0_res_(\d+)/" + _RES_INNER,
     lambda m, c: f"{_IMAGE}/ResBlock_{c.blocks + 2 + int(m[1])}/{_unet_res(m[2], c)}",
     _unet_kind),
    (r"network/mid_attn/norm/(scale|bias)",
     lambda m, c: f"{_IMAGE}/SelfAttention_0/GroupNorm_0/{m[1]}", "same"),
    # Both are Flax DenseGeneral layouts ([C, H, Dh], [H, Dh, C]); the biases map when
    # md4_jax's middle attention has them.
    (r"network/mid_attn/attn/(query|key|value|out)/(kernel|bias)",
     lambda m, c: f"{_IMAGE}/SelfAttention_0/MultiHeadDotProductAttention_0/{m[1]}/{m[2]}",
     "same"),
    (r"network/out_norm/(scale|bias)", lambda m, c: f"{_IMAGE}/GroupNorm_0/{m[1]}", "same"),
    (r"network/out_conv/(kernel|bias)", lambda m, c: f"{_IMAGE}/Conv_1/{m[1]}", "same"),
]


def _uvit_res(inner: str) -> str:
  """A UViT residual block: CondGroupNorm_0/Dense_0 (scale, shift), Conv_0,
  CondGroupNorm_1/Dense_0, Conv_1, the skip Dense_0 (when the channels change)."""
  layer, leaf = inner.rsplit("/", 1)
  return {"norm_0/modulation": "CondGroupNorm_0/Dense_0", "conv_0": "Conv_0",
          "norm_1/modulation": "CondGroupNorm_1/Dense_0", "conv_1": "Conv_1",
          "skip": "Dense_0"}[layer] + "/" + leaf


def _uvit_kind(m: re.Match) -> str:
  """Conditional GroupNorms: (scale, shift) chunks; the skip kernel: a 1x1 convolution."""
  if m[2].startswith("norm_"):
    return "fuse_last"
  return "conv1x1" if m[2] == "skip/kernel" else "same"


_UVIT_INNER = r"((?:norm_0/modulation|conv_0|norm_1/modulation|conv_1|skip)/(?:kernel|bias))"
_DIT = f"{_IMAGE}/DiT_0"

# The reference's UViT: Conv_0, ResBlock_0..n-1, DiT_0, ResBlock_n..2n, CondGroupNorm_0,
# Conv_1 (one resolution, as md4_jax's UViT).
UVIT: list[Rule] = _time_rules() + [
    (r"network/value_embedding/embedding", lambda m, c: f"{_CLASSIFIER}/Embed_0/embedding",
     "same"),
    (r"network/stem/(kernel|bias)", lambda m, c: f"{_IMAGE}/Conv_0/{m[1]}", "same"),
    (r"network/down_res_(\d+)/" + _UVIT_INNER,
     lambda m, c: f"{_IMAGE}/ResBlock_{int(m[1])}/{_uvit_res(m[2])}", _uvit_kind),
    (r"network/up_res_(\d+)/" + _UVIT_INNER,
     lambda m, c: f"{_IMAGE}/ResBlock_{c.blocks + int(m[1])}/{_uvit_res(m[2])}",
     _uvit_kind),
    (r"network/out_norm/modulation/(kernel|bias)",
     lambda m, c: f"{_IMAGE}/CondGroupNorm_0/Dense_0/{m[1]}", "fuse_last"),
    (r"network/out_conv/(kernel|bias)", lambda m, c: f"{_IMAGE}/Conv_1/{m[1]}", "same"),
    (r"network/dit/patch_embed/(kernel|bias)", lambda m, c: f"{_DIT}/x_embedder/proj/{m[1]}",
     "same"),
    (r"network/dit/pos_embedding", lambda m, c: f"{_DIT}/pos_embed", "same"),
    (r"network/dit/block_(\d+)/attn/(query|key|value)/(kernel|bias)",
     lambda m, c: f"{_DIT}/blocks_{m[1]}/attn/{_QKV[m[2]]}/{m[3]}", "fuse_last"),
    (r"network/dit/block_(\d+)/attn/out/kernel",
     lambda m, c: f"{_DIT}/blocks_{m[1]}/attn/wo/kernel", "fuse_first"),
    (r"network/dit/block_(\d+)/mlp/wi/(kernel|bias)",
     lambda m, c: f"{_DIT}/blocks_{m[1]}/mlp/fc1/{m[2]}", "same"),
    (r"network/dit/block_(\d+)/mlp/wo/(kernel|bias)",
     lambda m, c: f"{_DIT}/blocks_{m[1]}/mlp/fc2/{m[2]}", "same"),
    (r"network/dit/block_(\d+)/modulation/dense/(kernel|bias)",
     lambda m, c: f"{_DIT}/blocks_{m[1]}/Dense_0/{m[2]}", "fuse_last"),
    (r"network/dit/final_modulation/dense/(kernel|bias)",
     lambda m, c: f"{_DIT}/final_layer/Dense_0/{m[1]}", "fuse_last"),
    (r"network/dit/final_dense/(kernel|bias)", lambda m, c: f"{_DIT}/final_layer/linear/{m[1]}",
     "same"),
]

# config.network -> its table (MD4 and GenMD4 share the transformer's).
TABLES: dict[str, list[Rule]] = {"transformer": TRANSFORMER, "unet": UNET, "uvit": UVIT}


# ------------------------------------------------------------ transforms ---

def _fuse_last(shape):
  return shape[:-2] + (shape[-2] * shape[-1],)


def _fuse_first(shape):
  return (shape[0] * shape[1],) + shape[2:]


def reference_shape(kind: str, ours: tuple[int, ...], ctx: Context) -> tuple[int, ...]:
  """The shape the reference stores for an md4_jax parameter of shape `ours`."""
  if kind == "vocab_rows":
    return (ctx.vocab + 1,) + ours[1:]
  if kind == "vocab_cols":
    return ours[:-1] + (ctx.vocab,)
  if kind == "fuse_last":
    return _fuse_last(ours)
  if kind == "fuse_first":
    return _fuse_first(ours)
  if kind == "conv1x1":
    return ours[2:]
  return ours


def _kind(kind, match: re.Match) -> str:
  return kind(match) if callable(kind) else kind


# ------------------------------------------------------------ the config ---

# config.network -> {option of its group: the reference's value}: the options that change
# the network's function but none of its parameters, so the tables cannot see them.
REFERENCE_FUNCTION: dict[str, dict[str, Any]] = {
    "transformer": {"sinusoid": "md4", "norm_eps": 1e-5},
    "unet": {"sinusoid": "md4"},
    "uvit": {"sinusoid": "md4", "dit_residual": False},
}
# ... and where class labels join the time embedding, when the run has them.
REFERENCE_LABEL_COND = "concat"


def _flag_value(value: Any) -> str:
  return f"{value:g}" if isinstance(value, float) else str(value)


def function_overrides(config: ml_collections.ConfigDict) -> list[str]:
  """The --config overrides that make the config's network compute the reference's
  function (REFERENCE_FUNCTION; empty for the paper configs), in the table's order."""
  group = config[config.network]
  want = dict(REFERENCE_FUNCTION.get(config.network, {}))
  if not conditioning.TIME_FEATURES.get(config.time_features, True):
    want.pop("sinusoid", None)  # No time MLP: the sinusoid is not computed.
  if config.classes > 0:
    want["label_cond"] = REFERENCE_LABEL_COND
  return [f"--config.{config.network}.{key}={_flag_value(value)}"
          for key, value in want.items() if group[key] != value]


def check_function(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the overrides `function_overrides` lists, if any."""
  overrides = function_overrides(config)
  if overrides:
    raise ValueError(
        f"The config's {config.network} computes another function than the reference's from "
        f"the same weights (md4_jax's own design); convert with {' '.join(overrides)} "
        "(see docs/convert.md).")


def context(config: ml_collections.ConfigDict) -> Context:
  """The tables' Context of the config's network.

  Raises:
    ValueError: a network without a table, or a config whose network
      computes another function than the reference's (`check_function`).
  """
  if config.network not in TABLES:
    raise ValueError(f"config.network={config.network!r} has no reference table; valid: "
                     f"{', '.join(sorted(TABLES))}.")
  check_function(config)
  group = config[config.network]
  blocks = group.depth if config.network == "transformer" else group.num_res_blocks
  embed_outside = config.network == "transformer" and group.embed_dim > 0
  cond = config.time_features != "none" or config.classes > 0
  return Context(int(blocks), bool(embed_outside), bool(cond), int(config.vocab_size))


# A parameter of nn.scan'ed transformer blocks (config.scan_layers): [depth, ...] under
# 'blocks/block', which the unscanned network holds as 'block_0' ... 'block_{depth-1}'.
_SCANNED = re.compile(r"(.*)/blocks/block/(.*)")


def per_block(ours: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
  """{path: shape} with every scanned-block parameter listed once per block, as the
  unscanned network names it (the tables' layout); other parameters as they are."""
  out = {}
  for path, shape in ours.items():
    match = _SCANNED.fullmatch(path)
    if match:
      out.update({f"{match[1]}/block_{i}/{match[2]}": tuple(shape[1:]) for i in range(shape[0])})
    else:
      out[path] = shape
  return out


def stack_blocks(flat: dict[str, np.ndarray], ours: dict[str, tuple[int, ...]]
                 ) -> dict[str, np.ndarray]:
  """The per-block arrays of `per_block(ours)`'s layout stacked back into `ours`' layout."""
  out = {}
  for path, shape in ours.items():
    match = _SCANNED.fullmatch(path)
    out[path] = (np.stack([flat[f"{match[1]}/block_{i}/{match[2]}"] for i in range(shape[0])])
                 if match else flat[path])
  return out


def _flat(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict (None and empty dicts dropped)."""
  out = {}
  if isinstance(tree, dict):
    for key, value in tree.items():
      for sub, leaf in _flat(value).items():
        out[f"{key}/{sub}" if sub else str(key)] = leaf
  elif tree is not None:
    out[""] = tree
  return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dicts."""
  return traverse_util.unflatten_dict(flat, sep="/")


def reference_names(ours: dict[str, tuple[int, ...]], table: list[Rule], ctx: Context,
                    what: str = "params") -> dict[str, tuple[str, str, tuple[int, ...]]]:
  """{md4_jax path: (reference name, transform, reference shape)} by the table.

  Raises:
    ReferenceMismatchError: an md4_jax parameter that no rule of the table maps.
  """
  out = {}
  for path in sorted(ours):
    for pattern, name_fn, kind in table:
      match = re.fullmatch(pattern, path)
      if match:
        kind = _kind(kind, match)
        out[path] = (name_fn(match, ctx), kind, reference_shape(kind, ours[path], ctx))
        break
    else:
      raise ReferenceMismatchError(
          f"{what}: md4_jax parameter {path} {ours[path]} has no counterpart in the reference's "
          "network (the config builds another architecture than the reference's)")
  return out


def map_params(reference: dict[str, Any], ours: dict[str, tuple[int, ...]], table: list[Rule],
               ctx: Context, what: str = "params") -> dict[str, np.ndarray]:
  """md4_jax parameters {path: array} from a reference parameter tree.

  Args:
    reference: the reference's nested parameter dict (numpy arrays).
    ours: {path: shape} of the md4_jax parameters the config builds.
    table: the network's rules.
    ctx: the network's Context.
    what: which tree this is, for the messages ('params', 'ema_params', 'Adam mu').

  Raises:
    ReferenceMismatchError: the first md4_jax parameter without a rule or without its
      reference array, the first reference array of another shape, or the first
      reference array no md4_jax parameter uses.
  """
  ref = {k: np.asarray(v) for k, v in _flat(reference).items()}
  out, used = {}, set()
  for path, (name, kind, want) in reference_names(ours, table, ctx, what).items():
    if name not in ref:
      raise ReferenceMismatchError(
          f"{what}: the reference checkpoint has no parameter {name} (for md4_jax's {path} "
          f"{ours[path]}): it was trained with another network or size than the config's")
    if ref[name].shape != want:
      raise ReferenceMismatchError(
          f"{what}: reference parameter {name} is {ref[name].shape}, the config's network needs "
          f"{want} (for md4_jax's {path} {ours[path]})")
    if kind in ("vocab_rows", "vocab_cols"):  # Zero rows / columns where the vocabulary pads.
      out[path] = np.pad(ref[name], [(0, o - r) for o, r in zip(ours[path], want)])
    else:
      out[path] = ref[name].reshape(ours[path])
    used.add(name)
  unused = sorted(set(ref) - used)
  if unused:
    raise ReferenceMismatchError(
        f"{what}: reference parameter {unused[0]} {ref[unused[0]].shape} has no counterpart in "
        f"the config's network ({len(unused)} unused): it was trained with another network "
        "than the config's")
  return out


# --------------------------------------------------- reading the reference ---

def find_train_state(source: str, step: Optional[int] = None) -> tuple[str, int]:
  """The reference's train_state directory in `source` and its step.

  `source` may be the reference's workdir, its checkpoints/ directory, or one step's
  directory (<step>/, holding train_state/). Without `step`, the latest step.

  Raises:
    FileNotFoundError: no reference checkpoint there.
    ValueError: `step` was not saved.
  """
  workdir_lib.check_reachable(source, "--from_reference")
  path = epath.Path(source)
  if not path.exists():
    raise FileNotFoundError(f"--from_reference={source} does not exist.")
  if (path / TRAIN_STATE).is_dir():
    if step is not None and path.name.isdigit() and int(path.name) != step:
      raise ValueError(f"--from_reference={source} is step {path.name}, not --step={step}.")
    return str(path / TRAIN_STATE), int(path.name) if path.name.isdigit() else int(step or 0)
  root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted(int(p.name) for p in root.iterdir()
                 if p.name.isdigit() and (p / TRAIN_STATE).is_dir())
  if not steps:
    raise FileNotFoundError(
        f"No reference checkpoint under {source}: expected <step>/{TRAIN_STATE}/ (the layout "
        "google-deepmind/md4 writes under <workdir>/checkpoints/).")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"No reference checkpoint at step {step} under {root}; saved steps: "
                     f"{', '.join(map(str, steps))}.")
  return str(root / str(step) / TRAIN_STATE), step


def read_train_state(path: str) -> dict[str, Any]:
  """The reference's TrainState as nested dicts/lists of numpy arrays (host memory).

  Raises:
    ValueError: not a readable orbax checkpoint, or no params in it.
  """
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    tree = getattr(metadata, "tree", metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore errors)
    message = " ".join(str(e).split())[:300]
    raise ValueError(f"{path} cannot be read as an orbax checkpoint ({type(e).__name__}: "
                     f"{message}).") from None
  if not isinstance(state, dict) or not state.get("params"):
    raise ValueError(f"{path} holds no 'params': not a reference TrainState (fields rng, step, "
                     "params, ema_params, opt_state, state).")
  return state


def adam_moments(opt_state: Any) -> Optional[tuple[Any, Any]]:
  """(mu, nu) of the first Adam state in the reference's optimiser state, or None."""
  if isinstance(opt_state, dict):
    if "mu" in opt_state and "nu" in opt_state:
      return opt_state["mu"], opt_state["nu"]
    children = list(opt_state.values())
  elif isinstance(opt_state, (list, tuple)):
    children = list(opt_state)
  else:
    return None
  for child in children:
    found = adam_moments(child)
    if found is not None:
      return found
  return None


# ------------------------------------------------------------ conversion ---

def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _filled(like: Any, flat: dict[str, np.ndarray]) -> Any:
  """`like` (placed arrays) with every leaf replaced by flat[its path], same dtype and
  sharding."""
  return jax.tree_util.tree_map_with_path(
      lambda keys, leaf: jax.device_put(np.asarray(flat[_path(keys)], leaf.dtype), leaf.sharding),
      like)


def _with_counts(opt_state: Any, step: int, mu: Any = None, nu: Any = None) -> Any:
  """The optimiser state with every step count at `step` (Adam's and the learning-rate
  schedule's) and, when given, Adam's moments."""
  def has_count(node):
    return isinstance(node, tuple) and "count" in getattr(node, "_fields", ())

  def fix(node):
    if not has_count(node):
      return node
    count = jax.device_put(jnp.full(node.count.shape, step, node.count.dtype),
                           node.count.sharding)
    node = node._replace(count=count)
    if isinstance(node, optax.ScaleByAdamState) and mu is not None:
      node = node._replace(mu=_filled(node.mu, mu), nu=_filled(node.nu, nu))
    return node
  return jax.tree.map(fix, opt_state, is_leaf=has_count)


def _state(experiment: build.Experiment, seed: int, step: int, params: dict, ema: dict,
           mu: Optional[dict], nu: Optional[dict]) -> Any:
  """The TrainState at `step` with these parameters, placed in the experiment's shardings:
  the optimiser state initialised from the parameters (moments zero) with its step counts
  at `step` and, when given, the reference's Adam moments; the run key from the seed."""
  abstract = experiment.abstract_state
  shardings = experiment.state_shardings
  placed = _filled(abstract.params, params)
  opt_state = jax.jit(experiment.optimizer.init, out_shardings=shardings.opt_state)(placed)
  rng = jax.random.key_data(jax.random.split(jax.random.key(seed), 4)[3])  # As init_state.
  return type(abstract)(
      step=jax.device_put(jnp.asarray(step, abstract.step.dtype), shardings.step),
      params=placed, ema_params=_filled(abstract.ema_params, ema),
      opt_state=_with_counts(opt_state, step, mu, nu),
      rng=jax.device_put(rng.astype(abstract.rng.dtype), shardings.rng))


def check_new_workdir(workdir: str) -> None:
  """Raises ValueError unless `workdir` is absent (with an existing parent) or empty."""
  workdir_lib.check_reachable(workdir)
  path = epath.Path(workdir)
  if path.exists():
    if not path.is_dir():
      raise ValueError(f"--workdir={workdir} is a file; give a new or empty directory.")
    if any(True for _ in path.iterdir()):
      raise ValueError(f"--workdir={workdir} is not empty; convert into a new or empty "
                       "directory (a converted run starts its own workdir).")
  elif "://" not in workdir and not path.parent.is_dir():
    raise ValueError(f"The parent of --workdir ({path.parent}) does not exist; create it or "
                     "fix --workdir.")


def convert(source: str, config: ml_collections.ConfigDict, workdir: str,
            step: Optional[int] = None, mesh: Optional[Mesh] = None) -> dict[str, Any]:
  """Converts a reference checkpoint into an md4_jax workdir for `config`.

  Nothing is written until the whole state has been mapped and checked.

  Args:
    source: the reference workdir, checkpoints/ directory or step directory.
    config: the md4_jax config whose network the reference trained.
    workdir: a new or empty directory.
    step: the reference step (default: the latest).
    mesh: the devices the state is placed on to be saved (default: the run's mesh if it
      fits here); any mesh restores it.

  Returns:
    What was converted (also written to <workdir>/converted_from.json): source, step,
    parameters, ema (from the reference or copied from params), adam_moments.

  Raises:
    ReferenceMismatchError: the checkpoint holds another network than the config's.
    ValueError, FileNotFoundError: a bad config, source, step or workdir.
  """
  validation.validate(config)
  check_new_workdir(workdir)
  ctx = context(config)
  table = TABLES[config.network]
  path, step = find_train_state(source, step)
  reference = read_train_state(path)

  experiment = build.setup(config, mesh or workdir_lib.run_mesh(config))
  ours = checkpoint_lib.array_shapes(experiment.abstract_state.params)
  blocks = per_block(ours)  # The reference's blocks are separate; scanned ones are stacked.
  convert_tree = lambda tree, what: stack_blocks(map_params(tree, blocks, table, ctx, what), ours)
  params = convert_tree(reference["params"], "params")
  ema_from_reference = bool(_flat(reference.get("ema_params")))
  ema = convert_tree(reference["ema_params"], "ema_params") if ema_from_reference else params
  moments = adam_moments(reference.get("opt_state"))
  mu = nu = None
  if moments is not None and _flat(moments[0]):
    mu = convert_tree(moments[0], "Adam mu")
    nu = convert_tree(moments[1], "Adam nu")

  state = _state(experiment, config.seed, step, params, ema, mu, nu)

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir),
                                             config.max_checkpoints_to_keep)
  try:
    checkpointer.save(step, state, config=saved_config.plain(config))
  finally:
    checkpointer.close()
  record = {"source": os.path.abspath(path) if "://" not in path else path, "step": step,
            "parameters": int(sum(np.prod(s) for s in ours.values())),
            "ema": "reference" if ema_from_reference else "copied from params",
            "adam_moments": "reference" if mu is not None else "zeros"}
  if jax.process_index() == 0:
    saved_config.save_config(config, workdir)
    (epath.Path(workdir) / RECORD_FILE).write_text(json.dumps(record, indent=2))
  return record
