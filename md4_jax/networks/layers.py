"""Pieces shared by the denoising networks.

Time and class conditioning, norms and small helpers. Everything here takes
explicit arguments; nothing reads a config.

Logical axis names used on parameters in this file (see also transformer.py and
unet.py; `md4_jax/parallel.py` maps them to mesh axes, unknown names replicate):
  'vocab'  rows of a token embedding table / logits.
  'embed'  the model width (residual stream, embedding features, conv inputs).
  'mlp'    hidden units of an MLP / conv output channels.
  'cond'   width of the conditioning vector (time + label embedding).
  'heads'  attention heads (query/key/value/out projections).
  'kv'     per-head width (query/key/value/out projections).
  'norm'   scale and bias vectors of a norm layer.
  None     an axis left replicated.
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4_jax.networks import group_norm as group_norm_lib

Array = jax.Array
Dtype = Any

# time_features value -> whether the network sees t. 'none' networks must not
# depend on t at all (not even through a constant path).
TIME_FEATURES = {
    "t": True,  # Sinusoidal embedding of 1000 * t through a 2-layer MLP.
    "none": False,  # Ignore t entirely.
}

# Scale applied to t in [0, 1] before the sinusoid, so the frequencies match
# the usual integer-timestep embeddings (DDPM, DiT).
TIME_SCALE = 1000.0


# remat_policy value -> jax.checkpoint policy (what a block keeps for the
# backward pass; everything else is recomputed). 'none' = no rematerialisation.
REMAT_POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    "none": None,  # Keep every intermediate (fastest, most memory).
    "full": jax.checkpoint_policies.nothing_saveable,  # Keep only block inputs.
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # Keep all matmul outputs.
    # Keep weight matmuls (projections, MLP); recompute attention scores/probs.
    "dots_with_no_batch_dims_saveable": (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ),
}

# attention_impl value -> how jax.nn.dot_product_attention runs.
ATTENTION_IMPLS = (
    "xla",  # Plain XLA einsum/softmax: any backend, any dtype.
    "cudnn",  # cuDNN fused (flash) attention: GPU, bf16/fp16, head_dim <= 128.
    "auto",  # cudnn when those conditions hold (GPU, half precision), else xla.
    # XLA attention over ATTENTION_CHUNK queries at a time, rematerialised:
    # the backward pass holds one chunk's [B, H, chunk, L] scores, not all.
    "chunked",
)
ATTENTION_CHUNK = 128  # Queries per chunk of 'chunked' attention.


def check_choice(value: str, valid, what: str) -> None:
  """Raises a one-line ValueError unless `value` is one of `valid` (names `what`)."""
  if value not in valid:
    raise ValueError(f"Unknown {what} {value!r}; valid: {sorted(valid)}.")


def check_remat_policy(name: str) -> None:
  """Raises ValueError unless `name` is a key of REMAT_POLICIES."""
  check_choice(name, REMAT_POLICIES, "remat_policy")


def remat(module_cls, policy: str, static_argnums=(), prevent_cse=True):
  """`module_cls` rematerialised with REMAT_POLICIES[policy] ('none': as is)."""
  check_remat_policy(policy)
  if policy == "none":
    return module_cls
  return nn.remat(
      module_cls,
      policy=REMAT_POLICIES[policy],
      prevent_cse=prevent_cse,
      static_argnums=static_argnums,
  )


def check_attention_impl(name: str) -> None:
  """Raises ValueError unless `name` is one of ATTENTION_IMPLS."""
  check_choice(name, ATTENTION_IMPLS, "attention_impl")


def resolve_attention_impl(name: str, dtype, head_dim: int) -> Optional[str]:
  """The `implementation` argument for jax.nn.dot_product_attention.

  'auto' picks cuDNN only where it is known to apply (GPU backend, bf16/fp16
  activations, head_dim a multiple of 8 and at most 128); jax's own default
  (implementation=None) is the XLA path on every backend.
  """
  check_attention_impl(name)
  if name == "chunked":
    return "xla"
  if name != "auto":
    return name
  fused = (
      jax.default_backend() == "gpu"
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and head_dim % 8 == 0
      and head_dim <= 128
  )
  return "cudnn" if fused else "xla"


# Logical names of activation axes, for nn.with_logical_constraint (the rules
# table maps them to mesh axes; they are no-ops unless traced under both
# nn.logical_axis_rules(...) and a mesh context: parallel.logical_context(rules, mesh)).
ACTIVATION_BxLxD = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_BxLxV = ("activation_batch", "activation_length", "activation_vocab")
ACTIVATION_BxHxWxC = ("activation_batch", None, None, "activation_embed")


def xla_attention(q: Array, k: Array, v: Array) -> Array:
  """Full (bidirectional) softmax attention in plain XLA ops, heads folded into the batch.

  softmax(q k^T / sqrt(K)) v computed as [B*H, L, K] batched matmuls with a
  float32 softmax (max-subtracted): the same values as
  jax.nn.dot_product_attention(implementation='xla'), whose [B, L, H, K]
  einsums make XLA:CPU transpose inside both matmuls and their gradients
  (benchmarks: 1.8x slower forward and backward at L = 256, 12 heads of 64).

  Args:
    q, k, v: [B, L, H, K] (k, v may have another length S).

  Returns:
    [B, L, H, K] in q's dtype.
  """
  b, length, h, d = q.shape
  span = k.shape[1]
  fold = lambda a, n: jnp.swapaxes(a, 1, 2).reshape(b * h, n, d)
  q_NxLxK = fold(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), length)
  k_NxSxK, v_NxSxK = fold(k, span), fold(v, span)
  s_NxLxS = jax.lax.dot_general(q_NxLxK, k_NxSxK, (((2,), (2,)), ((0,), (0,))),
                                preferred_element_type=jnp.float32)
  p_NxLxS = jax.nn.softmax(s_NxLxS, axis=-1).astype(v.dtype)
  o_NxLxK = jax.lax.dot_general(p_NxLxS, v_NxSxK, (((2,), (1,)), ((0,), (0,))))
  return jnp.swapaxes(o_NxLxK.reshape(b, h, length, d), 1, 2).astype(q.dtype)


def chunked_attention(q: Array, k: Array, v: Array, chunk: int) -> Array:
  """jax.nn.dot_product_attention (XLA) a chunk of queries at a time.

  A rematerialised lax.map over query chunks: each query row sees all keys,
  so the output equals the unchunked one; the backward pass recomputes one
  chunk's scores at a time and only the dK/dV summation order changes.

  Args:
    q, k, v: [B, L, H, K].
    chunk: queries per chunk; L not divisible by it runs unchunked.

  Returns:
    [B, L, H, K].
  """
  b, length, h, d = q.shape
  if length <= chunk or length % chunk:
    return xla_attention(q, k, v)
  q_NxBxCxHxK = q.reshape(b, length // chunk, chunk, h, d).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(q_BxCxHxK):
    return xla_attention(q_BxCxHxK, k, v)

  o_NxBxCxHxK = jax.lax.map(one_chunk, q_NxBxCxHxK)
  return o_NxBxCxHxK.swapaxes(0, 1).reshape(b, length, h, d)


def constrain(x: Array, names: tuple) -> Array:
  """nn.with_logical_constraint(x, names): a sharding hint under rules + mesh."""
  return nn.with_logical_constraint(x, names)


def check_time_features(time_features: str) -> bool:
  """Returns whether `time_features` uses t; raises ValueError if unknown."""
  if time_features not in TIME_FEATURES:
    raise ValueError(
        f"Unknown time_features {time_features!r}; valid: "
        f"{sorted(TIME_FEATURES)}."
    )
  return TIME_FEATURES[time_features]


class _Partitioned(nn.LogicallyPartitioned):
  """nn.LogicallyPartitioned that skips its sharding constraint on a reshaped value.

  nn.DenseGeneral initialises a kernel with features (K, D) flattened to 2-D
  and unboxes it before the reshape; under a mesh context the stock box would
  constrain the 2-D value with the 3 logical names and fail.
  """

  def unbox(self, apply_constraint=True):
    if len(self.names) != jnp.ndim(self.value):
      apply_constraint = False
    return super().unbox(apply_constraint=apply_constraint)


def partitioned(init_fn, names):
  """`nn.with_logical_partitioning(init_fn, names)` that also works inside
  DenseGeneral under a mesh context (see _Partitioned)."""
  names = tuple(names)

  @functools.wraps(init_fn)
  def wrapper(*args, **kwargs):
    return _Partitioned(init_fn(*args, **kwargs), names)
  return wrapper


def flat_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                     preferred_element_type=None) -> Array:
  """lax.dot_general computed as one 2-D matmul when it is a plain projection.

  A projection contracts the trailing axes of lhs (activations [B, L, ...]) with
  the leading axes of rhs (a kernel), without batch axes. Reshaping both to
  matrices makes the forward AND the backward pass 2-D matmuls: differentiated
  as is, the weight gradient contracts over two axes (B and L) and XLA:CPU
  lowers it through explicit transposes of the activations and a slower dot
  (benchmarks/train.py: the MLP backward took 1.46x as long). Same values up to
  float summation order. Any other dimension numbers go to lax.dot_general.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(int(a) for a in lc), tuple(int(a) for a in rc)
  n = len(lc)
  if (lb or rb or lc != tuple(range(lhs.ndim - n, lhs.ndim)) or rc != tuple(range(n))
      or lhs.ndim - n < 1):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  free, contract, out = lhs.shape[:-n], lhs.shape[-n:], rhs.shape[n:]
  k = math.prod(contract)
  y = jax.lax.dot_general(lhs.reshape(-1, k), rhs.reshape(k, -1), (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(free + out)


def dense(
    features,
    names,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
    kernel_init=nn.initializers.lecun_normal(),
    axis=-1,
    name: Optional[str] = None,
) -> nn.DenseGeneral:
  """A DenseGeneral whose kernel (and bias) carry logical axis names.

  Args:
    features: output features, an int or a tuple.
    names: logical names of the kernel axes (inputs first, then outputs); the
      bias takes the output names.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    use_bias: whether to add a bias.
    kernel_init: kernel initialiser (before partitioning).
    axis: input axes contracted.
    name: module name.

  Returns:
    The (unbound) module.
  """
  n_out = len(features) if isinstance(features, (tuple, list)) else 1
  return nn.DenseGeneral(
      features=features,
      axis=axis,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=partitioned(kernel_init, tuple(names)),
      bias_init=partitioned(nn.initializers.zeros, tuple(names[-n_out:])),
      dot_general=flat_dot_general,
      name=name,
  )


def layer_norm(
    *, dtype: Dtype, param_dtype: Dtype, affine: bool = True, name=None
) -> nn.LayerNorm:
  """LayerNorm over the last axis; `affine=False` for adaLN (no scale/bias)."""
  return nn.LayerNorm(
      epsilon=1e-6,
      use_scale=affine,
      use_bias=affine,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=partitioned(nn.initializers.ones, ("norm",)),
      bias_init=partitioned(nn.initializers.zeros, ("norm",)),
      name=name,
  )


def num_groups(channels: int, max_groups: int = 32) -> int:
  """Largest divisor of `channels` that is at most `max_groups`."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def group_norm(
    channels: int, *, dtype: Dtype, param_dtype: Dtype, activation: Optional[str] = None,
    name=None
) -> nn.Module:
  """GroupNorm with min(32, channels) groups, or the largest divisor below, and an
  optional fused activation (group_norm.GroupNorm: nn.GroupNorm's parameters and
  values in fewer passes over the activations)."""
  return group_norm_lib.GroupNorm(
      num_groups=num_groups(channels),
      epsilon=1e-6,
      activation=activation,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=partitioned(nn.initializers.ones, ("norm",)),
      bias_init=partitioned(nn.initializers.zeros, ("norm",)),
      name=name,
  )


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
  check_choice(name, TIME_EMBEDDINGS, "time_embedding")
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
    h = dense(self.hidden or self.features, (None, "mlp"), name="dense_0", **kw)(h)
    h = nn.swish(h)
    return dense(self.features, ("mlp", "cond"), name="dense_1", **kw)(h)


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
        embedding_init=partitioned(
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


class SelfAttention(nn.Module):
  """Bidirectional multi-head self-attention via jax.nn.dot_product_attention.

  Attributes:
    num_heads: number of heads; the input width must be divisible by it.
    out_kernel_init: initialiser of the output projection (zeros for blocks
      that should start as the identity).
    attention_impl: one of ATTENTION_IMPLS ('auto': cuDNN flash attention on
      GPU in half precision, the XLA path elsewhere).
    rope: rotary position embedding on queries and keys (`apply_rope`).
    qkv_bias: biases on the query/key/value projections (DiT); the output
      projection never has one.
  """

  num_heads: int
  out_kernel_init: Any = nn.initializers.lecun_normal()
  attention_impl: str = "xla"
  rope: bool = False
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    """[B, L, D] -> [B, L, D]; every position attends to every position."""
    width = x_BxLxD.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    def project(name):
      return dense(
          (self.num_heads, head_dim), ("embed", "heads", "kv"), name=name,
          **{**kw, "use_bias": self.qkv_bias},
      )(x_BxLxD)

    q_BxLxHxK = project("query")
    k_BxLxHxK = project("key")
    v_BxLxHxK = project("value")
    if self.rope:
      q_BxLxHxK, k_BxLxHxK = apply_rope(q_BxLxHxK), apply_rope(k_BxLxHxK)
    if self.attention_impl == "chunked":
      o_BxLxHxK = chunked_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, ATTENTION_CHUNK
      )
    else:
      impl = resolve_attention_impl(
          self.attention_impl, q_BxLxHxK.dtype, head_dim
      )
      if impl == "xla":
        o_BxLxHxK = xla_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
      else:
        o_BxLxHxK = jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation=impl
        )
    return dense(
        width,
        ("heads", "kv", "embed"),
        axis=(-2, -1),
        kernel_init=self.out_kernel_init,
        name="out",
        **kw,
    )(o_BxLxHxK)


ROPE_THETA = 10_000.0


def apply_rope(x_BxLxHxK: Array, theta: float = ROPE_THETA) -> Array:
  """Rotary position embedding: rotates the pairs (x_2i, x_2i+1) of every head
  by the angle position * theta^(-2i/K) (RoFormer / LLaMA, interleaved pairs).

  Relative by construction: <rope(q)_m, rope(k)_n> depends on m - n only.
  Computed in float32, returned in x's dtype.

  Args:
    x_BxLxHxK: [B, L, H, K] queries or keys, K even.

  Returns:
    [B, L, H, K].
  """
  b, length, h, k = x_BxLxHxK.shape
  if k % 2:
    raise ValueError(f"RoPE needs an even head width, got {k}.")
  inv_freq = theta ** (-jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angle_LxP = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angle_LxP)[None, :, None, :]  # [1, L, 1, K/2]: explicit ranks.
  sin = jnp.sin(angle_LxP)[None, :, None, :]
  pairs = x_BxLxHxK.astype(jnp.float32).reshape(b, length, h, k // 2, 2)
  real, imag = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return rotated.reshape(b, length, h, k).astype(x_BxLxHxK.dtype)
