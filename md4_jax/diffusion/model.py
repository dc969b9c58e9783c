"""MD4: masked diffusion, its negative ELBO, as in the paper (Shi et al. 2024, Sec. 4).

For clean tokens x ∈ {0..V−1}^N and a schedule α(t) (the probability that a
position is still unmasked at time t), `MD4.nelbo` estimates

  t ~ U(0, 1] per example (antithetic: one uniform stratified across the batch),
  z_t ~ q(z_t | x): each position kept with probability α(t), else the mask V,
  L(x) = w(t) · Σ_{n: z_t,n = V} −log softmax(network(z_t, t))[n, x_n]
         + L_recon + L_prior,          w(t) = −α'(t) / (1 − α(t))

(T-step discrete time: t on the grid and w = T·(α_s − α_t)/(1 − α_t); see
losses.diffusion_weight). The pieces are pure functions in `losses.py`. How the
masked cross-entropy is evaluated (full logits, chunks of positions, or the
masked positions only) is `fused_head.masked_nll`'s business: one call, the
same numbers up to float summation order.

The network is an attribute, so any backbone (or a test's toy network) plugs in
with the contract `network(z_t, t, cond=None, train=False) -> logits[..., V]`
(networks/contract.py). The schedule is a `schedules.Schedule` object. Random
streams: 'sample' (times and masks, drawn by `losses.draw_times_and_noise`),
'dropout' (in the network). `MaskedDiffusion` holds what MD4 and GenMD4
(genmd4.py: a learned schedule per token) share.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.diffusion import fused_head
from md4_jax.diffusion import losses
from md4_jax.diffusion import schedules as schedules_lib


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


class MaskedDiffusion(nn.Module):
  """What MD4 and GenMD4 share: the network, the data, the draw of times and masks.

  A subclass defines `_nelbo(x, cond, train, t, noise) -> (terms, stats)`: the
  per-example terms of `nelbo` and step statistics for `__call__`.

  Attributes:
    network: (z_t [B, *data_shape], t [B], cond, train) -> logits [B, *data_shape, V].
    schedule: the masking schedule (e.g. schedules.get_schedule('cosine')).
    vocab_size: V; token ids in [0, V), the mask id is V.
    data_shape: shape of one example, e.g. (L,) or (H, W, C).
    antithetic_time_sampling: stratify t across the batch.
    loss_chunk_size: if > 0 (the network must be a
      contract.FusedHeadNetwork), the head and the cross-entropy run this many
      positions at a time (fused_head.py), so the full [B, D, V] logits never
      exist in the loss-and-gradient step. 0 = plain.
  """

  network: nn.Module
  schedule: schedules_lib.Schedule
  vocab_size: int
  data_shape: tuple[int, ...]
  antithetic_time_sampling: bool = True
  loss_chunk_size: int = 0

  # A schedule shared by every token: the samplers may draw reveal times
  # without the network and skip idle steps (GenMD4 sets it).
  per_token_schedule = False

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def num_positions(self) -> int:
    return math.prod(self.data_shape)

  @property
  def masks_per_example(self) -> int:
    """Masks drawn per example and training step (losses.draw_times_and_noise)."""
    return 1

  def time_groups(self, microbatches: int = 1) -> int:
    """Blocks of consecutive examples that each get a stratified share of the
    antithetic times (losses.draw_times_and_noise); 1 = contiguous strata."""
    del microbatches
    return 1

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
      t: optional float [B] times in (0, 1] (default: drawn from the 'sample'
        stream; GenMD4 maps them into its time range).
      noise: optional float [B, *data_shape] mask uniforms, position n masked
        iff noise_n >= its keep probability (default: drawn; GenMD4 also takes
        [B, K, *data_shape], K masks at the same t).

    Returns:
      dict of float32 [B]: loss_diff, loss_recon, loss_prior, loss (nats; the
      sum is an upper bound on −log p(x), see losses.prior_loss), and the
      model's extra terms (GenMD4: loss_score).
    """
    return self._nelbo(x, cond, train, t, noise)[0]

  def __call__(self, x, cond=None, train: bool = False, t=None, noise=None):
    """Batch means of `nelbo`'s terms and the model's step statistics."""
    terms, stats = self._nelbo(x, cond, train, t, noise)
    return dict(jax.tree.map(jnp.mean, terms), **stats)

  def _nelbo(self, x, cond, train, t, noise):
    raise NotImplementedError

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


class MD4(MaskedDiffusion):
  """Masked diffusion with one schedule for every token: the module doc's NELBO.

  Attributes (besides MaskedDiffusion's):
    cont_time: continuous-time NELBO if True, else the T-step discrete one.
    timesteps: T for the discrete-time loss.
    masked_head: evaluate the fused head and the cross-entropy only at the
      masked positions (fused_head.py's masked-only strategy; the network must
      be a contract.FusedHeadNetwork): N·(1 − α(t)) of the N positions, half on
      average under the linear schedule. A step with more masked positions
      than the static buffer holds runs the full head instead, so the result is
      always the plain loss up to float summation order; __call__ reports
      masked_head_overflow (1 when it did). Composes with loss_chunk_size.
    head_groups: G, the packed groups: the number of batch shards (set by
      experiment.build.setup), so the gather and the sums stay on each device.
      With masked_head the antithetic times are interleaved across the G groups
      (losses.antithetic_times), so each group sees a stratified sweep of t.
    head_capacity: C override for one group (0 = fused_head.masked_capacity).
  """

  cont_time: bool = True
  timesteps: int = 1000
  masked_head: bool = False
  head_groups: int = 1
  head_capacity: int = 0

  def _nelbo(self, x, cond, train, t, noise):
    """(nelbo's per-example terms, step statistics: with masked_head,
    masked_head_overflow, a float32 scalar)."""
    # t ~ U(0, 1] (antithetic) and the mask uniforms, unless given.
    t, noise = self._checked_draw(x, t, noise)
    # w(t) = −α'(t) / (1 − α(t)) (discrete time: t on the grid, its T-step weight).
    t, weight_B = losses.diffusion_weight(self.schedule, t, self.cont_time, self.timesteps)
    # z_t ~ q(z_t | x): each position kept with probability α(t), else the mask.
    z_t, masked = losses.forward_mask(x, self.schedule.alpha(t), noise, self.mask_id)
    # Σ_{n masked} −log p_θ(x_n | z_t), with the network (head strategy: fused_head.py).
    nll_B, stats = fused_head.masked_nll(self.network, z_t, t, cond, train, x, masked,
                                         self.head_strategy())
    loss_diff = weight_B * nll_B
    batch, positions = x.shape[0], self.num_positions
    loss_recon = jnp.full((batch,), losses.recon_loss(self.schedule, positions, self.vocab_size))
    loss_prior = jnp.full((batch,), losses.prior_loss(self.schedule, positions, self.vocab_size))
    return {"loss_diff": loss_diff, "loss_recon": loss_recon, "loss_prior": loss_prior,
            "loss": loss_diff + loss_recon + loss_prior}, stats

  def head_strategy(self) -> fused_head.Strategy:
    """How the masked cross-entropy is evaluated (loss_chunk_size, masked_head)."""
    return fused_head.Strategy(chunk_size=self.loss_chunk_size, masked_only=self.masked_head,
                               groups=self.head_groups, capacity=self.head_buffer_size)

  def time_groups(self, microbatches: int = 1) -> int:
    """With masked_head every packed group of every microbatch
    (microbatches·head_groups) gets a stratified share of the antithetic times,
    else 1 (the contiguous strata, bit for bit)."""
    return microbatches * self.head_groups if self.masked_head else 1

  def head_buffer_size(self, examples: int) -> int:
    """C: masked positions one packed group of `examples` examples holds."""
    if self.head_capacity > 0:
      return min(self.head_capacity, examples * self.num_positions)
    return fused_head.masked_capacity(self.schedule, examples, self.num_positions,
                                      self.antithetic_time_sampling, self.cont_time,
                                      self.timesteps)


def build_model(config, network: nn.Module) -> MD4:
  """The MD4 module described by `config` around `network`.

  Raises:
    ValueError: a bad schedule name, or loss_chunk_size > 0 or masked_head
      with a network that is not a contract.FusedHeadNetwork.
  """
  fused_head.check_network(config, network)
  return MD4(**shared_fields(config, network), cont_time=config.cont_time,
             timesteps=config.timesteps, masked_head=bool(config.masked_head))


def shared_fields(config, network: nn.Module) -> dict[str, Any]:
  """The `MaskedDiffusion` fields every model reads from the config, around `network`."""
  return dict(network=network, schedule=schedules_lib.get_schedule(config.noise_schedule),
              vocab_size=config.vocab_size, data_shape=tuple(config.data_shape),
              antithetic_time_sampling=config.antithetic_time_sampling,
              loss_chunk_size=config.loss_chunk_size)
