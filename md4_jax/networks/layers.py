"""Basic pieces shared by the denoising networks.

Dense layers and norms with logical axis names on their parameters, named-choice
checks, rematerialisation and activation sharding hints. Attention lives in
attention.py, time and class conditioning in conditioning.py. Everything here
takes explicit arguments; nothing reads a config.

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
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from md4_jax.networks import group_norm as group_norm_lib

Array = jax.Array
Dtype = Any

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


# Logical names of activation axes, for nn.with_logical_constraint (the rules
# table maps them to mesh axes; they are no-ops unless traced under both
# nn.logical_axis_rules(...) and a mesh context: parallel.logical_context(rules, mesh)).
ACTIVATION_BxLxD = ("activation_batch", "activation_length", "activation_embed")
ACTIVATION_BxLxV = ("activation_batch", "activation_length", "activation_vocab")
ACTIVATION_BxHxWxC = ("activation_batch", None, None, "activation_embed")


def fit_spec(spec: jax.P, shape: tuple[int, ...], mesh) -> jax.P:
  """`spec` without the mesh axes that do not divide their dimension (those stay replicated).
  `mesh`: a Mesh or AbstractMesh (its axis sizes)."""
  entries = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = math.prod(mesh.shape[a] for a in names)
    entries.append(axes if names and dim % size == 0 else None)
  return jax.P(*entries)


def constrain(x: Array, names: tuple) -> Array:
  """nn.with_logical_constraint(x, names): a sharding hint under rules + mesh."""
  return nn.with_logical_constraint(x, names)


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
    *, dtype: Dtype, param_dtype: Dtype, affine: bool = True, epsilon: float = 1e-6, name=None
) -> nn.LayerNorm:
  """LayerNorm over the last axis; `affine=False` for adaLN (no scale/bias)."""
  return nn.LayerNorm(
      epsilon=epsilon,
      use_scale=affine,
      use_bias=affine,
      dtype=dtype,
      param_dtype=param_dtype,
      scale_init=partitioned(nn.initializers.ones, ("norm",)),
      bias_init=partitioned(nn.initializers.zeros, ("norm",)),
      name=name,
  )


def dropout(rate: float, channel: bool = False, name=None) -> nn.Dropout:
  """Dropout at `rate`: element by element, or (`channel`) one mask per example and channel
  shared across every position of [B, L, C] activations (the MD4 paper's Dropout1d)."""
  return nn.Dropout(rate, broadcast_dims=(1,) if channel else (), name=name)


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


