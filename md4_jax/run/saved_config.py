"""The config a run was started with, and what may change when it resumes.

The first start writes `<workdir>/config.json`. A restart compares the new
config against it: keys that change the model, the data or the optimisation
are refused (start a new workdir instead); the keys in SAFE_KEYS (frequencies,
run length, logging, devices, and the memory/speed knobs that tests/perf_test.py
and tests/train_test.py prove numerically equivalent without changing the
checkpoint's layout) may change when the caller allows it explicitly.

A config saved before a key existed lacks it: `config_from_dict` fills it in from
configs/base.py (or from LEGACY_VALUES where old runs did something else), so old
runs restore and resume. docs/configs.md says how to add a key.
"""

import json
from typing import Any, Optional

import ml_collections
from etils import epath

from md4_jax.configs import base


CONFIG_FILE = "config.json"

# Keys that do not change what is being trained; dotted for nested fields.
SAFE_KEYS = frozenset({
    "num_train_steps", "log_loss_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "sample_every_steps", "num_samples", "sampling_steps",
    "sampling_grid",
    "eval_batch_size", "eval_split", "grain_worker_count", "grain_prefetch", "data_dir", "check_nans",
    "nan_policy", "debug_nan_at_step", "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.dcn_data", "sharding_rules",
    # Same loss and gradients, same parameter layout (scan_layers changes the layout).
    "remat_policy", "attention_impl", "loss_chunk_size", "grad_accum_steps",
    # Same loss and gradients given the times; over several batch shards or microbatches it
    # hands the batch's antithetic times to the examples in another order (the same law).
    "masked_head",
    # How checkpoints are written and what is traced, not what is trained.
    "async_checkpointing", "profile_steps", "profile_start_step",
})


def plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as JSON-compatible data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _tuples(value):
  """JSON turned tuples into lists; configs use tuples for shapes."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


# ------------------------------------------------------------------ schema ---
# A key added to configs/base.py after runs were saved is missing from their configs;
# `config_from_dict` fills it from base.get_config() by itself (nested groups too). When
# you add a key, say what runs saved without it did (tests/saved_config_test.py fails
# until you do): list it in DEFAULTED_KEYS if the new base default reproduces them, or
# give LEGACY_VALUES the value that does. Keys already in the oldest supported saved
# config (tests/data/workdir_cea09dd_digits_tiny) need neither.

# Dotted keys whose base default is what runs saved without them did (a run saved
# without 'model' is an MD4 run, one without 'time_embedding' used the DiT MLP). The
# keys added before the oldest supported release are listed too, for older runs. Changing
# the base default of a key listed here changes how such runs read: move the key to
# LEGACY_VALUES with its old value first.
DEFAULTED_KEYS = frozenset({
    "model", "power_init", "genmd4_t1", "genmd4_num_masks", "label_dropout", "ema_warmup",
    "time_embedding", "sampling_grid", "masked_head", "mesh.dcn_data",
    "async_checkpointing", "profile_steps", "profile_start_step",
    "transformer.cond_dim", "transformer.cond_act", "transformer.mlp",
    "transformer.mlp_multiple_of", "transformer.positions", "transformer.embed_dim",
    "transformer.head_bias", "transformer.zero_init_head", "transformer.vocab_multiple",
    "unet.cond_dim", "unet.film", "unet.zero_init_output",
    "uvit.channels", "uvit.num_res_blocks", "uvit.embed_dim", "uvit.patch_size", "uvit.width",
    "uvit.depth", "uvit.num_heads", "uvit.mlp_ratio", "uvit.cond_dim",
    # md4_jax's own function, init and dropout: what every run saved before these keys did.
    "transformer.sinusoid", "transformer.label_cond", "transformer.norm_eps",
    "transformer.dropout", "transformer.param_init",
    "unet.sinusoid", "unet.label_cond", "unet.attn_bias", "unet.param_init",
    "uvit.sinusoid", "uvit.label_cond", "uvit.dit_residual", "uvit.dropout", "uvit.param_init",
})

# {dotted key: value} for keys whose old runs did something other than today's base
# default (e.g. if base.get_config() switched time_embedding to 'md4', runs saved before
# the key existed would need 'dit' here). A value here wins over base's. None so far.
LEGACY_VALUES: dict[str, Any] = {}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
  """{'a.b': v} -> {'a': {'b': v}}."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *groups, leaf = key.split(".")
    node = tree
    for group in groups:
      node = node.setdefault(group, {})
    node[leaf] = value
  return tree


def _with_defaults(tree: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """`tree` with every key of `defaults` it lacks filled in (nested dicts merged)."""
  out = dict(tree)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], value)
  return out


def config_from_dict(tree: dict[str, Any]) -> ml_collections.ConfigDict:
  """A ConfigDict from `plain`'s output: lists back to tuples, and the keys it lacks
  filled in from LEGACY_VALUES, then from configs/base.py's get_config()."""
  filled = _with_defaults(_with_defaults(tree, _nest(LEGACY_VALUES)), plain(base.get_config()))
  return ml_collections.ConfigDict(_tuples(filled))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of the run in `workdir` (its readable copy; checkpoints hold the truth)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in {workdir!r}: not an md4_jax workdir (train first with "
        f"`python -m md4_jax.train --config=configs/digits.py --workdir={workdir}`).")
  try:
    return config_from_dict(json.loads(path.read_text()))
  except ValueError as e:
    raise ValueError(f"{path} is not a readable config ({e}).") from None


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  (epath.Path(workdir) / CONFIG_FILE).write_text(json.dumps(plain(config), indent=2, sort_keys=True))


def differences(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{dotted key: (saved value, new value)} for every key that differs."""
  old, cur = _flatten(plain(saved)), _flatten(plain(new))
  return {k: (old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)}


def check_resume(saved: Optional[ml_collections.ConfigDict], config: ml_collections.ConfigDict,
                 allow_safe_changes: bool, where: str) -> dict:
  """Raises ValueError if `config` may not resume the run whose config is `saved`.

  Args:
    saved: the config the run was started with (from its checkpoints, else its
      config.json); None for a first start.
    config: the config now.
    allow_safe_changes: --allow_config_change.
    where: the workdir, for messages.

  Returns:
    The (allowed) differences, empty for a first start or an identical config.
  """
  if saved is None:
    return {}
  diffs = differences(saved, config)
  describe = lambda keys: ", ".join(f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in keys)
  unsafe = [k for k in diffs if k not in SAFE_KEYS]
  if unsafe:
    raise ValueError(
        f"Refusing to resume {where}: the config changes {describe(unsafe)} (model/data/"
        "optimisation keys). Use a new --workdir, or restore the original values.")
  if diffs and not allow_safe_changes:
    raise ValueError(
        f"The config differs from the run in {where}: {describe(diffs)}. These keys are safe to "
        "change; pass --allow_config_change to resume with them.")
  return diffs
