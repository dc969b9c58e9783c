"""Denoising networks: (z_t, t, cond) -> logits, and the name -> class registry.

Every network is a Flax linen module honouring the call contract of
contract.py, `logits = network(z, t, cond=None, train=False)`.

`config.network` names a class in NETWORKS, and the config group of the same
name holds its attributes:

  network = NETWORKS[config.network](**config[config.network], **common)

where `common` holds those of the run's shared facts (`common_kwargs`:
vocab_size, data_shape, num_classes, dtype, ...) that the class declares as
attributes; a network declares only what it uses. A class may offer
`check_kwargs(kwargs, group)` (a classmethod) to check its choices; it sees the
group, every common fact and its own defaults, before anything is built.
See docs/networks.md ("Adding a backbone").

Only this module reads the config; the networks take typed attributes.
Parameters carry logical axis names (see transformer.py / unet.py) and come
back from `init` as `nn.LogicallyPartitioned` boxes: use `nn.get_partition_spec`
for shardings and `nn.meta.unbox` for plain arrays.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from md4_jax.networks import attention
from md4_jax.networks import conditioning
from md4_jax.networks import layers
from md4_jax.networks.transformer import Transformer
from md4_jax.networks.unet import UNet
from md4_jax.networks.uvit import UViT

# config.network -> the network class; config[name] holds its attributes.
NETWORKS: dict[str, type[nn.Module]] = {
    "transformer": Transformer,
    "unet": UNet,
    "uvit": UViT,
}


def common_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run's facts any network may declare as an attribute, by attribute name.

  num_classes is config.classes; dtype and param_dtype are jnp dtypes.
  """
  return dict(
      vocab_size=config.vocab_size,
      data_shape=tuple(int(d) for d in config.data_shape),
      num_classes=config.classes,
      time_features=config.time_features,
      time_embedding=config.time_embedding,
      dropout_rate=config.dropout_rate,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      remat_policy=config.remat_policy,
      scan_layers=config.scan_layers,
      attention_impl=config.attention_impl,
  )


def _fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
  """The class's own attributes (not Flax's parent / name)."""
  return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def _group(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config[config.network] as plain kwargs; lists (from a saved config.json) become tuples."""
  group = config[config.network].to_dict()
  return {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}


def _network_class(config: ml_collections.ConfigDict) -> type[nn.Module]:
  if config.network not in NETWORKS:
    raise ValueError(f"Unknown network {config.network!r}; valid: {sorted(NETWORKS)}.")
  if config.network not in config:
    raise ValueError(f"config.network={config.network!r} needs its config group "
                     f"config.{config.network} (the class's attributes): add it to "
                     "configs/base.py.")
  return NETWORKS[config.network]


def check_config(config: ml_collections.ConfigDict) -> None:
  """The shared choices and the selected network's group are valid (one-line ValueErrors).

  The group's keys must be attributes of the class and not shadow a common fact;
  the class's own `check_kwargs` then checks its choices.
  """
  conditioning.check_time_features(config.time_features)
  conditioning.time_embedding_widths(config.time_embedding, 1)
  attention.check_attention_impl(config.attention_impl)
  layers.check_remat_policy(config.remat_policy)
  cls = _network_class(config)
  fields, group, common = _fields(cls), _group(config), common_kwargs(config)
  for key in group:
    if key not in fields:
      raise ValueError(f"config.{config.network}.{key} is not an attribute of "
                       f"{cls.__name__}; valid: {sorted(set(fields) - set(common))}.")
    if key in common:
      raise ValueError(f"config.{config.network}.{key} duplicates {key!r}, which every "
                       "network takes from the top-level config: remove it from the group.")
  check = getattr(cls, "check_kwargs", None)
  if check is not None:
    defaults = {name: f.default for name, f in fields.items()
                if f.default is not dataclasses.MISSING}
    check({**defaults, **common, **group}, config.network)


def build_network(config: ml_collections.ConfigDict) -> nn.Module:
  """NETWORKS[config.network](**its group, **the common facts it declares); checked first."""
  check_config(config)
  cls = _network_class(config)
  fields, common = _fields(cls), common_kwargs(config)
  return cls(**_group(config), **{k: v for k, v in common.items() if k in fields})


__all__ = [
    "NETWORKS",
    "Transformer",
    "UNet",
    "UViT",
    "build_network",
    "check_config",
    "common_kwargs",
]
