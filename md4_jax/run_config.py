"""The config a run was started with, and what may change when it resumes.

The first start writes `<workdir>/config.json`. A restart compares the new
config against it: keys that change the model, the data or the optimisation
are refused (start a new workdir instead); the keys in SAFE_KEYS (frequencies,
run length, logging, devices, and the memory/speed knobs that tests/perf_test.py
and tests/train_test.py prove numerically equivalent without changing the
checkpoint's layout) may change when the caller allows it explicitly.
"""

import json
from typing import Any

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"

# Keys that do not change what is being trained; dotted for nested fields.
SAFE_KEYS = frozenset({
    "num_train_steps", "log_loss_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "max_checkpoints_to_keep", "sample_every_steps", "num_samples", "sampling_steps",
    "eval_batch_size", "eval_split", "grain_worker_count", "grain_prefetch", "data_dir", "check_nans",
    "nan_policy", "debug_nan_at_step", "mesh.data", "mesh.fsdp", "mesh.tensor", "sharding_rules",
    # Same loss and gradients, same parameter layout (scan_layers changes the layout).
    "remat_policy", "attention_impl", "loss_chunk_size", "grad_accum_steps",
})


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
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


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was started with."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"No {CONFIG_FILE} in {workdir!r}: not an md4_jax workdir (train first with "
        f"`python -m md4_jax.main --config=configs/digits.py --workdir={workdir}`).")
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  (epath.Path(workdir) / CONFIG_FILE).write_text(json.dumps(_plain(config), indent=2, sort_keys=True))


def differences(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{dotted key: (saved value, new value)} for every key that differs."""
  old, cur = _flatten(_plain(saved)), _flatten(_plain(new))
  return {k: (old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur)) if old.get(k) != cur.get(k)}


def check_resume(workdir: str, config: ml_collections.ConfigDict, allow_safe_changes: bool) -> dict:
  """Raises ValueError if `config` may not resume the run in `workdir`.

  Returns:
    The (allowed) differences, empty for a first start or an identical config.
  """
  if not (epath.Path(workdir) / CONFIG_FILE).exists():
    return {}
  diffs = differences(load_config(workdir), config)
  describe = lambda keys: ", ".join(f"{k}: {diffs[k][0]!r} -> {diffs[k][1]!r}" for k in keys)
  unsafe = [k for k in diffs if k not in SAFE_KEYS]
  if unsafe:
    raise ValueError(
        f"Refusing to resume {workdir}: the config changes {describe(unsafe)} (model/data/"
        "optimisation keys). Use a new --workdir, or restore the original values.")
  if diffs and not allow_safe_changes:
    raise ValueError(
        f"The config differs from the run in {workdir}: {describe(diffs)}. These keys are safe to "
        "change; pass --allow_config_change to resume with them.")
  return diffs
