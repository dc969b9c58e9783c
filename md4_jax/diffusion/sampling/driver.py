"""`sample`: runs any registered sampler from all-mask (or a partially masked z) to data.

Jit-compatible (`lax.fori_loop` / `lax.while_loop` inside the chains). Nothing
here knows about devices: `experiment.build.Experiment.sampler` jits it
batch-sharded over a mesh. Shapes: B batch, D positions of one example (the
flattened data_shape), V vocabulary; the mask id is V.
"""

import dataclasses
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion.sampling import base
from md4_jax.diffusion.sampling import draws
from md4_jax.diffusion.sampling import registry

SamplerLike = Union[str, base.Sampler]  # A registered name, or a configured entry.
_SHARED = tuple(f.name for f in dataclasses.fields(base.SamplerOptions))


def configure(sampler: str, **fields: Any) -> tuple[base.Sampler, base.SamplerOptions]:
  """(the sampler with its own fields set, the shared options) from one set of keywords.

  E.g. configure('remdm', eta=0.02, cache=False): eta goes to the ReMDM entry,
  cache to `SamplerOptions`.

  Raises:
    ValueError: an unknown sampler, or a field neither shared nor the sampler's.
  """
  entry = registry.get(sampler)
  own = {f.name for f in dataclasses.fields(entry)}
  unknown = sorted(set(fields) - own - set(_SHARED))
  if unknown:
    raise ValueError(f"Unknown options {unknown} for sampler {entry.name!r}; valid: "
                     f"{sorted(own | set(_SHARED))}.")
  options = base.SamplerOptions(**{k: v for k, v in fields.items() if k in _SHARED})
  return dataclasses.replace(entry, **{k: v for k, v in fields.items() if k in own}), options


# (1 + w)·log p(x|c) − w·log p(x|∅): beyond this w the difference of two huge float32 numbers
# carries no information (and 1e38 overflows to inf).
MAX_GUIDANCE = 1e4


def check_arguments(sampler: SamplerLike, steps: Optional[int], grid: str,
                    options: base.SamplerOptions, t_start: float = 1.0, frames: int = 0) -> None:
  """Raises ValueError for arguments `sample` cannot run with (before any tracing)."""
  spec = registry.get(sampler)
  if spec.on_grid:
    if steps is None or int(steps) < 1:
      raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if grid not in base.GRIDS:
      raise ValueError(f"Unknown time grid {grid!r}; valid: {base.GRIDS}.")
  if not spec.caches and options.cache:
    raise ValueError(f"Idle-step caching does not apply to {spec.name!r} (the network runs at "
                     "every step): pass SamplerOptions(cache=False) (CLI: leave --cache unset).")
  spec.check(t_start)
  if options.temperature == 0 and not spec.argmax_at_zero_temperature:
    argmax = sorted(n for n, s in registry.SAMPLERS.items() if s.argmax_at_zero_temperature)
    raise ValueError(f"temperature 0 (argmax tokens) is for {argmax}; {spec.name!r} needs "
                     "temperature > 0.")
  if not 0 <= options.temperature < math.inf:
    raise ValueError(f"temperature must be a finite number > 0 (or 0 for argmax tokens), got "
                     f"{options.temperature}.")
  if not 0 <= options.guidance <= MAX_GUIDANCE:
    raise ValueError(f"guidance must be a finite weight in [0, {MAX_GUIDANCE:g}], got "
                     f"{options.guidance} (larger weights cancel or overflow float32 logits; "
                     "useful values are about 0.1 to 10).")
  if not 0 < t_start <= 1:
    raise ValueError(f"t_start must lie in (0, 1], got {t_start}.")
  if frames < 0 or frames == 1:
    raise ValueError(f"frames must be 0 (none) or >= 2, got {frames}.")


def check_model(model: model_lib.MD4, sampler: SamplerLike) -> None:
  """Raises ValueError for a sampler the model's schedule does not support."""
  spec = registry.get(sampler)
  if model.per_token_schedule and not spec.per_token:
    working = sorted(name for name, s in registry.SAMPLERS.items() if s.per_token)
    raise ValueError(f"Sampler {spec.name!r} is not exact for GenMD4 (a schedule per token: the "
                     f"time of the next reveal depends on the predictions); use one of "
                     f"{working}.")


def masked_input(tokens: jax.Array, fixed: jax.Array, mask_id: int) -> jax.Array:
  """tokens where `fixed` is True, the mask id elsewhere (positions to generate)."""
  return jnp.where(jnp.asarray(fixed, bool), jnp.asarray(tokens, jnp.int32), mask_id)


def all_masked(model: model_lib.MD4, batch_size: int) -> jax.Array:
  """int32 [B, *data_shape] filled with the mask id."""
  return jnp.full((batch_size,) + tuple(model.data_shape), model.mask_id, jnp.int32)


def class_labels(num_classes: int, batch_size: int, label: Optional[int] = None,
                 offset: int = 0) -> Optional[jax.Array]:
  """Labels to sample a class-conditional model with; None if unconditional.

  Args:
    num_classes: the model's classes (0 = unconditional).
    batch_size: B.
    label: one label for every sample, or None for offset, offset + 1, ...
      (mod num_classes), i.e. the classes in turn.
    offset: index of the first sample (for labels that continue across batches).

  Returns:
    int32 [B] or None.

  Raises:
    ValueError: a label given for an unconditional model, or out of range.
  """
  if label is None:
    if num_classes <= 0:
      return None
    return (offset + jnp.arange(batch_size, dtype=jnp.int32)) % num_classes
  if not 0 <= label < max(num_classes, 0):
    raise ValueError(f"label {label} needs a class-conditional model with label < classes "
                     f"(this one has classes={num_classes}).")
  return jnp.full((batch_size,), label, jnp.int32)


def sample(
    model: model_lib.MD4, variables, rng: jax.Array, *, batch_size: Optional[int] = None,
    z_init: Optional[jax.Array] = None, fixed: Optional[jax.Array] = None,
    cond: Optional[jax.Array] = None, steps: Optional[int], sampler: SamplerLike = "ancestral",
    grid: str = "uniform", options: base.SamplerOptions = base.SamplerOptions(),
    t_start: float = 1.0, frames: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs the reverse chain. Jit-compatible (every argument after rng is static
  except z_init, fixed and cond).

  Args:
    model: the MD4 module (network, schedule, V, data_shape).
    variables: its variables, e.g. {'params': state.ema_params}.
    rng: key; example b draws from fold_in(rng, b).
    batch_size: B when starting from all-mask.
    z_init: int [B, *data_shape] start: positions equal to the mask id are
      generated, the others are kept fixed (prefix, infilling, inpainting).
    fixed: optional bool [B, *data_shape]: with it, z_init's values where it is
      False are ignored and generated.
    cond: optional int [B] class labels.
    steps: grid steps N (samplers `on_grid`); ignored by the others, e.g.
      first_hitting, which makes one call per masked position (pass None).
    sampler: a registered name (its default options) or a configured entry,
      e.g. `remdm.ReMDM(eta=0.02)` (see `configure`).
    grid: 'uniform' (t_i = i/N) or 'cosine' (t_i = cos(π/2·(1 − i/N))).
    options: the shared options: temperature, exact draws, idle-step
      skipping, guidance.
    t_start: the time z_init is at (1 = all-mask prior; < 1 to reconstruct an
      input masked to level t_start, see `reconstruct`); the grid is scaled
      to [0, t_start].
    frames: K ≥ 2 records the trajectory: K states at τ_k = t_start·(1 − k/(K−1)),
      from z_init (k = 0) to the final tokens (k = K−1).

  Returns:
    tokens: int32 [B, *data_shape], no mask left, fixed positions unchanged.
    stats: 'nfe': int32 scalar, network calls on the batch; every call
      evaluates all B examples once, so it is also the NFE per sample
      (N for GenMD4, which calls the network at every step).
      'frames': int32 [K, B, *data_shape] when frames > 0.
  """
  check_arguments(sampler, steps, grid, options, t_start, frames)
  check_model(model, sampler)
  spec = registry.get(sampler)
  null_label = getattr(model.network, "num_classes", 0)
  if options.guidance and (cond is None or null_label == 0):
    raise ValueError("guidance needs a class-conditional model (trained with "
                     "config.label_dropout > 0) and class labels (cond).")
  if z_init is None:
    if batch_size is None:
      raise ValueError("Pass batch_size or z_init.")
    z_init = all_masked(model, batch_size)
  z_init = jnp.asarray(z_init, jnp.int32)
  if fixed is not None:
    z_init = masked_input(z_init, fixed, model.mask_id)
  data_shape = tuple(model.data_shape)
  if z_init.shape[1:] != data_shape:
    raise ValueError(f"z_init has example shape {z_init.shape[1:]}, the model expects "
                     f"{data_shape}.")
  batch = z_init.shape[0]
  z = z_init.reshape(batch, -1)

  def predict(z_BxD, t_B):
    z_in = z_BxD.reshape((batch,) + data_shape)
    if options.guidance:  # Conditional and unconditional halves in one call.
      both = model.apply(variables, jnp.concatenate([z_in, z_in]), jnp.concatenate([t_B, t_B]),
                         jnp.concatenate([cond, jnp.full_like(cond, null_label)]),
                         method="predict")
      logits = draws.guided_logits(both[:batch], both[batch:], options.guidance)
    else:
      logits = model.apply(variables, z_in, t_B, cond, method="predict")
    return logits.reshape(batch, z_BxD.shape[1], -1)

  frame_times = None
  trajectory = None
  if frames:
    frame_times = t_start * (1.0 - jnp.arange(frames, dtype=jnp.float32) / (frames - 1))
    trajectory = jnp.broadcast_to(z[None], (frames,) + z.shape)
  ts = base.time_grid(grid, int(steps)) * t_start if spec.on_grid else None
  chain = base.Chain(predict=predict, model=model, variables=variables,
                     keys_B=base.example_keys(rng, batch), options=options, sampler=spec, ts=ts,
                     t_start=t_start, frame_times_K=frame_times)
  z, nfe, trajectory = spec.run(chain, z, trajectory)
  stats = {"nfe": nfe}
  if frames:
    stats["frames"] = trajectory.reshape((frames, batch) + data_shape)
  return z.reshape((batch,) + data_shape), stats


def reconstruct(
    model: model_lib.MD4, variables, rng: jax.Array, x: jax.Array, t: float, *,
    steps: Optional[int], cond: Optional[jax.Array] = None, sampler: SamplerLike = "ancestral",
    grid: str = "uniform", options: base.SamplerOptions = base.SamplerOptions(), frames: int = 0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Masks clean x to level t (q(z_t | x)) and runs the reverse chain from t.

  Args:
    x: int [B, *data_shape] clean tokens.
    t: the masking level in (0, 1]: each position is masked w.p. 1 − α(t)
      (1 − α_t^{x_n} for GenMD4).
    (the rest as in `sample`; the grid covers [0, t]).

  Returns:
    (z_t, tokens, stats): the masked input, the reconstruction, sample's stats.
  """
  k_mask, k_chain = jax.random.split(rng)
  x = jnp.asarray(x, jnp.int32)
  keep = model.apply(variables, x, jnp.full((x.shape[0],), t, jnp.float32),
                     method="keep_probability")  # Per token for GenMD4.
  z_t, _ = losses.forward_mask(x, keep, jax.random.uniform(k_mask, x.shape), model.mask_id)
  tokens, stats = sample(model, variables, k_chain, z_init=z_t, cond=cond, steps=steps,
                         sampler=sampler, grid=grid, options=options, t_start=t, frames=frames)
  return z_t, tokens, stats
