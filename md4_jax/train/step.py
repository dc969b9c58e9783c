"""Pure train / eval steps: `(state, batch) -> (state, metrics)`.

The loop binds the static arguments with functools.partial and jits them once
over the mesh; nothing here knows about devices or the config.
"""

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib
from md4_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


def init_state(
    rng: jax.Array, *, model: model_lib.MD4, optimizer: optax.GradientTransformation,
    batch_size: int, with_labels: bool,
) -> TrainState:
  """Initial TrainState; jit it with out_shardings to build it in place."""
  k_params, k_sample, k_dropout, k_run = jax.random.split(rng, 4)
  x = jnp.zeros((batch_size,) + tuple(model.data_shape), jnp.int32)
  cond = jnp.zeros((batch_size,), jnp.int32) if with_labels else None
  variables = model.init({"params": k_params, "sample": k_sample, "dropout": k_dropout}, x, cond)
  params = nn.meta.unbox(variables["params"])
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.array, params),
      opt_state=optimizer.init(params),
      rng=jax.random.key_data(k_run),
  )


def _loss_and_grads(model, params, x, cond, t, noise, dropout_key):
  def loss_fn(p):
    metrics = model.apply({"params": p}, x, cond, train=True, t=t, noise=noise,
                          rngs={"dropout": dropout_key})
    return metrics["loss"], metrics
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, metrics


def compute_grads(model: model_lib.MD4, params, batch: Batch, rng: jax.Array, accum_steps: int = 1):
  """Mean gradient and metrics of the NELBO over the batch.

  Times and mask noise are drawn for the whole batch first (antithetic across
  the full batch), so splitting into `accum_steps` microbatches gives the same
  gradient as one big batch (up to float summation order).
  """
  x = batch["x"]
  cond = batch.get("label")
  batch_size = x.shape[0]
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  t = losses.sample_times(k_t, batch_size, model.antithetic_time_sampling)
  noise = jax.random.uniform(k_noise, x.shape)
  if accum_steps == 1:
    return _loss_and_grads(model, params, x, cond, t, noise, k_drop)
  if batch_size % accum_steps:
    raise ValueError(f"Batch {batch_size} is not divisible by grad_accum_steps={accum_steps}.")
  micro = lambda a: None if a is None else a.reshape((accum_steps, -1) + a.shape[1:])
  xs = (micro(x), micro(cond), micro(t), micro(noise), jax.random.split(k_drop, accum_steps))

  def body(grad_sum, inputs):
    grads, metrics = _loss_and_grads(model, params, *inputs)
    return jax.tree.map(jnp.add, grad_sum, grads), metrics

  grad_sum, metrics = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), xs)
  return jax.tree.map(lambda g: g / accum_steps, grad_sum), jax.tree.map(jnp.mean, metrics)


def train_step(
    state: TrainState, batch: Batch, *, model: model_lib.MD4,
    optimizer: optax.GradientTransformation, lr_schedule: Callable[[Any], Any],
    ema_rate: float, accum_steps: int = 1, skip_nonfinite: bool = False,
    debug_nan_at_step: int = -1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step with EMA update. Returns the new state and metrics.

  Args:
    skip_nonfinite: if the loss or the gradient norm is not finite, keep the
      old params / EMA / optimiser state (the step counter still advances).
      metrics['finite'] reports it either way.
    debug_nan_at_step: poison the loss and gradients with NaN at this step
      (for testing the guard; -1 = never).
  """
  grads, metrics = compute_grads(model, state.params, batch, state.step_key(), accum_steps)
  if debug_nan_at_step >= 0:
    poison = jnp.where(state.step == debug_nan_at_step, jnp.nan, 1.0)
    grads = jax.tree.map(lambda g: g * poison, grads)
    metrics = dict(metrics, loss=metrics["loss"] * poison)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params)
  new = (params, ema_params, opt_state)
  if skip_nonfinite:
    old = (state.params, state.ema_params, state.opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                 finite=finite)
  params, ema_params, opt_state = new
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state), metrics


def eval_step(params, batch: Batch, rng: jax.Array, *, model: model_lib.MD4) -> dict[str, jax.Array]:
  """Weighted sums of the per-example NELBO terms (padding has weight 0).

  Returns:
    dict of float32 scalars: sum_loss, sum_loss_diff, sum_loss_recon, sum_weight.
  """
  terms = model.apply({"params": params}, batch["x"], batch.get("label"), False,
                      method=model_lib.MD4.nelbo, rngs={"sample": rng})
  w = batch["weight"].astype(jnp.float32)
  # Padding rows may hold anything; zero them without letting a NaN through.
  out = {f"sum_{k}": jnp.sum(jnp.where(w > 0, v, 0.0) * w) for k, v in terms.items() if k != "loss_prior"}
  out["sum_weight"] = jnp.sum(w)
  return out
