"""Device mesh, shardings, and host-local → global arrays.

One mesh serves 1 to N devices across all processes. Axes: 'data' (batch),
'fsdp' (batch + parameter shards) and 'tensor' (model parallel). The batch is
split over ('data', 'fsdp'); parameters are replicated until sharding rules
are given.
"""

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for MESH_AXES; at most one -1 ('the rest'); missing axes are 1."""
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}.")
  sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or num_devices % known:
      raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"Mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, but "
        f"{num_devices} are available. Use -1 for one axis to take the rest.")
  return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(axis_sizes, len(devices))
  auto = (AxisType.Auto,) * len(MESH_AXES)  # XLA propagates shardings (GSPMD).
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def batch_size_per_shard(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split across the batch axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  shards = batch_size_per_shard(mesh)
  if batch_size % shards:
    raise ValueError(
        f"{what}={batch_size} must be divisible by the {shards} batch shards of the mesh "
        f"{dict(mesh.shape)}; pick a multiple of {shards}.")


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Assembles each process's share of the batch into global jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
