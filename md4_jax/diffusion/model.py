"""MD4: a Flax module tying a denoising network to a masking schedule.

The network is an attribute, so any backbone (or a test's toy network) plugs in
with the contract `network(z_t, t, cond=None, train=False) -> logits[..., V]`
(and, for a `networks.layers.FusedHeadNetwork`, `network.features(...)`).
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
      layers.FusedHeadNetwork), the head and the cross-entropy run this many
      positions at a time (losses.chunked_nll), so the full [B, D, V] logits
      never exist in the loss-and-gradient step. Equal to the plain loss up
      to float summation order. 0 = plain.
  """

  network: nn.Module
  schedule: schedules_lib.Schedule
  vocab_size: int
  data_shape: tuple[int, ...]
  cont_time: bool = True
  timesteps: int = 1000
  antithetic_time_sampling: bool = True
  loss_chunk_size: int = 0

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
    t, noise = self._checked_draw(x, t, noise)
    schedule = self.schedule
    batch = x.shape[0]
    t, weight_B = losses.diffusion_weight(schedule, t, self.cont_time, self.timesteps)
    z_t, masked = losses.forward_mask(x, schedule.alpha(t), noise, self.mask_id)
    nll = self._token_nll(z_t, t, cond, train, x)
    loss_diff = weight_B * losses.masked_sum(nll, masked, nll, batch)
    loss_recon = jnp.full((batch,), losses.recon_loss(schedule, self.num_positions, self.vocab_size))
    loss_prior = jnp.full((batch,), losses.prior_loss(schedule, self.num_positions, self.vocab_size))
    return {
        "loss_diff": loss_diff,
        "loss_recon": loss_recon,
        "loss_prior": loss_prior,
        "loss": loss_diff + loss_recon + loss_prior,
    }

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
          self.masks_per_example)
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
      if not isinstance(self.network, layers.FusedHeadNetwork):
        raise ValueError(f"loss_chunk_size={self.loss_chunk_size} needs a network with a fused "
                         f"head (layers.FusedHeadNetwork); {type(self.network).__name__} is not.")
      feats = self.network.features(z_t, t, cond=cond, train=train)
      batch = x.shape[0]
      h_BxNxD = feats.h.reshape(batch, self.num_positions, feats.h.shape[-1])
      out = losses.chunked_nll(h_BxNxD, x.reshape(batch, -1), feats.logits,
                               self.loss_chunk_size, terms)
      return jax.tree.map(lambda a: a.reshape(x.shape), out)
    return terms(self.predict(z_t, t, cond=cond, train=train), x)

  def __call__(self, x, cond=None, train: bool = False, t=None, noise=None):
    """Batch-mean NELBO terms, nats per example (see `nelbo`)."""
    return jax.tree.map(jnp.mean, self.nelbo(x, cond, train, t, noise))


def check_fused_head(config, network: nn.Module) -> None:
  """Raises ValueError if loss_chunk_size > 0 and `network` has no fused head."""
  if config.loss_chunk_size > 0 and not isinstance(network, layers.FusedHeadNetwork):
    raise ValueError(
        f"config.loss_chunk_size={config.loss_chunk_size} fuses the head with the loss, which "
        f"network {config.network!r} ({type(network).__name__}) cannot do; set it to 0.")


def build_model(config, network: nn.Module) -> MD4:
  """The MD4 module described by `config` around `network`.

  Raises:
    ValueError: a bad schedule name, or loss_chunk_size > 0 with a network
      that is not a layers.FusedHeadNetwork.
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
  )
