"""The network contract: what the diffusion models need from a denoising network.

Every network is a Flax linen module called as

  logits = network(z, t, cond=None, train=False)

  z:      [B, *data_shape] int tokens in [0, V]; V = vocab_size is the mask id.
  t:      [B] float times in [0, 1].
  cond:   [B] int class labels in [0, classes), or None.
  train:  enables dropout (rng stream 'dropout').
  logits: [B, *data_shape, V] float32, over the V real tokens.

A network whose last layer is a per-position linear head may also declare it
(`FusedHeadNetwork`): the loss can then apply the head to a chunk of positions,
or to the masked positions only (diffusion/fused_head.py).
"""

from typing import Optional, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from md4_jax.networks import layers


class HeadInputs(NamedTuple):
  """A network's output before its final linear layer (`FusedHeadNetwork.features`).

  logits = h @ kernel + bias, computed by `linear_head` in h's dtype, so a loss
  can apply the head a chunk of positions at a time and never hold all
  [B, N, V] logits (see diffusion/fused_head.py).

  Attributes:
    h: [B, *data_shape, D] final features, in the activation dtype.
    kernel: [D, V'] head weights (parameter dtype): V' = V, or V rounded up so the
      vocabulary splits over a mesh axis (the transformer's vocab_multiple).
    bias: [V'] head bias (parameter dtype), or None for a head without one.
    vocab_size: V when the head has V' > V columns (None: V' = V). The padding
      columns are never a token: `logits` sets them to the dtype's lowest value, so
      they take no probability in any softmax or cross-entropy and get no gradient.
  """

  h: Array
  kernel: Array
  bias: Optional[Array]
  vocab_size: Optional[int] = None

  @property
  def num_tokens(self) -> int:
    """V: the real tokens (the head's first V columns)."""
    return self.kernel.shape[-1] if self.vocab_size is None else self.vocab_size

  def logits(self, h: Array) -> Array:
    """[..., D] features (e.g. a chunk of `self.h`) -> [..., V'] logits, the padding
    columns (if any) at the dtype's lowest value."""
    out = linear_head(h, self.kernel, self.bias)
    if self.num_tokens < out.shape[-1]:
      real = jnp.arange(out.shape[-1]) < self.num_tokens
      out = jnp.where(real, out, jnp.finfo(out.dtype).min)
    return layers.constrain(out, layers.ACTIVATION_BxLxV) if out.ndim == 3 else out


class FusedHeadNetwork:
  """The interface of a network whose last layer is a per-position linear head.

  Such a network offers, besides `__call__(z, t, cond, train) -> logits`,
  `features(z, t, cond, train) -> HeadInputs`: the features and the head's
  parameters, so the loss can fuse the head with the cross-entropy
  (`MD4.loss_chunk_size`). A network declares it by inheriting this class;
  `model.build_model` refuses `loss_chunk_size > 0` for any other network.
  """

  def features(self, z: Array, t: Array, cond: Optional[Array] = None,
               train: bool = False) -> HeadInputs:
    raise NotImplementedError


def linear_head(h: Array, kernel: Array, bias: Array) -> Array:
  """h @ kernel + bias in h's dtype: the same ops as the head's DenseGeneral.

  Args:
    h: [..., D] features.
    kernel: [D, V].
    bias: [V] or None.

  Returns:
    [..., V] logits in h.dtype.
  """
  h, kernel = nn.dtypes.promote_dtype(h, kernel, dtype=h.dtype)
  out = layers.flat_dot_general(h, kernel, (((h.ndim - 1,), (0,)), ((), ())))
  if bias is None:
    return out
  return out + bias.astype(h.dtype).reshape((1,) * (out.ndim - 1) + bias.shape)
