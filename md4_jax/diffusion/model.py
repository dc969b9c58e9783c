"""MD4: a Flax module tying a denoising network to a masking schedule.

The network is an attribute, so any backbone (or a test's toy network) plugs in
with the contract `network(z_t, t, cond=None, train=False) -> logits[..., V]`
(and, for a `contract.FusedHeadNetwork`, `network.features(...)`).
The schedule is a `schedules.Schedule` object. Random streams: 'sample' (times
and masks, drawn by `losses.draw_times_and_noise`), 'dropout' (in the network).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.diffusion import losses
from md4_jax.diffusion import schedules as schedules_lib
from md4_jax.networks import contract
from md4_jax.networks import layers


def check_tokens(x: Any, vocab_size: int) -> None:
  """Raises ValueError for tokens outside [0, V) when x is a concrete array.

  Inside jit the values are unknown; there `losses.token_nll` turns them into
  NaN instead, which the training loop's NaN guard reports.
  """
  if isinstance(x, jax.core.Tracer):
    return
  x = np.asarray(x)
  if not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f"Tokens must be integers, got dtype {x.dtype}.")
  if x.size and (x.min() < 0 or x.max() >= vocab_size):
    raise ValueError(
        f"Token ids must lie in [0, {vocab_size}) (vocab_size={vocab_size}); got "
        f"min {x.min()}, max {x.max()}. Check the dataset's vocab_size in the config."
    )


class MD4(nn.Module):
  """Masked diffusion model: negative ELBO and the network's predictions.

  Attributes:
    network: (z_t [B, *data_shape], t [B], cond, train) -> logits [B, *data_shape, V].
    schedule: the masking schedule (e.g. schedules.get_schedule('cosine')).
    vocab_size: V; token ids in [0, V), the mask id is V.
    data_shape: shape of one example, e.g. (L,) or (H, W, C).
    cont_time: continuous-time NELBO if True, else the T-step discrete one.
    timesteps: T for the discrete-time loss.
    antithetic_time_sampling: stratify t across the batch.
    loss_chunk_size: if > 0 (the network must be a
      contract.FusedHeadNetwork), the head and the cross-entropy run this many
      positions at a time (losses.chunked_nll), so the full [B, D, V] logits
      never exist in the loss-and-gradient step. Equal to the plain loss up
      to float summation order. 0 = plain.
    masked_head: evaluate the fused head and the cross-entropy only at the
      masked positions (network: a contract.FusedHeadNetwork). Only they enter
      the NELBO, and there are N·(1 − α(t)) of them: half on average under the
      linear schedule. Each group of B/head_groups consecutive examples packs
      its masked positions into a buffer of static size C
      (losses.masked_capacity, or head_capacity); if any group has more, the
      step runs the full computation instead (jax.lax.cond), so the result
      is always the plain loss up to float summation order. Composes with
      loss_chunk_size (the packed buffer is what gets chunked).
    head_groups: G, the packed groups: the number of batch shards (set by
      train.build.setup), so the gather and the sums stay on each device. With
      masked_head the antithetic times are interleaved across the G groups
      (losses.antithetic_times), so each group sees a stratified sweep of t.
    head_capacity: C override for one group (0 = losses.masked_capacity).
  """

  network: nn.Module
  schedule: schedules_lib.Schedule
  vocab_size: int
  data_shape: tuple[int, ...]
  cont_time: bool = True
  timesteps: int = 1000
  antithetic_time_sampling: bool = True
  loss_chunk_size: int = 0
  masked_head: bool = False
  head_groups: int = 1
  head_capacity: int = 0

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def num_positions(self) -> int:
    return math.prod(self.data_shape)

  # A schedule shared by every token: the samplers may draw reveal times
  # without the network and skip idle steps (GenMD4 overrides both).
  per_token_schedule = False

  @property
  def masks_per_example(self) -> int:
    """Masks drawn per example and training step (losses.draw_times_and_noise)."""
    return 1

  def time_groups(self, microbatches: int = 1) -> int:
    """Blocks of consecutive examples that each get a stratified share of the
    antithetic times (losses.draw_times_and_noise): with masked_head every
    packed group of every microbatch (microbatches·head_groups), else 1 (the
    contiguous strata, bit for bit)."""
    return microbatches * self.head_groups if self.masked_head else 1

  def head_buffer_size(self, examples: int) -> int:
    """C: masked positions one packed group of `examples` examples holds."""
    if self.head_capacity > 0:
      return min(self.head_capacity, examples * self.num_positions)
    return losses.masked_capacity(self.schedule, examples, self.num_positions,
                                  self.antithetic_time_sampling, self.cont_time, self.timesteps)

  def keep_probability(self, x, t):
    """α(t) of every position of x [B, *data_shape] at times t [B] (float32)."""
    alpha_B = self.schedule.alpha(jnp.asarray(t, jnp.float32))
    return jnp.broadcast_to(alpha_B.reshape(alpha_B.shape + (1,) * (x.ndim - 1)), x.shape)

  def predict(self, z_t, t, cond=None, train: bool = False):
    """Logits of the clean tokens. z_t: int [B, *data_shape]; t: float [B]."""
    return self.network(z_t, t, cond=cond, train=train)

  def nelbo(self, x, cond=None, train: bool = False, t=None, noise=None):
    """Per-example negative ELBO terms in nats.

    Args:
      x: int [B, *data_shape] clean tokens in [0, V).
      cond: optional int [B] labels.
      train: dropout on.
      t: optional float [B] times (default: drawn from the 'sample' stream).
      noise: optional float [B, *data_shape] mask uniforms (default: drawn).

    Returns:
      dict of float32 [B]: loss_diff, loss_recon, loss_prior, loss (nats; the
      sum is an upper bound on −log p(x), see losses.prior_loss).
    """
    return self._nelbo(x, cond, train, t, noise)[0]

  def _nelbo(self, x, cond, train, t, noise):
    """(nelbo's per-example terms, step statistics: masked_head_overflow, a
    float32 scalar, 1 when the masked head fell back to the full computation)."""
    t, noise = self._checked_draw(x, t, noise)
    schedule = self.schedule
    batch = x.shape[0]
    t, weight_B = losses.diffusion_weight(schedule, t, self.cont_time, self.timesteps)
    z_t, masked = losses.forward_mask(x, schedule.alpha(t), noise, self.mask_id)
    stats = {}
    if self.masked_head:
      nll_sum_B, overflow = self._masked_nll_sum(z_t, t, cond, train, x, masked)
      stats["masked_head_overflow"] = overflow.astype(jnp.float32)
    else:
      nll = self._token_nll(z_t, t, cond, train, x)
      nll_sum_B = losses.masked_sum(nll, masked, nll, batch)
    loss_diff = weight_B * nll_sum_B
    loss_recon = jnp.full((batch,), losses.recon_loss(schedule, self.num_positions, self.vocab_size))
    loss_prior = jnp.full((batch,), losses.prior_loss(schedule, self.num_positions, self.vocab_size))
    return {
        "loss_diff": loss_diff,
        "loss_recon": loss_recon,
        "loss_prior": loss_prior,
        "loss": loss_diff + loss_recon + loss_prior,
    }, stats

  def _checked_draw(self, x, t, noise):
    """Checks x (tokens in range, example shape) and fills in t and the mask
    uniforms that were not given (`masks_per_example` masks, one draw)."""
    check_tokens(x, self.vocab_size)
    if x.shape[1:] != tuple(self.data_shape):
      raise ValueError(
          f"Batch has example shape {x.shape[1:]}, the model expects data_shape "
          f"{tuple(self.data_shape)}."
      )
    if t is None or noise is None:
      drawn_t, drawn_noise = losses.draw_times_and_noise(
          self.make_rng("sample"), x.shape, self.antithetic_time_sampling,
          self.masks_per_example, self.time_groups())
      t = drawn_t if t is None else t
      noise = drawn_noise if noise is None else noise
    return t, noise

  def _token_nll(self, z_t, t, cond, train, x):
    """−log p_θ(x | z_t) per position, float32 [B, *data_shape]."""
    return self._token_terms(z_t, t, cond, train, x, losses.token_nll)

  def _token_terms(self, z_t, t, cond, train, x, terms):
    """terms(logits, x) per position: a pytree of float32 [B, *data_shape].

    With loss_chunk_size > 0 the fused head and `terms` run a chunk of
    positions at a time (losses.chunked_nll); otherwise on the full logits.
    """
    if self.loss_chunk_size > 0:
      feats = self._features(z_t, t, cond, train, f"loss_chunk_size={self.loss_chunk_size}")
      batch = x.shape[0]
      h_BxNxD = feats.h.reshape(batch, self.num_positions, feats.h.shape[-1])
      out = self._head_terms(feats, h_BxNxD, x.reshape(batch, -1), terms)
      return jax.tree.map(lambda a: a.reshape(x.shape), out)
    return terms(self.predict(z_t, t, cond=cond, train=train), x)

  def _features(self, z_t, t, cond, train, knob: str) -> contract.HeadInputs:
    """The network's features and head (contract.FusedHeadNetwork); `knob` names
    the setting that needs them, for the error."""
    if not isinstance(self.network, contract.FusedHeadNetwork):
      raise ValueError(f"{knob} needs a network with a fused head "
                       f"(contract.FusedHeadNetwork); {type(self.network).__name__} is not.")
    return self.network.features(z_t, t, cond=cond, train=train)

  def _head_terms(self, feats: contract.HeadInputs, h_RxLxD, x_RxL, terms,
                  packed: bool = False):
    """terms(head(h), x) over rows of positions: [R, L, D], [R, L] -> [R, L] leaves
    (a chunk of positions at a time with loss_chunk_size > 0).

    packed: h is a masked-head buffer [G, C, D]. It is cut into as many chunks as
    the unpacked sequence would be (ceil(N / loss_chunk_size)), each of about C /
    that many slots (a multiple of 8): the loop keeps its length and each chunk's
    matmul shrinks with the buffer. (Chunks of loss_chunk_size slots would make
    B times as many small matmuls, which on CPU cost what the packing saved.)
    """
    if self.loss_chunk_size > 0:
      chunk = self.loss_chunk_size
      if packed:
        num_chunks = -(-self.num_positions // chunk)
        chunk = 8 * -(-h_RxLxD.shape[1] // (8 * num_chunks))
      return losses.chunked_nll(h_RxLxD, x_RxL, feats.logits, chunk, terms)
    return terms(feats.logits(h_RxLxD), x_RxL)

  def _masked_nll_sum(self, z_t, t, cond, train, x, masked):
    """Σ over each example's masked positions of −log p_θ(x_n | z_t), with the
    head and the cross-entropy evaluated at masked positions only.

    The B examples form G = head_groups groups of n = B/G consecutive ones; a
    group's n·N positions are flattened and its masked ones packed in order
    into C = head_buffer_size(n) slots (losses.pack_positions). The features
    of those slots, [G, C, D] (gathered within the group, so under data
    parallelism on its device), go through the head and token_nll (chunked
    with loss_chunk_size); the per-example sums are segment sums of the
    packed values by example id (losses.packed_sum), where empty slots add
    exactly 0 to the loss and the gradients. Out-of-range tokens give a NaN
    row as in the plain path (losses.out_of_range_rows; unmasked positions
    are never scored).

    When some group has more than C masked positions, jax.lax.cond takes the
    full path instead (head on every position, losses.masked_sum), so no
    position is ever dropped. That branch is rematerialised, so a step that
    packs stores none of its [B, N, V] residuals (the compiled peak still
    covers the fallback's own temporaries: chunk-sized with loss_chunk_size).

    Returns:
      (float32 [B] sums, bool scalar: the full path ran).
    """
    feats = self._features(z_t, t, cond, train, "masked_head")
    batch, length, groups = x.shape[0], self.num_positions, self.head_groups
    if batch % groups:
      raise ValueError(f"masked_head packs head_groups={groups} groups of examples; the batch of "
                       f"{batch} is not divisible by it.")
    per_group = batch // groups
    span = per_group * length
    width = feats.h.shape[-1]
    h_BxNxD = feats.h.reshape(batch, length, width)
    x_BxN = x.reshape(batch, length)
    masked_BxN = masked.reshape(batch, length)

    def full(h_BxNxD):
      nll_BxN = self._head_terms(feats, h_BxNxD, x_BxN, losses.token_nll)
      return losses.masked_sum(nll_BxN, masked_BxN, nll_BxN, batch)

    capacity = self.head_buffer_size(per_group)
    if capacity >= span:  # Packing would save nothing.
      return full(h_BxNxD), jnp.bool_(False)
    pos_GxC, valid_GxC, count_G, slot_GxM = losses.pack_positions(
        masked_BxN.reshape(groups, span), capacity)
    overflow = jnp.any(count_G > capacity)

    def packed(h_BxNxD):
      h_GxMxD = h_BxNxD.reshape(groups, span, width)
      h_GxCxD = losses.gather_packed(h_GxMxD, pos_GxC, slot_GxM)
      h_GxCxD = layers.constrain(h_GxCxD, layers.ACTIVATION_BxLxD)
      x_GxC = jnp.take_along_axis(x_BxN.reshape(groups, span), pos_GxC, axis=1)
      nll_GxC = self._head_terms(feats, h_GxCxD, x_GxC, losses.token_nll, packed=True)
      sums_B = losses.packed_sum(nll_GxC, pos_GxC, valid_GxC, length, per_group).reshape(batch)
      return sums_B + losses.out_of_range_rows(x_BxN, self.vocab_size, batch)

    return jax.lax.cond(overflow, jax.checkpoint(full), packed, h_BxNxD), overflow

  def __call__(self, x, cond=None, train: bool = False, t=None, noise=None):
    """Batch-mean NELBO terms, nats per example (see `nelbo`), and with
    masked_head masked_head_overflow (1 if the step ran the full head)."""
    terms, stats = self._nelbo(x, cond, train, t, noise)
    return dict(jax.tree.map(jnp.mean, terms), **stats)


def check_fused_head(config, network: nn.Module) -> None:
  """Raises ValueError if loss_chunk_size > 0 or masked_head is on and `network`
  has no fused head."""
  if isinstance(network, contract.FusedHeadNetwork):
    return
  for knob, value, off in (("loss_chunk_size", config.loss_chunk_size, 0),
                           ("masked_head", config.masked_head, False)):
    if value:
      raise ValueError(
          f"config.{knob}={value!r} fuses the head with the loss, which network "
          f"{config.network!r} ({type(network).__name__}) cannot do; set it to {off}.")


def build_model(config, network: nn.Module) -> MD4:
  """The MD4 module described by `config` around `network`.

  Raises:
    ValueError: a bad schedule name, or loss_chunk_size > 0 or masked_head
      with a network that is not a contract.FusedHeadNetwork.
  """
  check_fused_head(config, network)
  return MD4(
      network=network,
      schedule=schedules_lib.get_schedule(config.noise_schedule),
      vocab_size=config.vocab_size,
      data_shape=tuple(config.data_shape),
      cont_time=config.cont_time,
      timesteps=config.timesteps,
      antithetic_time_sampling=config.antithetic_time_sampling,
      loss_chunk_size=config.loss_chunk_size,
      masked_head=bool(config.masked_head),
  )
