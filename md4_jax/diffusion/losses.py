"""The MD4 negative ELBO, as pure functions of arrays.

Shapes: B batch, D positions of one example (flattened data_shape), V vocab.
The mask id is V. Everything here is jit/vmap/grad friendly; the Flax model in
`model.py` draws the randomness and calls the network.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from md4_jax.diffusion import schedules as schedules_lib


def sample_times(rng: jax.Array, batch_size: int, antithetic: bool) -> jax.Array:
  """t ~ U[0, 1) per example; antithetic: t_b = (u + b/B) mod 1.

  Returns:
    t_B: float32 [B].
  """
  if antithetic:
    u = jax.random.uniform(rng, ())
    return jnp.mod(u + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)
  return jax.random.uniform(rng, (batch_size,))


def forward_mask(x: jax.Array, alpha_t: jax.Array, noise: jax.Array, mask_id: int):
  """Samples z_t ~ q(z_t | x): each token is kept with probability α(t).

  Args:
    x: int [B, ...] clean tokens.
    alpha_t: float [B] keep probability per example.
    noise: float [B, ...] uniforms in [0, 1), same shape as x.
    mask_id: the mask token id (V).

  Returns:
    (z_t, masked): int [B, ...] corrupted tokens and bool [B, ...] mask indicator.
  """
  alpha = alpha_t.reshape(alpha_t.shape + (1,) * (x.ndim - 1))
  masked = noise >= alpha
  return jnp.where(masked, mask_id, x), masked


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


def chunked_nll(
    h: jax.Array, x: jax.Array, head: Callable[[jax.Array], jax.Array], chunk_size: int
) -> jax.Array:
  """token_nll(head(h), x), a chunk of positions at a time.

  The head (features -> logits) and the cross-entropy run inside a
  rematerialised `lax.map` over chunks of the sequence axis, so neither the
  [B, N, V] logits nor their gradient is ever alive at once: the forward pass
  keeps only the [B, N] result, and the backward pass recomputes one chunk's
  logits at a time. Per position the arithmetic is that of the plain version;
  only the summation order of the head's parameter gradient changes.

  Args:
    h: [B, N, D] features (any float dtype).
    x: int [B, N] targets.
    head: [B, C, D] -> [B, C, V] logits (e.g. layers.HeadInputs.logits).
    chunk_size: C, positions per chunk (N is zero-padded to a multiple of C).

  Returns:
    float32 [B, N] negative log-likelihoods (NaN for targets outside [0, V)).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  batch, length, width = h.shape
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    x = jnp.pad(x, ((0, 0), (0, pad)))
  h_KxBxCxD = h.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
  x_KxBxC = x.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(args):
    h_BxCxD, x_BxC = args
    return token_nll(head(h_BxCxD), x_BxC)

  nll_KxBxC = jax.lax.map(one_chunk, (h_KxBxCxD, x_KxBxC))
  return nll_KxBxC.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length]


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
  """L_recon = D·(1 − α(0))·log V: tokens still masked at t = 0 cost log V."""
  return num_positions * (1.0 - schedule.alpha(jnp.float32(0.0))) * math.log(vocab_size)
