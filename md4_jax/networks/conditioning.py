"""Time and class conditioning (`Conditioning`): c = TimeEmbedding(t) + LabelEmbedding(cond),
or the MD4 paper's c = TimeMLP([sinusoid(t) | LabelEmbedding(cond)]) (LABEL_CONDS), and the
adaLN / FiLM `modulate` that applies it."""

import math
from typing import Any, Mapping, Optional

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


# sinusoid value -> (frequency exponent denominator for half = dim // 2, order of the
# features): frequencies max_period^(-i / denominator), i = 0 .. half - 1.
SINUSOIDS = {
    # The MD4 paper's (its backward.py): 10000^(-i / (half - 1)), features [sin | cos].
    "md4": (lambda half: half - 1, ("sin", "cos")),
    # DiT / ADM's (md4_jax's own before the paper option): 10000^(-i / half), [cos | sin].
    "dit": (lambda half: half, ("cos", "sin")),
}


def check_sinusoid(name: str, what: str = "sinusoid") -> None:
  """Raises a one-line ValueError unless `name` is a key of SINUSOIDS."""
  layers.check_choice(name, SINUSOIDS, what)


def timestep_embedding(
    t_B: Array, dim: int, max_period: float = 10_000.0, sinusoid: str = "dit"
) -> Array:
  """Sinusoidal embedding of TIME_SCALE * t (float32).

  Args:
    t_B: [B] times in [0, 1].
    dim: embedding width (even or odd; odd widths get one zero pad; 'md4' needs dim > 3).
    max_period: longest period of the sinusoids.
    sinusoid: key of SINUSOIDS (frequencies and feature order).

  Returns:
    [B, dim] float32 features: 'md4' [sin(1000 t w_i) | cos(1000 t w_i)] with
    w_i = max_period^(-i / (half - 1)); 'dit' [cos | sin] with w_i = max_period^(-i / half).
  """
  check_sinusoid(sinusoid)
  denominator, order = SINUSOIDS[sinusoid]
  half = dim // 2
  if denominator(half) < 1:
    raise ValueError(f"sinusoid {sinusoid!r} needs more features than {dim}.")
  freqs_H = jnp.exp(
      -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / denominator(half)
  )
  args_BxH = (TIME_SCALE * t_B.astype(jnp.float32))[:, None] * freqs_H[None, :]
  parts = {"sin": jnp.sin(args_BxH), "cos": jnp.cos(args_BxH)}
  emb_BxD = jnp.concatenate([parts[name] for name in order], axis=-1)
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
  """Sinusoid of 1000 t [| extra features] -> Dense -> swish -> Dense.

  Attributes:
    features: output width (the conditioning width).
    frequency_dim: width of the sinusoidal features.
    hidden: width of the hidden layer (0 = features).
    sinusoid: key of SINUSOIDS.
  """

  features: int
  frequency_dim: int = 256
  hidden: int = 0
  sinusoid: str = "dit"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B: Array, extra_BxF: Optional[Array] = None) -> Array:
    """[B] times (and [B, F] features concatenated after the sinusoid, e.g. the label
    embedding of LABEL_CONDS 'concat') -> [B, features] embedding in `dtype`."""
    h = timestep_embedding(t_B, self.frequency_dim, sinusoid=self.sinusoid).astype(self.dtype)
    if extra_BxF is not None:
      h = jnp.concatenate([h, extra_BxF.astype(self.dtype)], axis=-1)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.hidden or self.features, (None, "mlp"), name="dense_0", **kw)(h)
    h = nn.swish(h)
    return layers.dense(self.features, ("mlp", "cond"), name="dense_1", **kw)(h)


# param_init value -> how the networks initialise what the two designs initialise differently
# (embedding tables, the text MLP, the UNet attention output, the UViT position table; each
# network's docstring lists its own).
INITS = {
    # The MD4 paper's code: Flax's default embedding init (std 1 / sqrt(features)), the text
    # MLP's kernels scaled to variance 2 / (depth * fan_in), default-initialised attention
    # outputs, the DiT position table with the column encoding first.
    "md4": "the MD4 paper's (its reference implementation's)",
    # md4_jax's own: GPT-2-style std 0.02 token / label embeddings, std 1 image value
    # embeddings, lecun MLP kernels, zero-initialised UNet attention outputs, rows first.
    "md4_jax": "md4_jax's own",
}


def check_init(name: str, what: str = "init") -> None:
  """Raises a one-line ValueError unless `name` is a key of INITS."""
  layers.check_choice(name, INITS, what)


def embedding_init(init: str, own_stddev: float):
  """The embedding-table initialiser of INITS[init]: Flax's default (normal with std
  1 / sqrt(features), as nn.Embed) for 'md4', normal(own_stddev) for 'md4_jax'."""
  check_init(init)
  if init == "md4":
    return nn.linear.default_embed_init
  return nn.initializers.normal(stddev=own_stddev)


class LabelEmbedding(nn.Module):
  """Class-label embedding with an extra 'no label' row.

  Row `num_classes` stands for "no label" and is used when cond is None, so the
  parameters exist whatever init saw and the network can be run unconditionally
  (e.g. for classifier-free guidance).

  Attributes:
    num_classes: number of real labels (> 0).
    features: embedding width.
    param_init: key of INITS (std 0.02, or Flax's default: 1 / sqrt(features)).
  """

  num_classes: int
  features: int
  param_init: str = "md4_jax"
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
        embedding_init=layers.partitioned(embedding_init(self.param_init, 0.02), (None, "cond")),
        name="embedding",
    )(cond_B)


# label_cond value -> where the class-label embedding joins the time embedding.
LABEL_CONDS = {
    "concat": "the MD4 paper's: [sinusoid(t) | label] -> time MLP",
    "add": "md4_jax's own: time MLP(sinusoid(t)) + label",
}


def check_kwargs(kwargs: Mapping[str, Any], group: str) -> None:
  """A network's `sinusoid`, `label_cond` and `param_init` are known (one-line ValueErrors naming
  the config `group`)."""
  check_sinusoid(kwargs["sinusoid"], f"{group}.sinusoid")
  layers.check_choice(kwargs["label_cond"], LABEL_CONDS, f"{group}.label_cond")
  check_init(kwargs["param_init"], f"{group}.param_init")


class Conditioning(nn.Module):
  """Builds the conditioning vector from t and the class label.

  label_cond 'add': c = TimeEmbedding(t) [if time_features == 't'] + LabelEmbedding(cond)
  [if num_classes > 0]; 'concat' (the MD4 paper's): c = TimeEmbedding(t, LabelEmbedding(cond)),
  the label embedding concatenated with the sinusoid before the time MLP. Without time
  features c is the label embedding either way. Returns None when neither applies, so the
  network can use its unconditioned path; with time_features == 'none' t is never read.
  With num_classes == 0 a given `cond` is ignored. Parameters: 'time' (dense_0, dense_1),
  'label' (embedding); 'concat' widens time/dense_0's input by `features`.

  Attributes:
    features: conditioning width.
    time_features: key of TIME_FEATURES.
    num_classes: number of class labels (0 = unconditional).
    time_embedding: key of TIME_EMBEDDINGS (the time MLP's widths).
    sinusoid: key of SINUSOIDS.
    label_cond: key of LABEL_CONDS.
    param_init: key of INITS (the label embedding's).
  """

  features: int
  time_features: str = "t"
  num_classes: int = 0
  time_embedding: str = "dit"
  sinusoid: str = "dit"
  label_cond: str = "add"
  param_init: str = "md4_jax"
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
    layers.check_choice(self.label_cond, LABEL_CONDS, "label_cond")
    y_BxD = None
    if self.num_classes > 0:
      y_BxD = LabelEmbedding(
          self.num_classes, self.features, self.param_init, name="label", **kw
      )(cond_B, batch_size)
    if not check_time_features(self.time_features):
      return y_BxD
    t_B = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch_size,))
    frequency_dim, hidden = time_embedding_widths(self.time_embedding, self.features)
    time = TimeEmbedding(self.features, frequency_dim, hidden, self.sinusoid, name="time", **kw)
    if self.label_cond == "concat":
      return time(t_B, y_BxD)
    c_BxD = time(t_B)
    return c_BxD if y_BxD is None else c_BxD + y_BxD


