"""Denoising networks: (z_t, t, cond) -> logits, and a name -> builder registry.

Every network is a Flax linen module called as

  logits = network(z, t, cond=None, train=False)

  z:      [B, *data_shape] int tokens in [0, V]; V = vocab_size is the mask id.
  t:      [B] float times in [0, 1].
  cond:   [B] int class labels in [0, classes), or None.
  train:  enables dropout (rng stream 'dropout').
  logits: [B, *data_shape, V] float32, over the V real tokens.

A network whose last layer is a per-position linear head declares it by
inheriting `contract.FusedHeadNetwork` and offers
`features(z, t, cond, train) -> contract.HeadInputs` (features and the head's
parameters): the loss can then apply the head chunk by chunk
(diffusion/losses.chunked_nll, config.loss_chunk_size).

Only the builders here read the config; the modules take typed attributes.
Parameters carry logical axis names (see transformer.py / unet.py) and come
back from `init` as `nn.LogicallyPartitioned` boxes: use `nn.get_partition_spec`
for shardings and `nn.meta.unbox` for plain arrays.
"""

import math
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from md4_jax.networks import contract
from md4_jax.networks import layers
from md4_jax.networks.transformer import Transformer
from md4_jax.networks.unet import UNet
from md4_jax.networks.uvit import UViT


def _common_kwargs(config: ml_collections.ConfigDict) -> dict:
  """Attributes every network shares, read from the config."""
  layers.check_time_features(config.time_features)
  layers.check_attention_impl(config.attention_impl)
  layers.check_remat_policy(config.remat_policy)
  return dict(
      vocab_size=config.vocab_size,
      num_classes=config.classes,
      time_features=config.time_features,
      dropout_rate=config.dropout_rate,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      remat_policy=config.remat_policy,
      attention_impl=config.attention_impl,
  )


def build_transformer(config: ml_collections.ConfigDict) -> Transformer:
  """Transformer over the flattened data_shape (normally (L,))."""
  tc = config.transformer
  return Transformer(
      max_length=math.prod(config.data_shape),
      width=tc.width,
      depth=tc.depth,
      num_heads=tc.num_heads,
      mlp_ratio=tc.mlp_ratio,
      scan_layers=config.scan_layers,
      cond_dim=tc.cond_dim,
      cond_act=tc.cond_act,
      time_embedding=config.time_embedding,
      mlp=tc.mlp,
      mlp_multiple_of=tc.mlp_multiple_of,
      positions=tc.positions,
      embed_dim=tc.embed_dim,
      head_bias=tc.head_bias,
      zero_init_head=tc.zero_init_head,
      **_common_kwargs(config),
  )


def _image_shape(config: ml_collections.ConfigDict) -> None:
  if len(config.data_shape) != 3:
    raise ValueError(
        f"{config.network} needs data_shape (H, W, C), got {tuple(config.data_shape)}."
    )


def build_unet(config: ml_collections.ConfigDict) -> UNet:
  """UNet for data_shape (H, W, C)."""
  _image_shape(config)
  uc = config.unet
  return UNet(
      channels=uc.channels,
      channel_mult=tuple(uc.channel_mult),
      num_res_blocks=uc.num_res_blocks,
      attn_resolutions=tuple(uc.attn_resolutions),
      embed_dim=uc.embed_dim,
      cond_dim=uc.cond_dim,
      film=uc.film,
      zero_init_output=uc.zero_init_output,
      time_embedding=config.time_embedding,
      **_common_kwargs(config),
  )


def build_uvit(config: ml_collections.ConfigDict) -> UViT:
  """UViT (residual blocks around a DiT) for data_shape (H, W, C)."""
  _image_shape(config)
  vc = config.uvit
  return UViT(
      channels=vc.channels,
      num_res_blocks=vc.num_res_blocks,
      embed_dim=vc.embed_dim,
      patch_size=vc.patch_size,
      width=vc.width,
      depth=vc.depth,
      num_heads=vc.num_heads,
      mlp_ratio=vc.mlp_ratio,
      cond_dim=vc.cond_dim,
      time_embedding=config.time_embedding,
      **_common_kwargs(config),
  )


def check_config(config: ml_collections.ConfigDict) -> None:
  """The networks' named choices in `config` are known (one-line ValueErrors, no trace)."""
  from md4_jax.networks import transformer, unet  # pylint: disable=g-import-not-at-top
  layers.time_embedding_widths(config.time_embedding, 1)
  tc = config.transformer
  layers.check_choice(tc.mlp, transformer.MLPS, "transformer.mlp")
  layers.check_choice(tc.cond_act, transformer.COND_ACTS, "transformer.cond_act")
  layers.check_choice(tc.positions, transformer.POSITIONS, "transformer.positions")
  layers.check_choice(config.unet.film, unet.FILMS, "unet.film")


NETWORKS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    "transformer": build_transformer,
    "unet": build_unet,
    "uvit": build_uvit,
}


def build_network(config: ml_collections.ConfigDict) -> nn.Module:
  """Builds `config.network` from NETWORKS; ValueError lists valid names."""
  if config.network not in NETWORKS:
    raise ValueError(
        f"Unknown network {config.network!r}; valid: {sorted(NETWORKS)}."
    )
  return NETWORKS[config.network](config)


__all__ = [
    "NETWORKS",
    "Transformer",
    "UNet",
    "UViT",
    "build_network",
    "build_transformer",
    "build_unet",
    "build_uvit",
]
