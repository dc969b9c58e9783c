"""Bidirectional self-attention: the kernels (XLA, chunked, cuDNN) and rotary positions.

`SelfAttention` projects to heads, optionally rotates queries and keys (RoPE,
`apply_rope`) and runs the kernel named by `attention_impl` (ATTENTION_IMPLS).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4_jax.networks import backend
from md4_jax.networks import layers

Array = jax.Array
Dtype = layers.Dtype

# attention_impl value -> how jax.nn.dot_product_attention runs.
ATTENTION_IMPLS = (
    "xla",  # Plain XLA einsum/softmax: any backend, any dtype.
    "cudnn",  # cuDNN fused (flash) attention: GPU, bf16/fp16, head_dim <= 128.
    "auto",  # cudnn on GPU in half precision, pallas on TPU, else xla (resolve_attention_impl).
    # XLA attention over ATTENTION_CHUNK queries at a time, rematerialised:
    # the backward pass holds one chunk's [B, H, chunk, L] scores, not all.
    "chunked",
    # JAX's Pallas TPU flash-attention kernel (jax.experimental.pallas.ops.tpu): TPU only
    # (elsewhere in Pallas interpret mode, for tests); no attention-probability dropout.
    "pallas",
)
ATTENTION_CHUNK = 128  # Queries per chunk of 'chunked' attention.
FLASH_BLOCK = 128  # Query and key block of the Pallas kernel; lengths are padded to it.


def check_attention_impl(name: str) -> None:
  """Raises ValueError unless `name` is one of ATTENTION_IMPLS."""
  layers.check_choice(name, ATTENTION_IMPLS, "attention_impl")


def resolve_attention_impl(name: str, dtype, head_dim: int) -> str:
  """The kernel `name` runs: one of ATTENTION_IMPLS except 'auto'.

  'auto' picks cuDNN where it is known to apply (GPU, bf16/fp16 activations,
  head_dim a multiple of 8 and at most 128), JAX's Pallas flash-attention
  kernel on TPU (less HBM than XLA's attention at L = 1024: the scores are
  never stored; benchmarks/RESULTS.md), and XLA's attention elsewhere. The
  platform is the traced-for one (`backend.platform`), not the host's.
  """
  check_attention_impl(name)
  if name != "auto":
    return name
  platform = backend.platform()
  if platform == "tpu":
    return "pallas"
  fused = (
      platform == "gpu"
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and head_dim % 8 == 0
      and head_dim <= 128
  )
  return "cudnn" if fused else "xla"


def drop_probabilities(p: Array, rate: float, key: Optional[Array]) -> Array:
  """Attention probabilities with each entry dropped at `rate` and the rest scaled by
  1 / (1 - rate) (nn.Dropout's law; the MD4 paper's attention dropout). Identity without a key."""
  if key is None or rate <= 0.0:
    return p
  keep = jax.random.bernoulli(key, 1.0 - rate, p.shape)
  return jnp.where(keep, p / jnp.asarray(1.0 - rate, p.dtype), jnp.zeros((), p.dtype))


def xla_attention(q: Array, k: Array, v: Array, dropout_rate: float = 0.0,
                  dropout_key: Optional[Array] = None) -> Array:
  """Full (bidirectional) softmax attention in plain XLA ops.

  softmax(q k^T / sqrt(K)) v computed as batched matmuls over [B, H] (on CPU
  [B*H]: heads folded into the batch) with a float32 softmax (max-subtracted):
  the same values as jax.nn.dot_product_attention(implementation='xla'), whose
  [B, L, H, K] einsums make XLA:CPU transpose inside both matmuls and their
  gradients (benchmarks: 1.8x slower forward and backward at L = 256, 12 heads
  of 64).

  Args:
    q, k, v: [B, L, H, K] (k, v may have another length S).
    dropout_rate: attention-probability dropout (with `dropout_key`; drop_probabilities).
    dropout_key: PRNG key of the dropout mask; None = no dropout.

  Returns:
    [B, L, H, K] in q's dtype.
  """
  b, length, h, d = q.shape
  span = k.shape[1]
  # On CPU the heads fold into the batch (one batch dimension: no transposes inside the
  # matmuls). Elsewhere they stay a dimension of their own: folding a batch split over
  # `data` with heads split over `tensor` makes XLA gather the heads (tensor parallelism).
  fold = backend.platform() == "cpu"
  batch = (b * h,) if fold else (b, h)
  n = len(batch)  # Batch dimensions of the matmuls.
  dims = tuple(range(n))
  heads_first = lambda a, size: jnp.swapaxes(a, 1, 2).reshape(*batch, size, d)
  q_NxLxK = heads_first(q * jnp.asarray(1.0 / math.sqrt(d), q.dtype), length)
  k_NxSxK, v_NxSxK = heads_first(k, span), heads_first(v, span)
  s_NxLxS = jax.lax.dot_general(q_NxLxK, k_NxSxK, (((n + 1,), (n + 1,)), (dims, dims)),
                                preferred_element_type=jnp.float32)
  p_NxLxS = drop_probabilities(jax.nn.softmax(s_NxLxS, axis=-1), dropout_rate, dropout_key)
  p_NxLxS = p_NxLxS.astype(v.dtype)
  o_NxLxK = jax.lax.dot_general(p_NxLxS, v_NxSxK, (((n + 1,), (n,)), (dims, dims)))
  return jnp.swapaxes(o_NxLxK.reshape(b, h, length, d), 1, 2).astype(q.dtype)


def chunked_attention(q: Array, k: Array, v: Array, chunk: int, dropout_rate: float = 0.0,
                      dropout_key: Optional[Array] = None) -> Array:
  """jax.nn.dot_product_attention (XLA) a chunk of queries at a time.

  A rematerialised lax.map over query chunks: each query row sees all keys,
  so the output equals the unchunked one; the backward pass recomputes one
  chunk's scores at a time and only the dK/dV summation order changes.

  Args:
    q, k, v: [B, L, H, K].
    chunk: queries per chunk; L not divisible by it runs unchunked.
    dropout_rate, dropout_key: attention-probability dropout as in xla_attention (one key
      per chunk, folded in from `dropout_key`).

  Returns:
    [B, L, H, K].
  """
  b, length, h, d = q.shape
  if length <= chunk or length % chunk:
    return xla_attention(q, k, v, dropout_rate, dropout_key)
  num_chunks = length // chunk
  q_NxBxCxHxK = q.reshape(b, num_chunks, chunk, h, d).swapaxes(0, 1)
  if dropout_key is None:
    keys = jnp.zeros((num_chunks,), jnp.int32)  # Unused placeholders.
  else:
    keys = jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(num_chunks))

  @jax.checkpoint
  def one_chunk(args):
    q_BxCxHxK, key = args
    return xla_attention(q_BxCxHxK, k, v, dropout_rate,
                         None if dropout_key is None else key)

  o_NxBxCxHxK = jax.lax.map(one_chunk, (q_NxBxCxHxK, keys))
  return o_NxBxCxHxK.swapaxes(0, 1).reshape(b, length, h, d)


def _tpu_interpret_mode() -> bool:
  """Inside jax.experimental.pallas.tpu.force_tpu_interpret_mode() (no public getter yet)."""
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  flag = getattr(jax_config, "pallas_tpu_interpret_mode_context_manager", None)
  return flag is not None and flag.value is not None


def pallas_flash_attention(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(K)) v by JAX's Pallas TPU flash-attention kernel.

  The kernel works on FLASH_BLOCK-sized query and key blocks and never holds
  the [L, S] scores; its backward pass recomputes them block by block. Lengths
  that are not a multiple of the block are padded, and the padding is masked
  out of every real query's softmax with the kernel's segment ids (real
  positions 1, padding 0). On a TPU it compiles to Mosaic; elsewhere it runs
  only inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (tests).

  Args:
    q, k, v: [B, L, H, K] (k, v may have another length S).

  Returns:
    [B, L, H, K] in q's dtype.
  """
  if backend.platform() != "tpu" and not _tpu_interpret_mode():
    raise ValueError("attention_impl='pallas' is JAX's TPU kernel: it compiles for TPU devices "
                     f"only (this traces for {backend.platform()}); use xla, chunked or auto.")
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # pylint: disable=g-import-not-at-top
  b, length, _, d = q.shape
  span = k.shape[1]
  padded = lambda n: -(-n // FLASH_BLOCK) * FLASH_BLOCK
  lq, lk = padded(length), padded(span)
  def heads_first(a, n):  # [B, L, H, K] -> [B, H, n, K], zero-padded.
    a = jnp.swapaxes(a, 1, 2)
    return jnp.pad(a, ((0, 0), (0, 0), (0, n - a.shape[2]), (0, 0)))
  segment_ids = None
  if (lq, lk) != (length, span):
    real = lambda n, m: jnp.broadcast_to((jnp.arange(n) < m).astype(jnp.int32), (b, n))
    segment_ids = tpu_flash.SegmentIds(q=real(lq, length), kv=real(lk, span))
  blocks = tpu_flash.BlockSizes(
      block_q=FLASH_BLOCK, block_k_major=FLASH_BLOCK, block_k=FLASH_BLOCK, block_b=1,
      block_q_major_dkv=FLASH_BLOCK, block_k_major_dkv=FLASH_BLOCK, block_k_dkv=FLASH_BLOCK,
      block_q_dkv=FLASH_BLOCK, block_k_major_dq=FLASH_BLOCK, block_k_dq=FLASH_BLOCK,
      block_q_dq=FLASH_BLOCK)

  def kernel(q, k, v, segment_ids):  # One shard's examples and heads.
    o_BxHxLxK = tpu_flash.flash_attention(
        heads_first(q, lq), heads_first(k, lk), heads_first(v, lk), segment_ids=segment_ids,
        sm_scale=1.0 / math.sqrt(d), block_sizes=blocks)
    return jnp.swapaxes(o_BxHxLxK[:, :, :q.shape[1]], 1, 2).astype(q.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:  # Not under a mesh (one device, or shapes only).
    return kernel(q, k, v, segment_ids)
  # A Mosaic kernel is not partitioned by XLA: run it per shard, over the batch's and the
  # heads' mesh axes (each example and head attends alone), where they divide.
  spec = layers.fit_spec(nn.logical_to_mesh_axes(("activation_batch", None, "heads", None)),
                         q.shape, mesh)
  seg_spec = None if segment_ids is None else tpu_flash.SegmentIds(
      q=jax.P(spec[0], None), kv=jax.P(spec[0], None))
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, seg_spec),
                       out_specs=spec, check_vma=False)(q, k, v, segment_ids)


class SelfAttention(nn.Module):
  """Bidirectional multi-head self-attention via jax.nn.dot_product_attention.

  Attributes:
    num_heads: number of heads; the input width must be divisible by it.
    out_kernel_init: initialiser of the output projection (zeros for blocks
      that should start as the identity).
    attention_impl: one of ATTENTION_IMPLS ('auto': cuDNN flash attention on
      GPU in half precision, the Pallas flash-attention kernel on TPU, the XLA path
      elsewhere).
    rope: rotary position embedding on queries and keys (`apply_rope`).
    qkv_bias: biases on the query/key/value projections (DiT, the paper's UNet).
    out_bias: a bias on the output projection (the paper's UNet).
    dropout_rate: attention-probability dropout with train=True (the MD4 paper's text
      transformer and DiT blocks). It needs the probabilities: the XLA or chunked kernel
      ('auto' takes XLA then; 'cudnn' is refused).
  """

  num_heads: int
  out_kernel_init: Any = nn.initializers.lecun_normal()
  attention_impl: str = "xla"
  rope: bool = False
  qkv_bias: bool = False
  out_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: Array, train: bool = False) -> Array:
    """[B, L, D] -> [B, L, D]; every position attends to every position."""
    width = x_BxLxD.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} not divisible by {self.num_heads} heads")
    head_dim = width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    def project(name):
      return layers.dense(
          (self.num_heads, head_dim), ("embed", "heads", "kv"), name=name,
          **{**kw, "use_bias": self.qkv_bias},
      )(x_BxLxD)

    q_BxLxHxK = project("query")
    k_BxLxHxK = project("key")
    v_BxLxHxK = project("value")
    if self.rope:
      q_BxLxHxK, k_BxLxHxK = apply_rope(q_BxLxHxK), apply_rope(k_BxLxHxK)
    key = self.make_rng("dropout") if train and self.dropout_rate > 0.0 else None
    impl = resolve_attention_impl(self.attention_impl, q_BxLxHxK.dtype, head_dim)
    if key is not None and impl in ("cudnn", "pallas"):  # Fused: no probabilities to drop.
      if self.attention_impl != "auto":
        raise ValueError(f"attention_impl {self.attention_impl!r} has no attention-"
                         "probability dropout: use xla, chunked or auto.")
      impl = "xla"
    if impl == "chunked":
      o_BxLxHxK = chunked_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, ATTENTION_CHUNK, self.dropout_rate, key
      )
    elif impl == "pallas":
      o_BxLxHxK = pallas_flash_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK)
    elif impl == "xla":
      o_BxLxHxK = xla_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, self.dropout_rate, key)
    else:
      o_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation=impl
      )
    return layers.dense(
        width,
        ("heads", "kv", "embed"),
        axis=(-2, -1),
        kernel_init=self.out_kernel_init,
        name="out",
        **{**kw, "use_bias": self.out_bias},
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
