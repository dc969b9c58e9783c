"""The MD4 negative ELBO, as pure functions of arrays.

Shapes: B batch, D positions of one example (flattened data_shape), V vocab.
The mask id is V. Everything here is jit/vmap/grad friendly; the Flax model in
`model.py` draws the randomness and calls the network.
"""

import functools
import math
from typing import Any, Callable

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
  consecutive examples (one packed group of `MD4.masked_head`, one device's
  rows) holds every G-th stratum instead of a contiguous run of them (all
  high or all low t). Block g's times are then 1 − ((u_g + i/n) mod 1) with
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


def chunked_nll(
    h: jax.Array, x: jax.Array, head: Callable[[jax.Array], jax.Array], chunk_size: int,
    terms: Callable[[jax.Array, jax.Array], Any] = token_nll,
) -> Any:
  """terms(head(h), x) (default: token_nll), a chunk of positions at a time.

  The head (features -> logits) and the per-position terms run inside a
  rematerialised `lax.map` over chunks of the sequence axis, so neither the
  [B, N, V] logits nor their gradient is ever alive at once: the forward pass
  keeps only the [B, N] results, and the backward pass recomputes one chunk's
  logits at a time. Per position the arithmetic is that of the plain version;
  only the summation order of the head's parameter gradient changes.

  Args:
    h: [B, N, D] features (any float dtype).
    x: int [B, N] targets.
    head: [B, C, D] -> [B, C, V] logits (e.g. contract.HeadInputs.logits).
    chunk_size: C, positions per chunk (N is zero-padded to a multiple of C).
    terms: (logits [B, C, V], x [B, C]) -> a pytree of float [B, C] arrays.

  Returns:
    terms' pytree with [B, N] leaves (token_nll: float32 [B, N] negative
    log-likelihoods, NaN for targets outside [0, V)).
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
    return terms(head(h_BxCxD), x_BxC)

  out_KxBxC = jax.lax.map(one_chunk, (h_KxBxCxD, x_KxBxC))
  return jax.tree.map(
      lambda a: a.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length], out_KxBxC)


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


@functools.lru_cache(maxsize=None)
def masked_capacity(schedule: schedules_lib.Schedule, batch: int, positions: int,
                    antithetic: bool, cont_time: bool, timesteps: int,
                    sigmas: float = 4.5) -> int:
  """Static size C of a buffer for the masked positions of `batch` examples.

  Given the times, the masked count K = Σ_b Σ_n 1[noise_bn ≥ α(t_b)] is a sum
  of independent Bernoulli(p_b), p_b = 1 − α(t_b) (t_b first rounded up to
  the T-step grid in discrete time, as `diffusion_weight` does): mean
  m = N·Σ_b p_b, variance v = N·Σ_b p_b·(1 − p_b) ≤ N·B/4.

  Antithetic times (`antithetic_times` over one block of B examples): the
  times, hence m and v, depend only on u mod 1/B, so C comes from the maximum
  over a grid of u in [0, 1/B) of m(u) + sigmas·sqrt(v(u)). Every t_b falls
  as u grows on that interval and α decreases in t, so m peaks at u = 0
  (t = 1, 1 − 1/B, ..., 1/B): N·(B + 1)/2 under the linear schedule, N/2
  above its mean over u. With sigmas = 4.5 the normal approximation puts
  P(K > C) below 4e-6 per group and step even at the worst u.
  Independent times: K has mean B·N·E[p] and variance
  B·(N·E[p(1 − p)] + N²·Var[p]) (the spread of t dominates), and C is the
  mean plus sigmas standard deviations: the whole batch for small B.

  C gets 8 positions of slack, is rounded up to a multiple of 8 and capped at
  B·N (where packing saves nothing). A step that overflows anyway falls back
  to the full computation (`MD4.masked_head`): C trades speed, never exactness.

  Args:
    schedule: the masking schedule.
    batch: B, the examples of one packed group.
    positions: N, positions per example.
    antithetic: times from `antithetic_times` (else i.i.d. U(0, 1]).
    cont_time, timesteps: as in `diffusion_weight`.
    sigmas: the margin in standard deviations.

  Returns:
    C, an int in [1, B·N].
  """
  total = batch * positions
  if antithetic:
    u_U = np.linspace(0.0, 1.0 / batch, 1025, endpoint=False)
    t = 1.0 - np.mod(u_U[:, None] + np.arange(batch)[None, :] / batch, 1.0)  # [U, B]
  else:  # Midpoints of a grid that every T-step cell divides evenly.
    bins = timesteps * -(-65536 // timesteps)
    t = 1.0 - (np.arange(bins) + 0.5) / bins
  with jax.ensure_compile_time_eval():  # Python ints at trace time.
    t, _ = diffusion_weight(schedule, jnp.asarray(t, jnp.float32), cont_time, timesteps)
    p = np.clip(1.0 - np.asarray(schedule.alpha(t), np.float64), 0.0, 1.0)
  if antithetic:
    mean = positions * p.sum(axis=-1)
    sd = np.sqrt(positions * (p * (1.0 - p)).sum(axis=-1))
    bound = float(np.max(mean + sigmas * sd))
  else:
    var = batch * (positions * np.mean(p * (1.0 - p)) + positions**2 * np.var(p))
    bound = batch * positions * float(np.mean(p)) + sigmas * math.sqrt(var)
  return int(max(1, min(total, 8 * math.ceil((bound + 8.0) / 8.0))))


def pack_positions(masked_GxM: jax.Array, capacity: int):
  """The masked positions of each row, packed in order into `capacity` slots.

  A cumulative sum gives each masked position its slot; one scatter per row
  writes the position there (slots past `capacity` are dropped: check count).

  Args:
    masked_GxM: bool [G, M] (a group's M positions flattened).
    capacity: C, slots per row.

  Returns:
    (pos_GxC, valid_GxC, count_G, slot_GxM): int32 [G, C] ascending positions,
    the empty slots filled with M − 1 (so the example ids pos // N stay sorted);
    bool [G, C] slot holds a masked position; int32 [G] masked count; int32
    [G, M] each masked position's slot (C for the others: see gather_packed).
  """
  groups, span = masked_GxM.shape
  count_G = jnp.sum(masked_GxM, axis=-1, dtype=jnp.int32)
  slot_GxM = jnp.where(masked_GxM, jnp.cumsum(masked_GxM, axis=-1, dtype=jnp.int32) - 1,
                       capacity)
  fill_GxC = jnp.full((groups, capacity), span - 1, jnp.int32)
  positions_M = jnp.arange(span, dtype=jnp.int32)
  pos_GxC = jax.vmap(lambda f, s: f.at[s].set(positions_M, mode="drop"))(fill_GxC, slot_GxM)
  valid_GxC = jnp.arange(capacity, dtype=jnp.int32)[None, :] < count_G[:, None]
  return pos_GxC, valid_GxC, count_G, jnp.minimum(slot_GxM, capacity)


@jax.custom_vjp
def gather_packed(h_GxMxD: jax.Array, pos_GxC: jax.Array, slot_GxM: jax.Array) -> jax.Array:
  """h at the packed positions: [G, M, D] -> [G, C, D] (`pack_positions`' pos and slot).

  The gradient is a gather too: position m of row g receives the cotangent of its
  slot (0 for unpacked positions), where take_along_axis's own transpose is a
  scatter-add that XLA:CPU runs element by element (it cancelled the masked
  head's saving at MD4-S). Exact: every masked position has exactly one slot; the
  empty slots (which repeat position M − 1) must get zero cotangents, as they do
  from `packed_sum`.
  """
  return jnp.take_along_axis(h_GxMxD, pos_GxC[..., None], axis=1)


def _gather_packed_fwd(h_GxMxD, pos_GxC, slot_GxM):
  return gather_packed(h_GxMxD, pos_GxC, slot_GxM), slot_GxM


def _gather_packed_bwd(slot_GxM, g_GxCxD):
  capacity = g_GxCxD.shape[1]
  packed = (slot_GxM < capacity)[..., None]
  dh = jnp.take_along_axis(g_GxCxD, jnp.minimum(slot_GxM, capacity - 1)[..., None], axis=1)
  return jnp.where(packed, dh, jnp.zeros((), dh.dtype)), None, None


gather_packed.defvjp(_gather_packed_fwd, _gather_packed_bwd)


def packed_sum(values_GxC: jax.Array, pos_GxC: jax.Array, valid_GxC: jax.Array,
               positions: int, examples: int) -> jax.Array:
  """Per-example sums of packed values: float32 [G, examples].

  Slot c of row g holds position pos = i·N + n of example i of the group
  (N = positions); empty slots add exactly 0 (a select, so a NaN there
  reaches neither the sum nor the gradient).
  """
  values_GxC = jnp.where(valid_GxC, values_GxC.astype(jnp.float32), 0.0)
  example_GxC = pos_GxC // positions
  return jax.vmap(lambda v, e: jax.ops.segment_sum(v, e, examples, indices_are_sorted=True))(
      values_GxC, example_GxC)


def out_of_range_rows(x: jax.Array, vocab_size: int, rows: int) -> jax.Array:
  """float32 [rows]: NaN for a row of x with a token outside [0, V), else 0.

  Added to a masked sum that never evaluated the unmasked positions, it keeps
  `masked_sum`'s rule that a bad token poisons its row wherever it sits.
  """
  bad = jnp.any(((x < 0) | (x >= vocab_size)).reshape(rows, -1), axis=-1)
  return jnp.where(bad, jnp.nan, 0.0).astype(jnp.float32)


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
