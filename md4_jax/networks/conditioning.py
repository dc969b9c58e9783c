"""Time and class conditioning: c = TimeEmbedding(t) + LabelEmbedding(cond) (`Conditioning`),
and the adaLN / FiLM `modulate` that applies it."""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4_jax.networks import layers

Array = jax.Array
Dtype = layers.Dtype

# time_features value -> whether the network sees t. 'none' networks must not
# depend on t at all (not even through a constant path).
TIME_FEATURES = {
    "t": True,  # Sinusoidal embedding of 1000 * t through a 2-layer MLP.
    "none": False,  # Ignore t entirely.
}

# Scale applied to t in [0, 1] before the sinusoid, so the frequencies match
# the usual integer-timestep embeddings (DDPM, DiT).
TIME_SCALE = 1000.0


def check_time_features(time_features: str) -> bool:
  """Returns whether `time_features` uses t; raises ValueError if unknown."""
  layers.check_choice(time_features, TIME_FEATURES, "time_features")
  return TIME_FEATURES[time_features]


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x * (1 + scale) + shift, with shift/scale already broadcastable in rank."""
  return x * (1 + scale) + shift


def timestep_embedding(
    t_B: Array, dim: int, max_period: float = 10_000.0
) -> Array:
  """Sinusoidal embedding of TIME_SCALE * t (float32).

  Args:
    t_B: [B] times in [0, 1].
    dim: embedding width (even or odd; odd widths get one zero pad).
    max_period: longest period of the sinusoids.

  Returns:
    [B, dim] float32 features [cos(...), sin(...)].
  """
  half = dim // 2
  freqs_H = jnp.exp(
      -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
  )
  args_BxH = (TIME_SCALE * t_B.astype(jnp.float32))[:, None] * freqs_H[None, :]
  emb_BxD = jnp.concatenate([jnp.cos(args_BxH), jnp.sin(args_BxH)], axis=-1)
  if dim % 2:
    emb_BxD = jnp.pad(emb_BxD, ((0, 0), (0, 1)))
  return emb_BxD


# time_embedding value -> (sinusoid width, hidden width) of the time MLP for a
# conditioning width E (0 = E).
TIME_EMBEDDINGS = {
    "dit": lambda e: (256, 0),  # DiT / DDPM: 256 sinusoid features -> E -> E.
    "md4": lambda e: (e, 4 * e),  # The MD4 paper's networks: E features -> 4E -> E.
}


def time_embedding_widths(name: str, features: int) -> tuple[int, int]:
  """(frequency_dim, hidden) of TIME_EMBEDDINGS[name]; ValueError if unknown."""
  layers.check_choice(name, TIME_EMBEDDINGS, "time_embedding")
  return TIME_EMBEDDINGS[name](features)


class TimeEmbedding(nn.Module):
  """Sinusoid of 1000 t -> Dense -> swish -> Dense.

  Attributes:
    features: output width (the conditioning width).
    frequency_dim: width of the sinusoidal features.
    hidden: width of the hidden layer (0 = features).
  """

  features: int
  frequency_dim: int = 256
  hidden: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B: Array) -> Array:
    """[B] times -> [B, features] embedding in `dtype`."""
    h = timestep_embedding(t_B, self.frequency_dim).astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.hidden or self.features, (None, "mlp"), name="dense_0", **kw)(h)
    h = nn.swish(h)
    return layers.dense(self.features, ("mlp", "cond"), name="dense_1", **kw)(h)


class LabelEmbedding(nn.Module):
  """Class-label embedding with an extra 'no label' row.

  Row `num_classes` stands for "no label" and is used when cond is None, so the
  parameters exist whatever init saw and the network can be run unconditionally
  (e.g. for classifier-free guidance).

  Attributes:
    num_classes: number of real labels (> 0).
    features: embedding width.
  """

  num_classes: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, cond_B: Optional[Array], batch_size: int) -> Array:
    """[B] int labels (or None) -> [B, features]."""
    if cond_B is None:
      cond_B = jnp.full((batch_size,), self.num_classes, dtype=jnp.int32)
    return nn.Embed(
        self.num_classes + 1,
        self.features,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=layers.partitioned(
            nn.initializers.normal(stddev=0.02), (None, "cond")
        ),
        name="embedding",
    )(cond_B)


class Conditioning(nn.Module):
  """Builds the conditioning vector from t and the class label.

  c = TimeEmbedding(t) [if time_features == 't'] + LabelEmbedding(cond)
  [if num_classes > 0]. Returns None when neither applies, so the network can
  use its unconditioned path; with time_features == 'none' t is never read.
  With num_classes == 0 a given `cond` is ignored.

  Attributes:
    features: conditioning width.
    time_features: key of TIME_FEATURES.
    num_classes: number of class labels (0 = unconditional).
    time_embedding: key of TIME_EMBEDDINGS (the time MLP's widths).
  """

  features: int
  time_features: str = "t"
  num_classes: int = 0
  time_embedding: str = "dit"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, cond_B: Optional[Array], batch_size: int):
    """Returns [B, features] in `dtype`, or None when there is nothing to use.

    Args:
      t: [B] (or scalar) times in [0, 1].
      cond_B: [B] int labels in [0, num_classes), or None.
      batch_size: B.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c_BxD = None
    if check_time_features(self.time_features):
      t_B = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch_size,))
      frequency_dim, hidden = time_embedding_widths(self.time_embedding, self.features)
      c_BxD = TimeEmbedding(self.features, frequency_dim, hidden, name="time", **kw)(t_B)
    if self.num_classes > 0:
      y_BxD = LabelEmbedding(
          self.num_classes, self.features, name="label", **kw
      )(cond_B, batch_size)
      c_BxD = y_BxD if c_BxD is None else c_BxD + y_BxD
    return c_BxD


