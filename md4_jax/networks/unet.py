"""UNet for images of discrete channel values (the MD4 paper's image setup).

(z_t, t, cond) -> logits. Each channel value of z [B, H, W, C] (V levels plus
the mask id V) is embedded on its own with one shared table, the C embeddings
of a pixel are concatenated and a 3x3 conv stem maps them to `channels`.
Levels with channel multipliers `channel_mult` hold `num_res_blocks` residual
blocks each (GroupNorm, swish, conv; the conditioning vector enters by
scale/shift after the second GroupNorm, or as the paper's (VDM) shift after the first
conv, see FILMS; dropout; zero-initialised second conv),
self-attention where the spatial size is in `attn_resolutions`, a strided conv
between levels. A middle
block (res, attention, res) and the mirrored upsampling path with skip
connections follow; a final GroupNorm, swish and 3x3 conv give C * V channels,
reshaped to [B, H, W, C, V].

Without a conditioning vector (time_features='none' and no classes) the
residual blocks skip the scale/shift, so the output does not depend on t.

Logical axis names on parameters:
  'vocab'  embedding rows (V + 1)
  'embed'  conv input channels, attention width
  'mlp'    conv output channels (and FiLM / time-MLP outputs)
  'heads', 'kv'  attention projections
  'cond'   conditioning width (time/label embeddings, FiLM inputs)
  'norm'   GroupNorm scale/bias
  None     spatial kernel axes and the FiLM chunk axis (replicated)

Feature maps carry the logical constraint ('activation_batch', None, None,
'activation_embed') at every level boundary (a no-op without rules + mesh).
`remat_policy` rematerialises each residual and attention block with a
jax.checkpoint policy (layers.REMAT_POLICIES).
"""

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4_jax.networks import attention
from md4_jax.networks import backend
from md4_jax.networks import conditioning
from md4_jax.networks import layers

Array = jax.Array
Dtype = Any


def _conv(x: Array, w: Array, pads) -> Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def same_conv(x: Array, w: Array, pads) -> Array:
  """Stride-1 NHWC x HWIO convolution with XLA's forward and a faster weight gradient.

  The input gradient is XLA's forward convolution of the output gradient with
  the flipped, transposed kernel. The weight gradient
  dw[i, j] = Σ_{b,h,w} x_pad[b, h + i, w + j, :]^T g[b, h, w, :] replaces
  XLA:CPU's weight-gradient convolution (50 ms for 8 x 32 x 32 x 128, 3 x 3,
  where the forward takes 10) by matmuls; see _weight_grad. Same values up to
  float summation order.

  Args:
    x: [B, H, W, C]. w: [kh, kw, C, F]. pads: ((top, bottom), (left, right)) with
      top + bottom = kh - 1 and left + right = kw - 1 (output as large as the input).
  """
  return _conv(x, w, pads)


def _same_conv_fwd(x, w, pads):
  return _conv(x, w, pads), (x, w)


def _weight_grad(x: Array, g: Array, kh: int, kw: int, pads, method: str = "auto") -> Array:
  """Σ_{b,h,w} x_pad[b, h + i, w + j, :]^T g[b, h, w, :] for every tap (i, j): [kh, kw, C, F].

  x is the input [B, H, W, C], g the output gradient [B, H, W, F], pads the
  convolution's ((top, bottom), (left, right)) ('same' size: they sum to kh - 1,
  kw - 1). Two exact formulations (benchmarks, 8 x 32 x 32, 3 x 3, 2 CPU cores):
    'taps'  one [C, F] matmul per tap over a copied shifted slice of x_pad (kh * kw
            copies of x): 128 -> 768 (the image output conv): 84 ms vs 125 split.
    'split' one [kh * F, kw * C] matmul: x shifted along W with the kw taps side by
            side (kw copies of x) against g shifted along H, transposed, the kh taps
            stacked (kh copies of g); the product's (i, j) block is tap (i, j). The
            rows H + kh - 1 carry zeros where g is shifted out (1 - H / (H + kh - 1)
            extra FLOPs: 6 % at H = 32). 128 -> 128: 17 ms vs 33 per tap; 256 -> 128:
            38 vs 55; 384 -> 128: 51 vs 81. A per-tap product [C x F] over 8192 rows has
            too small an output for the matmul to run at speed.
  'auto' takes 'split' when F <= C (g's transposed copies are the expensive ones),
  'taps' otherwise (128 -> 256: 39 ms vs 42; 256 -> 256: equal).
  """
  b, h, wd, f = g.shape
  c = x.shape[-1]
  (top, bottom), (left, right) = pads
  if method == "auto":
    method = "split" if f <= c else "taps"
  if method == "taps":
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    g_MxF = g.reshape(-1, f)
    taps = [jax.lax.dot_general(xp[:, i:i + h, j:j + wd, :].reshape(-1, c), g_MxF,
                                (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            for i in range(kh) for j in range(kw)]
    return jnp.stack(taps).reshape(kh, kw, c, f)
  if method != "split":
    raise ValueError(f"Unknown weight-gradient method {method!r}; valid: auto, taps, split.")
  hp = h + kh - 1
  # u[(b, r, w), (j, c)] = x_pad[b, r, w + j, c]: [B * Hp * W, kw * C], each shift one
  # (negative where it crops) padding of x, written once.
  zero = jnp.zeros((), x.dtype)
  u = jnp.stack([jax.lax.pad(x, zero, ((0, 0, 0), (top, bottom, 0), (left - j, j - left, 0),
                                       (0, 0, 0))) for j in range(kw)], axis=3)
  u = u.reshape(-1, kw * c)
  # gs[(i, f), (b, r, w)] = g[b, r - i, w, f] (zero outside): [kh * F, B * Hp * W].
  g_FxBxHxW = jnp.pad(g.transpose(3, 0, 1, 2), ((0, 0), (0, 0), (kh - 1, kh - 1), (0, 0)))
  gs = jnp.stack([g_FxBxHxW[:, :, kh - 1 - i:kh - 1 - i + hp, :] for i in range(kh)])
  out = jax.lax.dot(gs.reshape(kh * f, -1), u, preferred_element_type=jnp.float32)
  return out.reshape(kh, f, kw, c).transpose(0, 2, 3, 1)


def _same_conv_bwd(pads, res, g):
  x, w = res
  kh, kw, _, _ = w.shape
  (top, bottom), (left, right) = pads
  dx = _conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3), ((bottom, top), (right, left)))
  dw = _weight_grad(x, g, kh, kw, pads).astype(w.dtype)
  return dx.astype(x.dtype), dw


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
  """lax.conv_general_dilated with `same_conv` for the case it covers (stride 1, no
  dilation or groups, NHWC / HWIO) on the CPU backend: what nn.Conv calls. Elsewhere
  (cuDNN / TPU convolutions have fast weight gradients) XLA's own path runs."""
  if padding == "SAME" and rhs.ndim == 4:  # Stride 1: k - 1 zeros, the extra one at the end.
    padding = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in rhs.shape[:2])
  plain = (backend.platform() == "cpu" and lhs.ndim == 4 and feature_group_count == 1
           and all(s == 1 for s in window_strides)
           and not any(d != 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
           and not isinstance(padding, str) and precision is None and not kwargs
           # Same-size output (the input gradient's padding below assumes it).
           and all(lo + hi == k - 1 for (lo, hi), k in zip(padding, rhs.shape[:2]))
           and dimension_numbers == jax.lax.conv_dimension_numbers(
               lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, **kwargs)
  return same_conv(lhs, rhs, tuple(tuple(int(p) for p in pair) for pair in padding))


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    dtype: Dtype,
    param_dtype: Dtype,
    kernel_init=nn.initializers.lecun_normal(),
    name: Optional[str] = None,
) -> nn.Conv:
  """A 'SAME'-padded square conv with logical axis names on its parameters."""
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding="SAME",
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=layers.partitioned(kernel_init, (None, None, "embed", "mlp")),
      bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)),
      conv_general_dilated=conv_general_dilated if strides == 1 else None,
      name=name,
  )


# film value -> how a residual block reads the conditioning vector c.
FILMS = {
    # h * (1 + scale) + shift after the second GroupNorm, from Dense(swish(c)) with bias.
    "scale_shift": "wide_cond (DDPM++/ADM-style)",
    # h + Dense(c) (no bias, zero-initialised) after the first conv: VDM / the MD4 paper.
    "shift": "the MD4 paper's (VDM)",
}


def check_image_shape(data_shape: Sequence[int], network: str) -> None:
  """Raises a one-line ValueError unless data_shape is (H, W, C) (`network` names the asker)."""
  if len(data_shape) != 3:
    raise ValueError(f"{network} needs data_shape (H, W, C), got {tuple(data_shape)}.")


class ResBlock(nn.Module):
  """GN -> swish -> conv [+ shift(c)] -> GN [-> FiLM(c)] -> swish -> dropout -> conv, + skip.

  Attributes:
    features: output channels.
    dropout_rate: dropout before the second conv.
    film: key of FILMS (how the conditioning vector enters).
  """

  features: int
  dropout_rate: float = 0.0
  film: str = "scale_shift"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, x_BxHxWxC: Array, c_BxE: Optional[Array], train: bool
  ) -> Array:
    """[B, H, W, C] (and [B, E] conditioning or None) -> [B, H, W, features]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_features = x_BxHxWxC.shape[-1]
    h = layers.group_norm(in_features, activation="swish", name="norm_0", **kw)(x_BxHxWxC)
    h = conv(self.features, name="conv_0", **kw)(h)
    if c_BxE is not None and self.film == "shift":
      shift_BxF = layers.dense(
          self.features, ("cond", "mlp"), use_bias=False, kernel_init=nn.initializers.zeros,
          name="film", **kw
      )(c_BxE)
      h = h + shift_BxF[:, None, None, :]
    modulated = c_BxE is not None and self.film == "scale_shift"
    # Swish fused into the norm unless the FiLM scale/shift comes between them.
    h = layers.group_norm(self.features, activation=None if modulated else "swish",
                          name="norm_1", **kw)(h)
    if modulated:
      film_Bx2xF = layers.dense(
          (2, self.features), ("cond", None, "mlp"), name="film", **kw
      )(nn.swish(c_BxE))
      scale_Bx1x1xF = film_Bx2xF[:, None, None, 0]
      shift_Bx1x1xF = film_Bx2xF[:, None, None, 1]
      h = nn.swish(conditioning.modulate(h, shift_Bx1x1xF, scale_Bx1x1xF))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    h = conv(
        self.features,
        kernel_init=nn.initializers.zeros,
        name="conv_1",
        **kw,
    )(h)
    if in_features != self.features:
      x_BxHxWxC = conv(self.features, 1, name="skip", **kw)(x_BxHxWxC)
    return x_BxHxWxC + h


class AttnBlock(nn.Module):
  """GroupNorm then self-attention over all H * W positions, residual.

  Attributes:
    num_heads: attention heads (must divide the channel count).
    bias: biases on the query/key/value/output projections (the paper's, nn.MultiHead-
      DotProductAttention's), as `bias` parameters of those Dense layers.
    out_kernel_init: the output projection's initialiser (zeros: the block starts as the
      identity; the paper's is lecun normal, nn.MultiHeadDotProductAttention's default).
  """

  num_heads: int = 1
  attention_impl: str = "xla"
  bias: bool = False
  out_kernel_init: Any = nn.initializers.zeros
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hh, ww, c = x_BxHxWxC.shape
    h = layers.group_norm(c, name="norm", **kw)(x_BxHxWxC)
    h_BxLxC = attention.SelfAttention(
        self.num_heads,
        out_kernel_init=self.out_kernel_init,
        attention_impl=self.attention_impl,
        qkv_bias=self.bias,
        out_bias=self.bias,
        name="attn",
        **kw,
    )(h.reshape(b, hh * ww, c))
    return x_BxHxWxC + h_BxLxC.reshape(b, hh, ww, c)


class UNet(nn.Module):
  """MD4 image UNet: (z, t, cond) -> logits [B, H, W, C, V].

  Attributes:
    vocab_size: V values per channel; inputs lie in [0, V] with V the mask id.
    channels: base channel count.
    channel_mult: channel multiplier per level (len = number of levels).
    num_res_blocks: residual blocks per level (num_res_blocks + 1 going up).
    attn_resolutions: spatial sizes (H) at which self-attention is used.
    embed_dim: embedding width per channel value.
    num_classes: class labels for conditioning (0 = unconditional).
    time_features: 't' or 'none' (see conditioning.TIME_FEATURES).
    dropout_rate: dropout probability in residual blocks (train=True).
    num_heads: attention heads in attention blocks.
    dtype: activation dtype.
    param_dtype: parameter dtype.
    remat_policy: what each residual / attention block keeps for the backward
      pass (a key of layers.REMAT_POLICIES; 'none' keeps everything).
    attention_impl: see attention.ATTENTION_IMPLS.
    cond_dim: conditioning width (0 = 4 * channels; the paper's: channels).
    film: key of FILMS.
    time_embedding: widths of the time MLP (conditioning.TIME_EMBEDDINGS).
    zero_init_output: zero-initialised output conv (uniform first prediction).
    sinusoid: the time sinusoid (conditioning.SINUSOIDS): md4 (the paper's) | dit.
    label_cond: where the label embedding joins (conditioning.LABEL_CONDS): concat | add.
    attn_bias: q/k/v/output biases in the attention blocks (the paper's middle attention).
    param_init: conditioning.INITS: 'md4' (the paper's) initialises the value and label embeddings
      with Flax's default (std 1 / sqrt(embed width)) and the attention outputs lecun normal;
      'md4_jax' the value embedding with std 1, labels 0.02, attention outputs zero.

  Dropout (dropout_rate) is element-wise before each residual block's second conv, as in the
  paper's UNet; its attention has none.
  """

  vocab_size: int
  channels: int
  channel_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = ()
  embed_dim: int = 16
  num_classes: int = 0
  time_features: str = "t"
  dropout_rate: float = 0.0
  num_heads: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention_impl: str = "xla"
  cond_dim: int = 0
  film: str = "scale_shift"
  time_embedding: str = "dit"
  zero_init_output: bool = False
  sinusoid: str = "dit"
  label_cond: str = "add"
  attn_bias: bool = False
  param_init: str = "md4_jax"

  @classmethod
  def check_kwargs(cls, kwargs: Mapping[str, Any], group: str) -> None:
    """Images (H, W, C) and known choices (one-line ValueErrors naming `group`)."""
    check_image_shape(kwargs["data_shape"], group)
    layers.check_choice(kwargs["film"], FILMS, f"{group}.film")
    conditioning.check_kwargs(kwargs, group)

  @nn.compact
  def __call__(
      self,
      z: Array,
      t: Array,
      cond: Optional[Array] = None,
      train: bool = False,
  ) -> Array:
    """Computes logits.

    Args:
      z: [B, H, W, C] int values in [0, V].
      t: [B] float times in [0, 1] (ignored if time_features == 'none').
      cond: [B] int labels in [0, num_classes), or None.
      train: enables dropout (rng stream 'dropout').

    Returns:
      [B, H, W, C, V] float32 logits.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if z.ndim != 4:
      raise ValueError(f"UNet expects z of shape [B, H, W, C], got {z.shape}.")
    b, height, width, c = z.shape
    factor = 2 ** (len(self.channel_mult) - 1)
    if height % factor or width % factor:
      raise ValueError(
          f"Image {height}x{width} not divisible by {factor} "
          f"({len(self.channel_mult)} levels)."
      )
    num_levels = len(self.channel_mult)

    layers.check_choice(self.film, FILMS, "film")
    c_BxE = conditioning.Conditioning(
        self.cond_dim or 4 * self.channels,
        self.time_features,
        self.num_classes,
        self.time_embedding,
        self.sinusoid,
        self.label_cond,
        self.param_init,
        name="conditioning",
        **kw,
    )(t, cond, b)

    res_cls = layers.remat(ResBlock, self.remat_policy, static_argnums=(3,))
    attn_cls = layers.remat(AttnBlock, self.remat_policy)

    def res(h, level, name):
      return res_cls(
          self.channels * self.channel_mult[level],
          self.dropout_rate,
          self.film,
          name=name,
          **kw,
      )(h, c_BxE, train)

    def attn(h, name):
      out_init = (nn.initializers.lecun_normal() if self.param_init == "md4"
                  else nn.initializers.zeros)
      return attn_cls(
          self.num_heads, attention_impl=self.attention_impl, bias=self.attn_bias,
          out_kernel_init=out_init, name=name, **kw
      )(h)

    def maybe_attn(h, name):
      if h.shape[1] in self.attn_resolutions:
        h = attn(h, name)
      return h

    def constrain(h):
      return layers.constrain(h, layers.ACTIVATION_BxHxWxC)

    e_BxHxWxCxE = nn.Embed(
        self.vocab_size + 1,
        self.embed_dim,
        embedding_init=layers.partitioned(
            conditioning.embedding_init(self.param_init, 1.0), ("vocab", "embed")
        ),
        name="value_embedding",
        **kw,
    )(z)
    h = e_BxHxWxCxE.reshape(b, height, width, c * self.embed_dim)
    h = constrain(conv(self.channels, name="stem", **kw)(h))

    skips = [h]
    for level in range(num_levels):
      for i in range(self.num_res_blocks):
        h = res(h, level, f"down_{level}_res_{i}")
        h = maybe_attn(h, f"down_{level}_attn_{i}")
        skips.append(h)
      if level != num_levels - 1:
        h = conv(
            h.shape[-1], strides=2, name=f"down_{level}_downsample", **kw
        )(h)
        h = constrain(h)
        skips.append(h)

    h = res(h, num_levels - 1, "mid_res_0")
    h = attn(h, "mid_attn")
    h = constrain(res(h, num_levels - 1, "mid_res_1"))

    for level in reversed(range(num_levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(h, level, f"up_{level}_res_{i}")
        h = maybe_attn(h, f"up_{level}_attn_{i}")
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = conv(h.shape[-1], name=f"up_{level}_upsample", **kw)(h)
      h = constrain(h)
    assert not skips, len(skips)

    h = layers.group_norm(h.shape[-1], activation="swish", name="out_norm", **kw)(h)
    out_init = nn.initializers.zeros if self.zero_init_output else nn.initializers.lecun_normal()
    h = conv(c * self.vocab_size, kernel_init=out_init, name="out_conv", **kw)(h)
    return h.astype(jnp.float32).reshape(b, height, width, c, self.vocab_size)
