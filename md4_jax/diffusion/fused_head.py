"""The masked cross-entropy Σ_{n masked} −log p_θ(x_n | z_t), three ways.

The NELBO needs, per example, the sum over its masked positions of
−log softmax(logits)[x_n]. `masked_nll` computes it with one of three
strategies (a `Strategy`), which agree up to the order of float32 sums:

  plain        logits = network(z_t, t) on every position, [B, N, V], then
               `losses.token_nll` and `losses.masked_sum`.
  chunked      (chunk_size > 0) the network stops before its linear head
               (`contract.FusedHeadNetwork.features`); the head and the
               cross-entropy run a chunk of positions at a time inside a
               rematerialised `lax.map` (`chunked_nll`), so the [B, N, V]
               logits and their gradient never exist at once.
  masked-only  (masked_only) the head and the cross-entropy run on the masked
               positions only, about N·(1 − α(t)) per example. Each group of
               B/groups consecutive examples packs its masked positions into a
               buffer of static size C (`masked_capacity`, `pack_positions`,
               `gather_packed`) and sums them back per example (`packed_sum`).
               A step whose group has more than C falls back to the full head
               (`jax.lax.cond`): C trades speed, never exactness. Composes with
               chunk_size (the packed buffer is what gets chunked).

Shapes: B batch, N positions of one example (flattened data_shape), V vocab,
D feature width, G packed groups, M = N·B/G positions of a group, C slots.
`token_terms` is the per-position form (plain or chunked) for losses that need
more than −log p_θ (GenMD4's Σ_v w_v·μ_v).
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.diffusion import losses
from md4_jax.diffusion import schedules as schedules_lib
from md4_jax.networks import contract
from md4_jax.networks import layers


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How `masked_nll` evaluates the head (the module doc's three strategies).

  Attributes:
    chunk_size: positions per chunk of the fused head (0 = the full logits).
    masked_only: evaluate the head at the masked positions only.
    groups: G, packed groups of consecutive examples (masked_only): one per
      batch shard, so the gather and the sums stay on each device.
    capacity: examples -> C, the slots of one packed group (masked_only).
    nll: (logits [..., V], x [...]) -> float32 [...] −log p; `losses.token_nll`
      (a benchmark's naive baseline swaps in a one-hot form).
  """

  chunk_size: int = 0
  masked_only: bool = False
  groups: int = 1
  capacity: Optional[Callable[[int], int]] = None
  nll: Callable[[jax.Array, jax.Array], jax.Array] = losses.token_nll


def masked_nll(network: nn.Module, z_t, t, cond, train: bool, x, masked,
               strategy: Strategy = Strategy()):
  """Σ over each example's masked positions of −log p_θ(x_n | z_t).

  Args:
    network: the denoising network (bound), a contract.FusedHeadNetwork for
      chunk_size > 0 or masked_only.
    z_t: int [B, *data_shape] corrupted tokens.
    t: float [B] times.
    cond: optional int [B] labels.
    train: dropout on.
    x: int [B, *data_shape] clean tokens.
    masked: bool [B, *data_shape], the positions that enter the sum.
    strategy: plain, chunked or masked-only (`Strategy`).

  Returns:
    (float32 [B] sums, stats): NaN for an example holding a token outside
    [0, V) anywhere; stats is {} or, with masked_only, {'masked_head_overflow':
    float32 scalar, 1 when the step fell back to the full head}.
  """
  if strategy.masked_only:
    sums_B, overflow = _masked_only_nll(network, z_t, t, cond, train, x, masked, strategy)
    return sums_B, {"masked_head_overflow": overflow.astype(jnp.float32)}
  nll = token_terms(network, z_t, t, cond, train, x, strategy.nll, strategy.chunk_size)
  return losses.masked_sum(nll, masked, nll, x.shape[0]), {}


def token_terms(network: nn.Module, z_t, t, cond, train: bool, x,
                terms: Callable[[jax.Array, jax.Array], Any] = losses.token_nll,
                chunk_size: int = 0):
  """terms(logits, x) at every position: a pytree of float32 [B, *data_shape].

  With chunk_size > 0 the fused head and `terms` run a chunk of positions at a
  time (`chunked_nll`); otherwise on the full logits of `network`.
  """
  if chunk_size <= 0:
    return terms(network(z_t, t, cond=cond, train=train), x)
  feats = features(network, z_t, t, cond, train, f"loss_chunk_size={chunk_size}")
  batch, width = x.shape[0], feats.h.shape[-1]
  h_BxNxD = feats.h.reshape(batch, -1, width)
  out = chunked_nll(h_BxNxD, x.reshape(batch, -1), feats.logits, chunk_size, terms)
  return jax.tree.map(lambda a: a.reshape(x.shape), out)


def features(network: nn.Module, z_t, t, cond, train: bool, knob: str) -> contract.HeadInputs:
  """The network's features and head; `knob` names the setting that needs them."""
  if not isinstance(network, contract.FusedHeadNetwork):
    raise ValueError(f"{knob} needs a network with a fused head "
                     f"(contract.FusedHeadNetwork); {type(network).__name__} is not.")
  return network.features(z_t, t, cond=cond, train=train)


def check_network(config, network: nn.Module) -> None:
  """Raises ValueError if config.loss_chunk_size > 0 or config.masked_head is on
  and `network` has no fused head."""
  if isinstance(network, contract.FusedHeadNetwork):
    return
  for knob, value, off in (("loss_chunk_size", config.loss_chunk_size, 0),
                           ("masked_head", config.masked_head, False)):
    if value:
      raise ValueError(
          f"config.{knob}={value!r} fuses the head with the loss, which network "
          f"{config.network!r} ({type(network).__name__}) cannot do; set it to {off}.")


def _masked_only_nll(network, z_t, t, cond, train, x, masked, strategy: Strategy):
  """The masked-only strategy: (float32 [B] sums, bool scalar: the full path ran).

  The B examples form G groups of n = B/G consecutive ones; a group's n·N
  positions are flattened and its masked ones packed in order into
  C = capacity(n) slots. The features of those slots, [G, C, D] (gathered
  within the group, so under data parallelism on its device), go through the
  head and the cross-entropy (chunked with chunk_size); the per-example sums
  are segment sums of the packed values by example id, where empty slots add
  exactly 0 to the loss and the gradients. Out-of-range tokens give a NaN row
  as in the plain path (`out_of_range_rows`: unmasked positions are never
  scored).

  When some group has more than C masked positions, jax.lax.cond takes the
  full path instead (head on every position, losses.masked_sum), so no position
  is ever dropped. That branch is rematerialised, so a step that packs stores
  none of its [B, N, V] residuals (the compiled peak still covers the
  fallback's own temporaries: chunk-sized with chunk_size).
  """
  feats = features(network, z_t, t, cond, train, "masked_head")
  batch, groups = x.shape[0], strategy.groups
  length = math.prod(x.shape[1:])
  if batch % groups:
    raise ValueError(f"masked_head packs head_groups={groups} groups of examples; the batch of "
                     f"{batch} is not divisible by it.")
  per_group = batch // groups
  span = per_group * length
  width = feats.h.shape[-1]
  h_BxNxD = feats.h.reshape(batch, length, width)
  x_BxN = x.reshape(batch, length)
  masked_BxN = masked.reshape(batch, length)
  head = functools.partial(_head_terms, feats, nll=strategy.nll, chunk_size=strategy.chunk_size)

  def full(h_BxNxD):
    nll_BxN = head(h_BxNxD, x_BxN)
    return losses.masked_sum(nll_BxN, masked_BxN, nll_BxN, batch)

  capacity = strategy.capacity(per_group)
  if capacity >= span:  # Packing would save nothing.
    return full(h_BxNxD), jnp.bool_(False)
  pos_GxC, valid_GxC, count_G, slot_GxM = pack_positions(masked_BxN.reshape(groups, span),
                                                         capacity)
  overflow = jnp.any(count_G > capacity)

  def packed(h_BxNxD):
    h_GxMxD = h_BxNxD.reshape(groups, span, width)
    h_GxCxD = gather_packed(h_GxMxD, pos_GxC, slot_GxM)
    h_GxCxD = layers.constrain(h_GxCxD, layers.ACTIVATION_BxLxD)
    x_GxC = jnp.take_along_axis(x_BxN.reshape(groups, span), pos_GxC, axis=1)
    nll_GxC = head(h_GxCxD, x_GxC, packed_length=length)
    sums_B = packed_sum(nll_GxC, pos_GxC, valid_GxC, length, per_group).reshape(batch)
    return sums_B + out_of_range_rows(x_BxN, feats.num_tokens, batch)

  return jax.lax.cond(overflow, jax.checkpoint(full), packed, h_BxNxD), overflow


def _head_terms(feats: contract.HeadInputs, h_RxLxD, x_RxL, nll, chunk_size: int,
                packed_length: int = 0):
  """nll(head(h), x) over rows of positions: [R, L, D], [R, L] -> float32 [R, L]
  (a chunk of positions at a time with chunk_size > 0).

  packed_length: N when h is a masked-only buffer [G, C, D]. It is cut into as
  many chunks as the unpacked sequence would be (ceil(N / chunk_size)), each of
  about C / that many slots (a multiple of 8): the loop keeps its length and
  each chunk's matmul shrinks with the buffer. (Chunks of chunk_size slots
  would make B times as many small matmuls, which on CPU cost what the packing
  saved.)
  """
  if chunk_size <= 0:
    return nll(feats.logits(h_RxLxD), x_RxL)
  chunk = chunk_size
  if packed_length:
    num_chunks = -(-packed_length // chunk)
    chunk = 8 * -(-h_RxLxD.shape[1] // (8 * num_chunks))
  return chunked_nll(h_RxLxD, x_RxL, feats.logits, chunk, nll)


def chunked_nll(
    h: jax.Array, x: jax.Array, head: Callable[[jax.Array], jax.Array], chunk_size: int,
    terms: Callable[[jax.Array, jax.Array], Any] = losses.token_nll,
) -> Any:
  """terms(head(h), x) (default: losses.token_nll), a chunk of positions at a time.

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


@functools.lru_cache(maxsize=None)
def masked_capacity(schedule: schedules_lib.Schedule, batch: int, positions: int,
                    antithetic: bool, cont_time: bool, timesteps: int,
                    sigmas: float = 4.5) -> int:
  """Static size C of a buffer for the masked positions of `batch` examples.

  Given the times, the masked count K = Σ_b Σ_n 1[noise_bn ≥ α(t_b)] is a sum
  of independent Bernoulli(p_b), p_b = 1 − α(t_b) (t_b first rounded up to
  the T-step grid in discrete time, as `losses.diffusion_weight` does): mean
  m = N·Σ_b p_b, variance v = N·Σ_b p_b·(1 − p_b) ≤ N·B/4.

  Antithetic times (`losses.antithetic_times` over one block of B examples):
  the times, hence m and v, depend only on u mod 1/B, so C comes from the
  maximum over a grid of u in [0, 1/B) of m(u) + sigmas·sqrt(v(u)). Every t_b
  falls as u grows on that interval and α decreases in t, so m peaks at u = 0
  (t = 1, 1 − 1/B, ..., 1/B): N·(B + 1)/2 under the linear schedule, N/2
  above its mean over u. With sigmas = 4.5 the normal approximation puts
  P(K > C) below 4e-6 per group and step even at the worst u.
  Independent times: K has mean B·N·E[p] and variance
  B·(N·E[p(1 − p)] + N²·Var[p]) (the spread of t dominates), and C is the
  mean plus sigmas standard deviations: the whole batch for small B.

  C gets 8 positions of slack, is rounded up to a multiple of 8 and capped at
  B·N (where packing saves nothing). A step that overflows anyway falls back
  to the full computation: C trades speed, never exactness.

  Args:
    schedule: the masking schedule.
    batch: B, the examples of one packed group.
    positions: N, positions per example.
    antithetic: antithetic times (else i.i.d. U(0, 1]).
    cont_time, timesteps: as in `losses.diffusion_weight`.
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
    t, _ = losses.diffusion_weight(schedule, jnp.asarray(t, jnp.float32), cont_time, timesteps)
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
  `losses.masked_sum`'s rule that a bad token poisons its row wherever it sits.
  """
  bad = jnp.any(((x < 0) | (x >= vocab_size)).reshape(rows, -1), axis=-1)
  return jnp.where(bad, jnp.nan, 0.0).astype(jnp.float32)
