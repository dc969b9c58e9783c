"""One place that checks a config's values and names before anything is built or written.

`validate(config)` checks ranges here and asks each registry about its own
part: the networks (`networks.check_config`), the model (`build.check_model`),
the sampling grid and the dataset record. The training loop calls it first;
`md4_jax.sample` / `evaluate` restore configs that passed it at training time.
"""

import math

import ml_collections
from absl import logging

from md4_jax import data as data_lib
from md4_jax import networks
from md4_jax.networks import head as head_lib
from md4_jax.diffusion import sampling
from md4_jax.experiment import build

# Network sizes where 0 means "the default width".
OPTIONAL_SIZES = frozenset({"cond_dim", "embed_dim"})


def _check(ok: bool, field: str, value, rule: str) -> None:
  if not ok:
    raise ValueError(f"config.{field}={value!r} is out of range: it must be {rule}.")


DTYPES = ("float32", "bfloat16")


def validate(config: ml_collections.ConfigDict) -> None:
  """Range checks of the config's values, before anything is built or written.

  Raises:
    ValueError: the first field out of range, with the rule it breaks.
  """
  for field in ("dtype", "param_dtype"):
    # float16 has no loss scaling here: its gradients underflow. bfloat16 has float32's range.
    _check(config[field] in DTYPES, field, config[field], f"one of {DTYPES} (float16 needs loss "
           "scaling, which md4_jax does not do; use bfloat16)")
  for field in ("num_train_steps", "batch_size", "eval_batch_size", "grad_accum_steps",
                "timesteps", "sampling_steps", "max_checkpoints_to_keep", "vocab_size"):
    _check(int(config[field]) >= 1, field, config[field], ">= 1")
  for field in ("log_loss_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "sample_every_steps", "num_samples", "warmup_steps", "grain_worker_count",
                "grain_prefetch"):
    _check(int(config[field]) >= 0, field, config[field], ">= 0 (0 = only at the end / off)")
  _check(config.learning_rate > 0, "learning_rate", config.learning_rate, "> 0")
  _check(config.weight_decay >= 0, "weight_decay", config.weight_decay, ">= 0")
  for field in ("b1", "b2", "ema_rate", "dropout_rate"):
    _check(0 <= config[field] < 1, field, config[field], "in [0, 1)")
  _check(len(config.data_shape) >= 1 and all(int(d) >= 1 for d in config.data_shape),
         "data_shape", tuple(config.data_shape), "a non-empty tuple of sizes >= 1")
  _check(config.classes >= 0, "classes", config.classes, ">= 0")
  _check(0 <= config.label_dropout < 1, "label_dropout", config.label_dropout, "in [0, 1)")
  if config.label_dropout > 0 and config.classes == 0:
    raise ValueError("config.label_dropout drops class labels: it needs config.classes > 0.")
  _check(config.loss_chunk_size >= 0, "loss_chunk_size", config.loss_chunk_size,
         ">= 0 (0 = plain)")
  for group in (g for g in networks.NETWORKS if g in config):
    for field, value in config[group].items():
      sizes = value if isinstance(value, (tuple, list)) else (value,)
      if any(isinstance(v, (bool, str)) for v in sizes):
        continue  # Choices: networks.check_config.
      if field in OPTIONAL_SIZES:  # 0 = the default width.
        _check(all(v >= 0 for v in sizes), f"{group}.{field}", value, ">= 0 (0 = default)")
      elif field != "attn_resolutions":  # attn_resolutions may be empty.
        _check(len(sizes) >= 1 and all(v > 0 for v in sizes), f"{group}.{field}", value,
               "> 0")
  networks.check_config(config)
  _warn_unsplit_vocabulary(config)
  if config.sampling_grid not in sampling.GRIDS:
    raise ValueError(f"Unknown sampling_grid {config.sampling_grid!r}; valid: "
                     f"{sorted(sampling.GRIDS)}.")
  if config.nan_policy not in ("stop", "skip"):
    raise ValueError(f"Unknown nan_policy {config.nan_policy!r}; valid: 'stop', 'skip'.")
  build.check_model(config)
  info = data_lib.get_info(config.dataset)
  if info.eval_only:
    raise ValueError(
        f"Dataset {config.dataset!r} is an evaluation set: train on openwebtext (or "
        f"fineweb_edu) and score it with `python -m md4_jax.evaluate --workdir=RUN "
        f"--zero_shot={config.dataset}`.")


def _warn_unsplit_vocabulary(config: ml_collections.ConfigDict) -> None:
  """A warning when mesh.tensor > 1 cannot split the transformer's head or embedding."""
  tensor = int(config.mesh.get("tensor", 1))
  if config.network != "transformer" or tensor <= 1:
    return
  multiple = int(config.transformer.vocab_multiple)
  whole = [f"{what} ({n})" for what, n in (
      ("the head's columns", head_lib.padded(config.vocab_size, multiple)),
      ("the embedding's rows", head_lib.padded(config.vocab_size + 1, multiple))) if n % tensor]
  if whole:
    logging.warning(
        "mesh.tensor=%d does not divide %s: they stay whole on every chip. "
        "--config.transformer.vocab_multiple=%d pads them so they split (a new run only: it "
        "changes the parameters' shapes).", tensor, " or ".join(whole), math.lcm(128, tensor))
