"""Pure train / eval steps: `(state, batch) -> (state, metrics)`.

`experiment.build.Experiment` binds the static arguments with functools.partial and
jits them once over the mesh; nothing here knows about devices or the config.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib
from md4_jax.experiment.state import TrainState

Batch = Mapping[str, jax.Array]


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/Inf and the policy is to stop (CLI exit code 3)."""


def init_state(
    rng: jax.Array, *, model: model_lib.MaskedDiffusion,
    optimizer: optax.GradientTransformation,
    batch_size: int, with_labels: bool,
) -> TrainState:
  """Initial TrainState with params (and their EMA/optimiser twins) still boxed.

  The boxes (nn.LogicallyPartitioned) carry logical axis names for sharding;
  jit `nn.meta.unbox(init_state(...))` with out_shardings to build it in place.
  """
  k_params, k_sample, k_dropout, k_run = jax.random.split(rng, 4)
  x = jnp.zeros((batch_size,) + tuple(model.data_shape), jnp.int32)
  cond = jnp.zeros((batch_size,), jnp.int32) if with_labels else None
  variables = model.init({"params": k_params, "sample": k_sample, "dropout": k_dropout}, x, cond)
  params = variables["params"]
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
    # GenMD4 adds its score-function (RLOO) surrogate to the objective only.
    return metrics["loss"] + metrics.get("loss_score", 0.0), metrics
  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, metrics


LABEL_DROPOUT_SALT = 7  # The label-dropout coins: fold_in(step key, salt).


def drop_labels(cond: jax.Array, rate: float, null_label: int, rng: jax.Array) -> jax.Array:
  """Each label replaced by `null_label` with probability `rate` (classifier-free guidance)."""
  return jnp.where(jax.random.uniform(rng, cond.shape) < rate, null_label, cond)


def compute_grads(model: model_lib.MaskedDiffusion, params, batch: Batch, rng: jax.Array,
                  accum_steps: int = 1, label_dropout: float = 0.0):
  """Mean gradient and metrics of the NELBO over the batch.

  Times and mask noise are drawn for the whole batch first (antithetic across
  the full batch), so splitting into `accum_steps` microbatches gives the same
  gradient as one big batch (up to float summation order). A model with
  masked_head interleaves the antithetic strata over the accum_steps ×
  head_groups packed groups (MD4.time_groups), so each one sees times spread
  over (0, 1]: the same times, given to the examples in another order. With
  `label_dropout` > 0 each label becomes the null label (the network's
  "no label" row, id = classes) with that probability, so one network learns
  both p(x | c) and p(x) for classifier-free guidance.
  """
  x = batch["x"]
  cond = batch.get("label")
  if cond is not None and label_dropout > 0:
    cond = drop_labels(cond, label_dropout, model.network.num_classes,
                       jax.random.fold_in(rng, LABEL_DROPOUT_SALT))
  batch_size = x.shape[0]
  k_draw, k_drop = jax.random.split(rng)
  t, noise = losses.draw_times_and_noise(k_draw, x.shape, model.antithetic_time_sampling,
                                         model.masks_per_example, model.time_groups(accum_steps))
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


def all_finite(tree) -> jax.Array:
  """bool scalar: every element of every floating-point leaf of `tree` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.bool_(True)


def ema_decay(ema_rate: float, step: Any, warmup: bool) -> Any:
  """The EMA decay at `step` (0-based): ema_rate, or with warm-up min(ema_rate, (1+n)/(10+n)),
  so that an early EMA averages the steps taken so far instead of the initialisation."""
  if not warmup:
    return ema_rate
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_rate, (1.0 + n) / (10.0 + n))


def headline_params(ema_rate: float, warmup: bool, steps_taken: int) -> tuple[str, str]:
  """Which parameters stand for the model after `steps_taken` steps, and why.

  The EMA, unless its horizon 1/(1 − ema_rate) exceeds the steps taken without
  warm-up: then it is still mostly the initialisation, and the raw parameters
  are the model.
  """
  if ema_rate <= 0:
    return "ema", "the EMA equals the parameters (ema_rate 0)"
  if warmup:
    return "ema", "EMA with warm-up"
  horizon = round(1.0 / (1.0 - ema_rate), 6)  # 0.9999 -> 10000, not 10000.000000000002.
  if steps_taken < horizon:
    return "raw", (f"the EMA's horizon 1/(1 - {ema_rate:g}) = {horizon:.0f} steps exceeds the "
                   f"{steps_taken} steps taken")
  return "ema", f"the EMA's horizon {horizon:.0f} steps is within the {steps_taken} steps taken"


def train_step(
    state: TrainState, batch: Batch, *, model: model_lib.MaskedDiffusion,
    optimizer: optax.GradientTransformation, lr_schedule: Callable[[Any], Any],
    ema_rate: float, accum_steps: int = 1, skip_nonfinite: bool = False,
    debug_nan_at_step: int = -1, label_dropout: float = 0.0, ema_warmup: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step with EMA update. Returns the new state and metrics.

  Args:
    skip_nonfinite: if the loss, the gradient norm or any new parameter, EMA
      or optimiser-state value is not finite, keep the old params / EMA /
      optimiser state (the step counter still advances). metrics['finite']
      reports it either way.
    debug_nan_at_step: poison the loss and gradients with NaN at this step
      (for testing the guard; -1 = never).
    label_dropout: probability of training on the null label instead of the
      example's (classifier-free guidance; see compute_grads).
    ema_warmup: EMA decay min(ema_rate, (1+n)/(10+n)) at step n (`ema_decay`).
  """
  grads, metrics = compute_grads(model, state.params, batch, state.step_key(), accum_steps,
                                 label_dropout)
  if debug_nan_at_step >= 0:
    poison = jnp.where(state.step == debug_nan_at_step, jnp.nan, 1.0)
    grads = jax.tree.map(lambda g: g * poison, grads)
    metrics = dict(metrics, loss=metrics["loss"] * poison)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(ema_rate, state.step, ema_warmup)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  new = (params, ema_params, opt_state)
  # The whole update must be finite, not only the loss: a NaN in the optimiser
  # state (overflow, a bad restore) would otherwise be applied and checkpointed.
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & all_finite(new)
  if skip_nonfinite:
    old = (state.params, state.ema_params, state.opt_state)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step),
                 finite=finite)
  params, ema_params, opt_state = new
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                       opt_state=opt_state), metrics


def eval_step(params, batch: Batch, rng: jax.Array, *, model: model_lib.MaskedDiffusion,
              num_t_samples: int = 1) -> dict[str, jax.Array]:
  """Per-example NELBO estimates, each averaged over K stratified times.

  Every example gets its own grid t_k = (k + 1 − u_k)/K, u_k ~ U[0, 1) i.i.d.
  (losses.stratified_times), with fresh mask noise for each k: unbiased, with at most 1/K of the variance
  of one draw. Examples draw independently, so the spread of the per-example
  estimates gives an honest standard error of the split mean.

  Args:
    params: network parameters.
    batch: 'x' [B, ...], 'weight' [B] (0 = padding), optional 'label' [B].
    rng: key.
    model: the MD4 or GenMD4 module.
    num_t_samples: K.

  Returns:
    float32 [B] arrays: loss, loss_diff, loss_recon, loss_prior (nats per
    example, mean over the K times) and weight.
  """
  x = batch["x"]
  cond = batch.get("label")
  k_t, k_noise = jax.random.split(rng)
  t_KxB = losses.stratified_times(k_t, num_t_samples, x.shape[0])

  def one_time(carry, inputs):  # A scan keeps memory at one forward pass.
    t_B, key = inputs
    terms = model.apply({"params": params}, x, cond, False, t_B, jax.random.uniform(key, x.shape),
                        method="nelbo")
    return carry, {k: terms[k] for k in ("loss", "loss_diff", "loss_recon", "loss_prior")}

  _, terms_KxB = jax.lax.scan(one_time, None, (t_KxB, jax.random.split(k_noise, num_t_samples)))
  out = {k: jnp.mean(v, axis=0) for k, v in terms_KxB.items()}
  out["weight"] = batch["weight"].astype(jnp.float32)
  return out
