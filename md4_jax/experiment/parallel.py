"""Device mesh, shardings, and host-local → global arrays.

One mesh serves 1 to N devices across all processes. Axes: 'data' (batch),
'fsdp' (batch + parameter shards) and 'tensor' (model parallel). The batch is
split over ('data', 'fsdp'). Parameters carry logical axis names ('embed',
'mlp', 'heads', 'vocab', ...); a rules table (config.sharding_rules) maps them
to mesh axes. A dimension that a mesh axis does not divide stays replicated.
"""

import contextlib
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from md4_jax.networks import backend
from md4_jax.networks import layers

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
  """A mesh over `devices` (default: every device of every process).

  `axis_sizes` may hold 'dcn_data' (config.mesh.dcn_data): the number of TPU
  slices, joined over the data-centre network, that replicate the model as
  data parallelism. The other sizes are then those inside one slice (-1: the
  rest of a slice's devices) and the mesh's 'data' axis is dcn_data x data,
  slice-major (`mesh_utils.create_hybrid_device_mesh`), so only the gradient
  reduction crosses slices.
  """
  devices = jax.devices() if devices is None else list(devices)
  axis_sizes = dict(axis_sizes)
  dcn = int(axis_sizes.pop("dcn_data", 1))
  auto = (AxisType.Auto,) * len(MESH_AXES)  # XLA propagates shardings (GSPMD).
  if dcn != 1:
    return _hybrid_mesh(axis_sizes, dcn, devices, auto)
  shape = resolve_mesh_shape(axis_sizes, len(devices))
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  if devices[0].platform == "tpu":  # Axes laid along the slice's torus (compile-only devices).
    try:
      return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES, axis_types=auto)
    except (ValueError, NotImplementedError, AssertionError):  # A shape the torus cannot take.
      pass
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _hybrid_mesh(axis_sizes, dcn: int, devices, axis_types) -> Mesh:
  """The data axis across `dcn` slices (devices' slice_index), the rest inside each slice."""
  slices = sorted({getattr(d, "slice_index", None) for d in devices}, key=str)
  if dcn < 1 or len(slices) != dcn or None in slices:
    raise ValueError(f"config.mesh.dcn_data={dcn} needs devices on {dcn} TPU slices; these "
                     f"{len(devices)} devices are on {len(slices)} (slice_index {slices}).")
  shape = resolve_mesh_shape(axis_sizes, len(devices) // dcn)
  grid = mesh_utils.create_hybrid_device_mesh(shape, (dcn, 1, 1), devices)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def platform(mesh: Mesh) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices (a TPU slice's, when compiling
  ahead of time on a CPU host)."""
  name = mesh.devices.flat[0].platform
  return "gpu" if name in ("cuda", "rocm") else name


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


def data_shards(mesh: Mesh) -> tuple[int, int]:
  """(index, count) of this process's slice of every global batch.

  Processes whose devices hold the same rows of the batch (e.g. a 'tensor'
  axis spanning processes) read the same data; `count` is the number of
  distinct row blocks, and each process loads `global_batch / count` rows.
  """
  nominal = batch_size_per_shard(mesh)
  rows: dict[int, set[int]] = {}
  for device, index in batch_sharding(mesh).devices_indices_map((nominal,)).items():
    start = index[0].start or 0
    stop = nominal if index[0].stop is None else index[0].stop
    rows.setdefault(device.process_index, set()).update(range(start, stop))
  blocks = sorted({(min(r), max(r)) for r in rows.values()})
  mine = rows[jax.process_index()]
  if max(mine) - min(mine) + 1 != len(mine):
    raise ValueError(f"Mesh {dict(mesh.shape)} gives process {jax.process_index()} a "
                     "non-contiguous part of the batch; reorder the mesh axes or devices.")
  return blocks.index((min(mine), max(mine))), len(blocks)


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """Assembles each process's share of the batch into global jax.Arrays."""
  sharding = batch_sharding(mesh)
  _, count = data_shards(mesh)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count,) + v.shape[1:])
  return out


def fetch(tree: Any) -> Any:
  """Host numpy copies of replicated arrays (works on every process)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def gather(tree: Any) -> Any:
  """Host numpy copies of whole (e.g. batch-sharded) global arrays, on every process."""
  return multihost_utils.process_allgather(tree, tiled=True)


Rules = Sequence[tuple[str, Any]]


@contextlib.contextmanager
def logical_context(rules: Rules, mesh: Optional[Mesh] = None):
  """Traces inside the logical-axis `rules` and, with `mesh`, its abstract mesh.

  The rules give the parameters' shardings. With `mesh`, the networks'
  activation constraints (`nn.with_logical_constraint` on the residual stream,
  feature maps and logits) become `with_sharding_constraint`s over that mesh,
  and the networks' backend choices (`networks.backend`) follow its devices'
  platform; without it the constraints are no-ops and XLA propagates
  activation shardings alone.
  """
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
      # Backend-specific network paths follow the mesh's devices, not the tracing host.
      stack.enter_context(backend.target(platform(mesh)))
    stack.enter_context(nn.logical_axis_rules(rules))
    yield


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree whose leaves may be nn.LogicallyPartitioned.

  Args:
    abstract_boxed: e.g. jax.eval_shape of a function returning boxed params.
    mesh: the device mesh.
    rules: (logical name, mesh axis | tuple of axes | None) pairs.

  Returns:
    A pytree of NamedSharding matching the unboxed tree.
  """
  logical = nn.get_partition_spec(abstract_boxed)
  shapes = nn.meta.unbox(abstract_boxed)
  is_spec = lambda x: isinstance(x, P)
  def one(spec, leaf):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else P()
    return NamedSharding(mesh, layers.fit_spec(mesh_spec, leaf.shape, mesh))
  return jax.tree.map(one, logical, shapes, is_leaf=is_spec)
