"""Cloud TPU slices by their accelerator-type names, and each generation's datasheet.

`md4_jax.plan --slice=v5p-128` compiles for a named slice without a TPU: the
TPU compiler (libtpu) describes the slice's devices from a topology name
(`jax.experimental.topologies.get_topology_desc`), which takes `v5:4x4x4`, not
the `v5p-128` a researcher books. This table translates one into the other.

Counting: `v4-N` and `v5p-N` count TensorCores, two per chip, which JAX runs as
one device per chip ("megacore"); `v5litepod-N` (also spelled `v5e-N`) and
`v6e-N` count chips, one TensorCore each. So v5p-128 is 64 chips (4x4x4) and
v5e-8 is 8 chips (2x4).

Sources (Cloud TPU documentation, read December 2026):
  v4:  https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2 at
       1200 GB/s, 2 TensorCores per chip, 3D mesh/torus; shapes AxBxC). Its
       page gives no per-chip ICI figure: 6 links per chip at 400 Gb/s each
       way (Jouppi et al., "TPU v4: an optically reconfigurable supercomputer",
       ISCA 2023) is 600 GB/s both ways.
  v5p: https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB HBM2e at
       2765 GB/s, 1200 GB/s bidirectional ICI per chip, 2 TensorCores per chip,
       "Data center network (DCN) bandwidth per chip: 50 Gbps"; topologies
       2x2x1 ... 16x16x24, 4 chips per host).
  v5e: https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM2 at
       819 GB/s, 400 GB/s bidirectional ICI per chip; 2D shapes 1x1 ... 16x16;
       one TensorCore per chip; hosts of 1, 4 or 8 chips; "Per-host NIC
       configuration: 2 x 100 Gbps NIC" for 8 chips and "Data center network
       bandwidth per Pod: 6.4 Tbps" for 256 chips, both 25 Gb/s per chip).
  DCN for v4 and v6e: their pages, as stored here, give no per-chip or per-host
       figure; dcn_bandwidth is None (cross-slice traffic charged at ICI speed).
  v6e: https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16, 32 GB HBM at
       1638 GB/s, 800 GB/s bidirectional ICI per chip; 1x1 ... 16x16, 8 chips
       per host).
"""

import dataclasses
import os
from typing import Optional

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation's datasheet figures, per chip (= one JAX device)."""

  name: str  # Accelerator-type prefix: v4, v5p, v5litepod, v6e.
  topology_prefix: str  # What get_topology_desc takes before ':' (v4, v5, v5e, v6e).
  cores_per_chip: int  # TensorCores per chip (2: megacore, one device per chip).
  hbm_bytes: float  # HBM capacity.
  peak_bf16_flops: float  # Dense bf16 FLOP/s.
  hbm_bandwidth: float  # Bytes/s.
  ici_bandwidth: float  # Bidirectional inter-chip bytes/s per chip.
  host_bounds: tuple[int, int, int]  # Chips per host (get_topology_desc's chips_per_host_bounds).
  source: str
  # Data-centre network (multi-slice) bytes/s per chip, one direction; None where the Cloud TPU
  # docs give no figure (the plan then charges cross-slice traffic at ICI speed, and says so).
  dcn_bandwidth: Optional[float] = None


GENERATIONS = {
    "v4": Generation("v4", "v4", 2, 32 * GIB, 275e12, 1200 * GB, 600 * GB, (2, 2, 1),
                     "https://cloud.google.com/tpu/docs/v4; ICI: Jouppi et al., ISCA 2023"),
    "v5p": Generation("v5p", "v5", 2, 95 * GB, 459e12, 2765 * GB, 1200 * GB, (2, 2, 1),
                      "https://cloud.google.com/tpu/docs/v5p", dcn_bandwidth=50e9 / 8),
    "v5litepod": Generation("v5litepod", "v5e", 1, 16 * GB, 197e12, 819 * GB, 400 * GB, (2, 4, 1),
                            "https://cloud.google.com/tpu/docs/v5e", dcn_bandwidth=25e9 / 8),
    "v6e": Generation("v6e", "v6e", 1, 32 * GB, 918e12, 1638 * GB, 800 * GB, (2, 4, 1),
                      "https://cloud.google.com/tpu/docs/v6e"),
}
ALIASES = {"v5e": "v5litepod"}

# Chips -> topology, as the Cloud TPU docs list the shapes.
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
       6144: "16x16x24"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES = {"v4": {c: t for c, t in _3D.items() if c <= 2048},  # v4-8 ... v4-4096.
           "v5p": _3D, "v5litepod": _2D, "v6e": _2D}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One accelerator type: e.g. v5p-128 = 64 chips, topology v5:4x4x4."""

  name: str
  generation: Generation
  chips: int
  topology: str  # AxB or AxBxC.

  @property
  def topology_name(self) -> str:
    return f"{self.generation.topology_prefix}:{self.topology}"

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host, clipped to the slice (v5e-1 and v5e-4 are one smaller host)."""
    dims = [int(d) for d in self.topology.split("x")] + [1]
    return tuple(min(b, d) for b, d in zip(self.generation.host_bounds, dims[:3]))


def slice_names() -> list[str]:
  """Every accelerator type of the table, e.g. v4-8, v5p-128, v5litepod-8, v6e-256."""
  names = []
  for gen_name, shapes in _SHAPES.items():
    per = GENERATIONS[gen_name].cores_per_chip
    names += [f"{gen_name}-{chips * per}" for chips in sorted(shapes)]
  return names


def lookup(name: str) -> Slice:
  """The slice of an accelerator-type name (v5e-N is v5litepod-N).

  Raises:
    ValueError: an unknown name (the message lists the valid ones).
  """
  prefix, _, count = name.strip().lower().rpartition("-")
  prefix = ALIASES.get(prefix, prefix)
  gen = GENERATIONS.get(prefix)
  if gen is not None and count.isdigit() and int(count) % gen.cores_per_chip == 0:
    chips = int(count) // gen.cores_per_chip
    if chips in _SHAPES[prefix]:
      return Slice(f"{prefix}-{count}", gen, chips, _SHAPES[prefix][chips])
  raise ValueError(f"Unknown TPU slice {name!r}; valid: {', '.join(slice_names())} "
                   "(v5e-N is v5litepod-N; v4/v5p count TensorCores, v5e/v6e chips).")


def topology_devices(tpu_slice: Slice, num_slices: int = 1) -> list:
  """The compile-only TPU devices of `num_slices` copies of the slice (libtpu, no TPU needed).

  Raises:
    ValueError: libtpu is not installed or does not match this jax (one-line message).
  """
  # Compile-only devices touch no TPU: processes (test workers, plans side by side) may each
  # load libtpu, which otherwise takes a lock (/tmp/libtpu_lockfile) for the first one.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # This host is no TPU worker: say so, or libtpu asks a metadata server that is not there and
  # prints its failures (accelerator type, worker hostnames) on stderr. Compile targets come from
  # get_topology_desc below, not from these.
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", tpu_slice.name),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
    os.environ.setdefault(key, value)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": "megacore"} if tpu_slice.generation.cores_per_chip == 2 else {}
  try:
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=tpu_slice.topology_name,
        chips_per_host_bounds=tpu_slice.host_bounds, num_slices=num_slices, **kwargs)
  except Exception as e:  # pylint: disable=broad-except  # Missing plugin: ImportError/RuntimeError.
    reason = " ".join(str(e).split())[:200]
    raise ValueError(
        f"compiling for a TPU slice needs the TPU compiler for jax {jax.__version__}: "
        f"pip install 'jax[tpu]=={jax.__version__}' (Linux x86-64; or pip install -e '.[tpu]') "
        f"[{type(e).__name__}: {reason}]") from e
  devices = list(topology.devices)
  expected = tpu_slice.chips * num_slices
  if len(devices) != expected:
    raise ValueError(f"{tpu_slice.topology_name} x {num_slices} gave {len(devices)} devices, "
                       f"expected {expected} chips.")
  return devices


def hbm_gib(tpu_slice: Slice) -> float:
  return tpu_slice.generation.hbm_bytes / GIB


def describe(tpu_slice: Slice, num_slices: int = 1) -> str:
  gen = tpu_slice.generation
  total = tpu_slice.chips * num_slices
  many = f" x {num_slices} slices" if num_slices > 1 else ""
  return (f"{tpu_slice.name}{many}: {total} chips ({tpu_slice.topology_name}), "
          f"{gen.hbm_bytes / GIB:.2f} GiB HBM, {gen.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per chip")

