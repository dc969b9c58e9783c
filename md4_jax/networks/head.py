"""The output head: a per-position linear layer that can hand out its parameters."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import Array

from md4_jax.networks import contract
from md4_jax.networks import layers

Dtype = layers.Dtype


class LinearHead(nn.Module):
  """Dense(features) over the last axis that can also hand out its parameters.

  Parameters 'kernel' [D, V] ('embed', 'vocab') and 'bias' [V] ('vocab',), as
  a `dense(features, ('embed', 'vocab'))` would create them.

  Attributes:
    features: V' columns (V, or V rounded up: see `padded`).
    vocab_size: V, the real tokens, when features > V (None: features = V).
    use_bias: whether the head has a bias (the MD4 paper's has none).
    zero_init: zero-initialised kernel (the paper's; every logit starts at 0,
      the uniform prediction) instead of lecun_normal.
  """

  features: int
  vocab_size: Optional[int] = None
  use_bias: bool = True
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def inputs(self, h: Array) -> contract.HeadInputs:
    """[..., D] -> contract.HeadInputs (h in `dtype`, the head's parameters)."""
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    kernel = self.param(
        "kernel",
        layers.partitioned(init, ("embed", "vocab")),
        (h.shape[-1], self.features),
        self.param_dtype,
    )
    bias = None
    if self.use_bias:
      bias = self.param(
          "bias",
          layers.partitioned(nn.initializers.zeros, ("vocab",)),
          (self.features,),
          self.param_dtype,
      )
    return contract.HeadInputs(h.astype(self.dtype), kernel, bias, self.vocab_size)

  def __call__(self, h: Array) -> Array:
    """[..., D] -> [..., V'] logits in `dtype` (padding columns at the lowest value)."""
    heads = self.inputs(h)
    return heads.logits(heads.h)


def padded(n: int, multiple: int) -> int:
  """n rounded up to a multiple of `multiple` (>= 1)."""
  return -(-n // multiple) * multiple
