"""UViT for images: convolutional residual blocks around a DiT stack (the MD4 paper's
ImageNet 64x64 network).

(z_t, t, cond) -> logits [B, H, W, C, V]. Each channel value is embedded on its own
(one shared table), the C embeddings of a pixel concatenated and a 3x3 conv maps
them to `channels`. `num_res_blocks` residual blocks at full resolution follow
(conditional GroupNorm: a GroupNorm without affine whose scale and shift come from
a zero-initialised Dense of c). The middle is a DiT: p x p patches embedded by a
strided conv into `width`-wide tokens, a learned positional embedding initialised
with 2-D sin-cos, `depth` adaLN-zero transformer blocks (transformer.TransformerBlock
with the ViT MLP: Dense -> GELU -> Dense, biases on q/k/v) and a final adaLN +
zero-initialised Dense back to p x p x channels, unpatchified: h = DiT(h), as in the paper
(with `dit_residual=True`, md4_jax's own design, h + DiT(h) instead: the identity at
initialisation). The up path has
`num_res_blocks + 1` residual blocks, each reading the matching down-path output
concatenated to its input; a conditional GroupNorm, swish and a zero-initialised
3x3 conv give C * V logits per pixel.

Logical axis names as in unet.py (convs, residual blocks) and transformer.py
(the DiT stack); the patch embedding maps ('embed', 'mlp') like a conv.
"""

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.networks import conditioning
from md4_jax.networks import layers
from md4_jax.networks import transformer
from md4_jax.networks import unet
from md4_jax.networks.unet import conv

Array = jax.Array
Dtype = Any


def sincos_2d(grid: int, width: int, column_first: bool = False) -> np.ndarray:
  """[grid * grid, width] 2-D sin-cos position features (MAE/DiT) of the row-major tokens:
  half the features encode the row, half the column (the row half first, or the column half
  with `column_first`, as the paper's code), each half [sin, cos] over frequencies
  10000^(-k / (width/4))."""
  if width % 4:
    raise ValueError(f"2-D sin-cos embedding needs width % 4 == 0, got {width}.")
  omega = 1.0 / 10_000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def one_axis(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  halves = [one_axis(cols), one_axis(rows)] if column_first else [one_axis(rows), one_axis(cols)]
  return np.concatenate(halves, axis=1).astype(np.float32)


class CondGroupNorm(nn.Module):
  """GroupNorm without affine, then * (1 + scale) + shift from Dense(c) (zero-init
  kernel, bias): the identity modulation at initialisation. Without c, a plain
  affine GroupNorm."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: Array, c_BxE: Optional[Array]) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x_BxHxWxC.shape[-1]
    if c_BxE is None:
      return layers.group_norm(channels, name="norm", **kw)(x_BxHxWxC)
    h = nn.GroupNorm(num_groups=layers.num_groups(channels), epsilon=1e-6, use_scale=False,
                     use_bias=False, name="norm", **kw)(x_BxHxWxC)
    mod_Bx2xC = layers.dense((2, channels), ("cond", None, "mlp"),
                             kernel_init=nn.initializers.zeros, name="modulation", **kw)(c_BxE)
    return conditioning.modulate(h, mod_Bx2xC[:, None, None, 1], mod_Bx2xC[:, None, None, 0])


class ResBlock(nn.Module):
  """CondGN -> swish -> conv -> CondGN -> swish -> dropout -> conv (zero-init), + skip
  (a 1x1 conv when the channel count changes)."""

  features: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: Array, c_BxE: Optional[Array], train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = CondGroupNorm(name="norm_0", **kw)(x_BxHxWxC, c_BxE)
    h = conv(self.features, name="conv_0", **kw)(nn.swish(h))
    h = CondGroupNorm(name="norm_1", **kw)(h, c_BxE)
    h = nn.Dropout(self.dropout_rate)(nn.swish(h), deterministic=not train)
    h = conv(self.features, kernel_init=nn.initializers.zeros, name="conv_1", **kw)(h)
    if x_BxHxWxC.shape[-1] != self.features:
      x_BxHxWxC = conv(self.features, 1, name="skip", **kw)(x_BxHxWxC)
    return x_BxHxWxC + h


class DiT(nn.Module):
  """Patchify -> positional embedding -> `depth` adaLN-zero blocks -> adaLN + zero-init
  Dense -> unpatchify: [B, H, W, C] -> [B, H, W, C].

  Attributes (besides the stack's sizes):
    dropout: transformer.DROPOUTS key of the blocks.
    column_first: the position table's column half first (sincos_2d).
  """

  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_impl: str = "xla"
  remat_policy: str = "none"
  dropout: str = "element"
  column_first: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: Array, c_BxE: Optional[Array], train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, wid, channels = x_BxHxWxC.shape
    p = self.patch_size
    if height != wid or height % p:
      raise ValueError(f"DiT needs a square map divisible by patch_size {p}, got {height}x{wid}.")
    grid = height // p
    h = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="patch_embed",
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                               (None, None, "mlp", "embed")),
                bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)), **kw)(x_BxHxWxC)
    pos_init = lambda *_: jnp.asarray(sincos_2d(grid, self.width, self.column_first),
                                      self.param_dtype)
    pos_LxD = self.param("pos_embedding", layers.partitioned(pos_init, ("length", "embed")),
                         (grid * grid, self.width), self.param_dtype)
    h_BxLxD = h.reshape(b, grid * grid, self.width) + pos_LxD[None].astype(self.dtype)
    h_BxLxD = layers.constrain(h_BxLxD, layers.ACTIVATION_BxLxD)
    block_cls = layers.remat(transformer.TransformerBlock, self.remat_policy, static_argnums=(3,))
    for i in range(self.depth):
      h_BxLxD = block_cls(
          num_heads=self.num_heads,
          mlp_hidden=transformer.mlp_hidden("gelu", self.width, self.mlp_ratio),
          dropout_rate=self.dropout_rate, attention_impl=self.attention_impl, mlp="gelu",
          qkv_bias=True, cond_act="swish", dropout=self.dropout, name=f"block_{i}",
          **kw)(h_BxLxD, c_BxE, train)
    shift, scale = transformer.AdaLNModulation(2, self.width, "swish", name="final_modulation",
                                               **kw)(c_BxE)
    h_BxLxD = layers.layer_norm(affine=False, name="final_norm", **kw)(h_BxLxD)
    h_BxLxD = conditioning.modulate(h_BxLxD, shift, scale)
    out = layers.dense(p * p * channels, ("embed", "mlp"), kernel_init=nn.initializers.zeros,
                       name="final_dense", **kw)(h_BxLxD)
    out = out.reshape(b, grid, grid, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, height, wid, channels)


class UViT(nn.Module):
  """MD4's ImageNet network: (z, t, cond) -> logits [B, H, W, C, V].

  Attributes:
    vocab_size: V values per channel; inputs lie in [0, V] with V the mask id.
    channels: channels of the convolutional path.
    num_res_blocks: residual blocks before the DiT (num_res_blocks + 1 after it).
    embed_dim: embedding width per channel value.
    patch_size: DiT patch size.
    width, depth, num_heads, mlp_ratio: the DiT stack.
    cond_dim: conditioning width (0 = channels).
    time_embedding: widths of the time MLP (conditioning.TIME_EMBEDDINGS).
    sinusoid: the time sinusoid (conditioning.SINUSOIDS): md4 (the paper's) | dit.
    label_cond: where the label embedding joins (conditioning.LABEL_CONDS): concat | add.
    dit_residual: h + DiT(h) (md4_jax's own) instead of the paper's h = DiT(h).
    dropout: where dropout_rate applies in the DiT blocks (transformer.DROPOUTS): dit (the
      paper's) | element; the residual blocks drop element by element either way.
    param_init: conditioning.INITS: 'md4' (the paper's) initialises the value and label embeddings
      with Flax's default (std 1 / sqrt(embed width)) and puts the column half of the
      position table first; 'md4_jax' std 1 (values), 0.02 (labels), rows first.
    num_classes, time_features, dropout_rate, dtype, param_dtype, remat_policy,
    attention_impl: as in unet.UNet.
  """

  vocab_size: int
  channels: int = 256
  num_res_blocks: int = 8
  embed_dim: int = 256
  patch_size: int = 2
  width: int = 768
  depth: int = 20
  num_heads: int = 12
  mlp_ratio: float = 4.0
  cond_dim: int = 0
  time_embedding: str = "md4"
  num_classes: int = 0
  time_features: str = "t"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention_impl: str = "xla"
  sinusoid: str = "dit"
  label_cond: str = "add"
  dit_residual: bool = True
  dropout: str = "element"
  param_init: str = "md4_jax"

  @classmethod
  def check_kwargs(cls, kwargs: Mapping[str, Any], group: str) -> None:
    """Images (H, W, C) and known choices (one-line ValueErrors naming `group`)."""
    unet.check_image_shape(kwargs["data_shape"], group)
    conditioning.check_kwargs(kwargs, group)
    transformer.check_dropout_kwargs(kwargs, group)

  @nn.compact
  def __call__(self, z: Array, t: Array, cond: Optional[Array] = None,
               train: bool = False) -> Array:
    """z [B, H, W, C] ints in [0, V] -> [B, H, W, C, V] float32 logits."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if z.ndim != 4:
      raise ValueError(f"UViT expects z of shape [B, H, W, C], got {z.shape}.")
    b, height, width, c = z.shape
    c_BxE = conditioning.Conditioning(self.cond_dim or self.channels, self.time_features,
                                      self.num_classes, self.time_embedding, self.sinusoid,
                                      self.label_cond, self.param_init, name="conditioning",
                                      **kw)(t, cond, b)
    res_cls = layers.remat(ResBlock, self.remat_policy, static_argnums=(3,))

    def constrain(h):
      return layers.constrain(h, layers.ACTIVATION_BxHxWxC)

    e = nn.Embed(self.vocab_size + 1, self.embed_dim,
                 embedding_init=layers.partitioned(
                     conditioning.embedding_init(self.param_init, 1.0), ("vocab", "embed")),
                 name="value_embedding", **kw)(z)
    h = constrain(conv(self.channels, name="stem", **kw)(e.reshape(b, height, width, -1)))
    skips = [h]
    for i in range(self.num_res_blocks):
      h = constrain(res_cls(self.channels, self.dropout_rate, name=f"down_res_{i}", **kw)(
          h, c_BxE, train))
      skips.append(h)
    dit_BxHxWxC = DiT(self.patch_size, self.width, self.depth, self.num_heads, self.mlp_ratio,
                      self.dropout_rate, self.attention_impl, self.remat_policy, self.dropout,
                      self.param_init == "md4", name="dit", **kw)(h, c_BxE, train)
    h = h + dit_BxHxWxC if self.dit_residual else dit_BxHxWxC
    for i in range(self.num_res_blocks + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = constrain(res_cls(self.channels, self.dropout_rate, name=f"up_res_{i}", **kw)(
          h, c_BxE, train))
    h = CondGroupNorm(name="out_norm", **kw)(h, c_BxE)
    h = conv(c * self.vocab_size, kernel_init=nn.initializers.zeros, name="out_conv",
             **kw)(nn.swish(h))
    return h.astype(jnp.float32).reshape(b, height, width, c, self.vocab_size)
