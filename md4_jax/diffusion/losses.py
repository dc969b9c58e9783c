"""The pieces of the MD4 negative ELBO, as pure functions of arrays.

Times (`draw_times_and_noise`), the forward process (`forward_mask`), the
weight w(t) (`diffusion_weight`), the cross-entropy (`token_nll`,
`masked_sum`) and the end terms (`recon_loss`, `prior_loss`). Shapes: B batch,
D positions of one example (flattened data_shape), V vocab; the mask id is V.
Everything here is jit/vmap/grad friendly; the Flax models in `model.py` and
`genmd4.py` draw the randomness and call the network (through `fused_head`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.diffusion import schedules as schedules_lib


def antithetic_times(u: jax.Array, batch_size: int, groups: int = 1) -> jax.Array:
  """t_b = 1 − ((u + j_b/B) mod 1) for b = 0..B−1: one stratified sweep of (0, 1].

  The reflection 1 − (·) keeps t = 0 out (a polyK weight with K < 1 is
  infinite there) and t = 1 in, where every weight is finite; the law of each
  t_b is still U(0, 1].

  Strata: j_b = b for groups = 1 (contiguous examples, contiguous strata). With
  G = groups > 1 (G divides B, n = B/G), example b = g·n + i of block g takes
  stratum j_b = i·G + g: the same B times, permuted so that every block of n
  consecutive examples (one packed group of fused_head's masked-only head, one
  device's rows) holds every G-th stratum instead of a contiguous run of them
  (all high or all low t). Block g's times are then 1 − ((u_g + i/n) mod 1) with
  u_g = (u + g/B) mod 1 ~ U[0, 1): an antithetic sweep of n examples of its own.

  Args:
    u: float32 scalar in [0, 1).
    batch_size: B.
    groups: G, blocks of consecutive examples that each get a stratified share.

  Returns:
    t_B: float32 [B] in (0, 1].
  """
  if groups == 1:
    return 1.0 - jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  if groups < 1 or batch_size % groups:
    raise ValueError(f"groups={groups} must be >= 1 and divide the batch of {batch_size}.")
  per_group = batch_size // groups
  example_B = np.arange(batch_size)
  strata_B = (example_B % per_group) * groups + example_B // per_group
  return 1.0 - jnp.mod(u + jnp.asarray(strata_B, jnp.float32) / batch_size, 1.0)


def sample_times(rng: jax.Array, batch_size: int, antithetic: bool, groups: int = 1) -> jax.Array:
  """t ~ U(0, 1] per example (antithetic: `antithetic_times` of one uniform, with
  its `groups`; independent times ignore them).

  Returns:
    t_B: float32 [B], never 0.
  """
  if antithetic:
    return antithetic_times(jax.random.uniform(rng, ()), batch_size, groups)
  return 1.0 - jax.random.uniform(rng, (batch_size,))


def stratified_times(rng: jax.Array, num_times: int, batch_size: int) -> jax.Array:
  """K stratified times per example: t_k = (k + 1 − u_k)/K, u_k ~ U[0, 1) i.i.d.

  Returns:
    t_KxB: float32 [K, B] in (0, 1], row k inside ((k)/K, (k + 1)/K].
  """
  u_KxB = jax.random.uniform(rng, (num_times, batch_size))
  k_K1 = jnp.arange(num_times, dtype=jnp.float32)[:, None]
  return (k_K1 + 1.0 - u_KxB) / num_times


def draw_times_and_noise(rng: jax.Array, x_shape: tuple[int, ...], antithetic: bool,
                         num_masks: int = 1, groups: int = 1):
  """The randomness of one NELBO estimate: times and the mask uniforms.

  The only place that draws them (MD4.nelbo and the train step both call it),
  so a batch's estimate is the same however it is later split.

  Args:
    rng: key.
    x_shape: (B, *data_shape).
    antithetic: stratify t across the batch.
    num_masks: masks per example at the same t (GenMD4's leave-one-out
      gradient uses K >= 2; the example axis stays first, so splitting the
      batch keeps an example's K masks together).
    groups: blocks of consecutive examples that each get a stratified share
      of the antithetic times (`antithetic_times`; 1 = contiguous strata).

  Returns:
    (t_B, noise): float32 [B] times in (0, 1] and float32 uniforms in [0, 1),
    [B, *data_shape] for one mask, [B, K, *data_shape] for K > 1 (position n
    is masked iff noise_n >= its keep probability α).
  """
  k_t, k_noise = jax.random.split(rng)
  return (sample_times(k_t, x_shape[0], antithetic, groups),
          jax.random.uniform(k_noise, noise_shape(x_shape, num_masks)))


def noise_shape(x_shape: tuple[int, ...], num_masks: int = 1) -> tuple[int, ...]:
  """Shape of the mask uniforms: x's for one mask, [B, K, *data_shape] for K > 1."""
  return tuple(x_shape) if num_masks == 1 else (x_shape[0], num_masks) + tuple(x_shape[1:])


def forward_mask(x: jax.Array, alpha: jax.Array, noise: jax.Array, mask_id: int):
  """Samples z_t ~ q(z_t | x): each token is kept with its probability α.

  Args:
    x: int [B, ...] clean tokens.
    alpha: float keep probabilities: [B] (one per example, MD4's α(t)) or
      broadcastable to x (one per position, GenMD4's α_t^{x_n}).
    noise: float [B, ...] uniforms in [0, 1), same shape as x.
    mask_id: the mask token id (V).

  Returns:
    (z_t, masked): int [B, ...] corrupted tokens and bool [B, ...] mask indicator.
  """
  if alpha.ndim == 1 and x.ndim > 1:
    alpha = alpha.reshape(alpha.shape + (1,) * (x.ndim - 1))
  masked = noise >= alpha
  return jnp.where(masked, mask_id, x), masked


def masked_sum(values: jax.Array, masked: jax.Array, nll: jax.Array, rows: int) -> jax.Array:
  """Σ values over the masked positions of each of `rows` rows: float32 [rows].

  A NaN anywhere in `nll` (an out-of-range token, see token_nll) poisons its
  row's sum even at an unmasked position, so a bad batch is never silently
  scored.
  """
  per_row = lambda a: jnp.sum(a.reshape(rows, -1), axis=-1)
  return (per_row(jnp.where(masked, values, 0.0))
          + per_row(jnp.where(jnp.isnan(nll), jnp.nan, 0.0)))


def token_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
  """−log softmax(logits)[x] without a one-hot, in float32 whatever the input.

  Tokens outside [0, V) give NaN (never a silently clamped value), so a bad
  batch surfaces in the loss even inside jit.

  Args:
    logits: float [..., V] (bf16 or f32).
    x: int [...] targets.

  Returns:
    float32 [...] negative log-likelihoods.
  """
  vocab = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  valid = (x >= 0) & (x < vocab)
  safe_x = jnp.where(valid, x, 0)
  target = jnp.take_along_axis(logits, safe_x[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target
  return jnp.where(valid, nll, jnp.nan)


def diffusion_weight(
    schedule: schedules_lib.Schedule, t: jax.Array, cont_time: bool, timesteps: int
):
  """The time at which to corrupt and the weight of the masked cross-entropy.

  Continuous time: w(t) = −α'(t)/(1 − α(t)).
  Discrete time (T steps): t ← (⌊t·T⌋ + 1)/T, s = t − 1/T and
  w = T·(α_s − α_t)/(1 − α_t), so that the estimate is unbiased for L_T.

  Returns:
    (t_B, weight_B): float32 [B] each.
  """
  if cont_time:
    return t, schedule.weight(t)
  t = (jnp.floor(t * timesteps) + 1.0) / timesteps
  s = t - 1.0 / timesteps
  alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(s)
  return t, timesteps * (alpha_s - alpha_t) / (1.0 - alpha_t)


def recon_loss(schedule: schedules_lib.Schedule, num_positions: int, vocab_size: int):
  """L_recon = D·(1 − α(0))·log V: tokens still masked at t = 0 cost log V.

  Exact for the decoder p(x_n | z_0) = copy if z_0,n is a token, uniform over
  the V tokens if it is the mask.
  """
  return num_positions * (1.0 - schedule.alpha(jnp.float32(0.0))) * math.log(vocab_size)


def prior_loss(schedule: schedules_lib.Schedule, num_positions: int, vocab_size: int):
  """L_prior = KL(q(z_1 | x) ‖ p(z_1)) = D·α(1)·log V.

  q(z_1 | x) keeps each token with probability α(1) = eps. The prior that makes
  the NELBO a true upper bound on −log p(x) is p(z_1,n) = mask with probability
  1 − α(1), each token with probability α(1)/V, giving α(1)·log V per position
  (with an all-mask prior the KL would be infinite, and dropping the term would
  let the reported NELBO fall below the true NLL by up to D·eps·log V). The
  samplers start from all-mask, which differs from this prior only on an event
  of probability ≤ D·eps.
  """
  return num_positions * schedule.alpha(jnp.float32(1.0)) * math.log(vocab_size)
