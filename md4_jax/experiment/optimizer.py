"""Optimiser and learning-rate schedule from the config."""

import jax
import optax


def build_lr_schedule(config) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to 0 (or constant)."""
  warmup = max(int(config.warmup_steps), 0)
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.num_train_steps, warmup + 1), end_value=0.0)
  if config.lr_schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
         optax.constant_schedule(config.learning_rate)], [warmup])
  raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; valid: 'cosine', 'constant'.")


# Parameters that are not network weights: no weight decay (GenMD4's schedule
# exponents would otherwise be pulled towards softplus(0) = 0.69).
NO_DECAY = ("w_raw",)


def _decay_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY, params)


def build_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with optional global-norm clipping. Returns (optimizer, lr schedule).

  GenMD4 (config.model='genmd4') masks the weight decay off its schedule
  parameters; MD4 keeps the unmasked AdamW (and its optimiser-state layout).
  """
  lr = build_lr_schedule(config)
  parts = []
  if config.clip_grad_norm and config.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_grad_norm))
  mask = _decay_mask if config.model == "genmd4" else None
  parts.append(optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                           mask=mask))
  return optax.chain(*parts), lr
