"""Ahead-of-time compiles of an experiment for any mesh, and what the compiled programs cost.

`md4_jax.plan` builds the real experiment (`build.setup`) over a TPU slice's
compile-only devices, lowers the training, evaluation and sampling steps with
the state as sharded `ShapeDtypeStruct`s (nothing is allocated) and reads the
compiled programs: memory per chip, the compiler's out-of-memory verdict,
FLOPs, HBM traffic and the collectives in the HLO.

Which memory figure is trusted: the TPU compiler assigns every buffer of the
program at compile time and refuses one that does not fit its HBM
(RESOURCE_EXHAUSTED), so "compiles" is the fit verdict, and the HBM its buffer
assignment placed (the XLA dump's memory-usage report, default memory space)
is the per-chip total. `memory_analysis()` arguments + temporaries overstates
it: its temporaries include on-chip VMEM/SMEM buffers and buffers that share
HBM with others; it is reported, not used for the verdict.
"""

import ctypes
import dataclasses
import gc
import glob
import hashlib
import math
import os
import re
import tempfile
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from md4_jax.experiment import build
from md4_jax.experiment import parallel

GIB = 2**30


# ----------------------------------------------------------------------------- inputs ---

def abstract_batch(config, batch_size: int, mesh, *, eval_batch: bool = False) -> dict:
  """ShapeDtypeStructs of a global batch (what the loop feeds), sharded over the batch axes."""
  sharding = parallel.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {"x": spec((batch_size, *config.data_shape), jnp.int32)}
  if config.classes > 0:
    batch["label"] = spec((batch_size,), jnp.int32)
  if eval_batch:
    batch["weight"] = spec((batch_size,), jnp.float32)
  return batch


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def state_bytes(experiment: build.Experiment) -> dict[str, int]:
  """Per-device bytes of the train state: params, optimiser, EMA, the rest (step, rng)."""
  state = experiment.abstract_state
  parts = {"params": shard_bytes(state.params), "opt_state": shard_bytes(state.opt_state),
           "ema_params": shard_bytes(state.ema_params)}
  parts["other"] = shard_bytes(state) - sum(parts.values())
  return parts


# ---------------------------------------------------------------------------- compile ---

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")


def out_of_memory_line(error: BaseException) -> Optional[str]:
  """The compiler's out-of-memory message on one line, or None if `error` is not one."""
  text = str(error)
  if not any(m in text for m in OOM_MARKERS):
    return None
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  line = next((l for l in lines if "Ran out of memory" in l or "exceeds" in l), lines[0])
  line = " ".join(line.split())
  return line if len(line) <= 300 else line[:297] + "..."


@dataclasses.dataclass
class Compiled:
  """A compile's outcome: the executable, or the compiler's out-of-memory line."""

  compiled: Any = None
  oom: Optional[str] = None

  @property
  def fits(self) -> bool:
    return self.compiled is not None


def compile_or_oom(lower: Callable[[], Any], compiler_options: Optional[dict] = None) -> Compiled:
  """Compile, or the compiler's out-of-memory line; JAX's caches are emptied afterwards."""
  try:
    return Compiled(compiled=lower().compile(compiler_options=compiler_options))
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError's type moves.
    line = out_of_memory_line(e)
    if line is None:
      raise
    return Compiled(oom=line)
  finally:
    release_host_memory()


def release_host_memory() -> None:
  """Drop JAX's caches of traced and compiled programs and hand freed memory back to the OS.

  JAX keeps every executable `.lower().compile()` builds; a plan compiles one shape after
  another and never runs them, so without this the host's memory grows by each program (an
  ImageNet 64 search on v5p-128 reached 24 GB after a dozen compiles and was killed). The
  executable a caller holds stays alive.
  """
  jax.clear_caches()
  gc.collect()
  try:  # glibc keeps freed arenas mapped; elsewhere there is nothing to trim.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def compile_train(experiment: build.Experiment, batch_size: int) -> Compiled:
  parallel.check_batch_size(batch_size, experiment.mesh)
  batch = abstract_batch(experiment.config, batch_size, experiment.mesh)
  return compile_or_oom(lambda: experiment.train_step.lower(experiment.abstract_state, batch))


def compile_eval(experiment: build.Experiment, batch_size: int) -> Compiled:
  batch = abstract_batch(experiment.config, batch_size, experiment.mesh, eval_batch=True)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(experiment.mesh))
  return compile_or_oom(
      lambda: experiment.eval_step().lower(experiment.abstract_state.ema_params, batch, rng))


def compile_sampler(experiment: build.Experiment, batch_size: int) -> Compiled:
  """One reverse step of the config's sampler (steps=1) at `batch_size`."""
  mesh = experiment.mesh
  config = experiment.config
  fn = experiment.sampler(steps=1, grid="uniform").jitted
  sharding = parallel.batch_sharding(mesh)
  z = jax.ShapeDtypeStruct((batch_size, *config.data_shape), jnp.int32, sharding=sharding)
  cond = (jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)
          if config.classes > 0 else None)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh))
  variables = {"params": experiment.abstract_state.ema_params}
  return compile_or_oom(lambda: fn.lower(variables, rng, z, cond))


def largest_batch(fits: Callable[[int], bool], unit: int, start: int, limit: int,
                  guess: Optional[int] = None,
                  need: Optional[Callable[[int], Optional[float]]] = None,
                  capacity: Optional[Callable[[], Optional[float]]] = None,
                  ) -> tuple[int, Optional[int]]:
  """(largest multiple of `unit` for which fits() holds, the next multiple up, which fails).

  Without `guess`: grows from `start` (x2, or x8 with `need`) until a batch
  fails. With `guess` (e.g. a smaller slice's largest batch per chip x this
  slice's chips): tries it and the next multiple up (two calls when the guess
  is the answer; `limit` is raised to 2 x guess), then grows as without one
  (with `need`) or gallops away from it by 1, 2, 4, ... units.

  `need(size)`, for a size already tried, is the memory its compile reported
  (the temporaries of a program that fits, the requirement in the compiler's
  refusal) or None; `capacity()` is what the compiler refuses beyond (None while
  unknown, e.g. until a refusal has said it). With them the bracket closes on
  the compiler's figures (`_estimate`: the line through the two smallest
  refusals' requirements, the line through the fits' temporaries, or false
  position between the largest fit and the smallest refusal; from a refusal
  alone, size x capacity / need); a bisection step instead when none lands
  inside the bracket or the same end moved twice in a row, so never much
  slower than bisection. A refusal compiles in a fraction of the time of a
  program that fits, so overshooting first and following the figures costs a
  few compiles where memory grows about linearly with the batch.

  (0, unit) when even `unit` fails; (the last size tried, None) when every size
  up to `limit` fits.
  """
  down = lambda size: max(unit, size // unit * unit)
  follow = need is not None and capacity is not None
  growth = 8 if follow else 2
  good, bad = 0, None
  tried = {}  # size -> whether it fitted, for the lines through the compiler's figures.
  fits = _noting_fits(fits, tried)

  def grow(size):  # Multiply until a size fails or `limit` fits.
    nonlocal good, bad
    while fits(size):
      good = size
      if size >= limit:
        return
      size = min(size * growth, max(limit, size + unit))
    bad = size

  if guess:
    size = down(guess)
    limit = max(limit, 2 * size) // unit * unit
    if follow and start != size and need(start) is not None:
      fits(start)  # Tried already (the plan's own compile): a point for the lines, free.
    if not fits(size):
      bad = size
    elif follow:  # The next size up, then on as without a guess.
      good = size
      if fits(size + unit):
        good = size + unit
        if good < limit:
          grow(min(good * growth, limit))
      else:
        bad = size + unit
    else:
      good, step = size, unit
      while bad is None and good < limit:
        if fits(min(good + step, limit)):
          good, step = min(good + step, limit), step * 2
        else:
          bad = min(good + step, limit)
  else:
    limit = limit // unit * unit
    grow(down(start))
  if bad is None:
    return good, None
  if follow:
    moved = []  # Which end each step moved.
    while bad - good > unit:
      size = _estimate(good, bad, tried, need, capacity())
      if good == 0:  # Nothing fits yet: from above, as long as the refusals say how much.
        if size is None or len(moved) >= 8:
          break
      elif size is None or moved[-2:] in (["good"] * 2, ["bad"] * 2):
        size = (good + bad) / 2
      size = min(max(int(size) // unit * unit, good + unit), bad - unit)
      if fits(size):
        good = size
        moved.append("good")
      else:
        bad = size
        moved.append("bad")
  if good == 0 and (guess or follow):  # Gallop down from a failure near the boundary.
    step = unit
    while good == 0 and bad - step >= unit:
      if fits(bad - step):
        good = bad - step
      else:
        bad, step = bad - step, step * 2
  lo, hi = good // unit, bad // unit  # fits(lo * unit) (or lo = 0), not fits(hi * unit).
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid * unit):
      lo = mid
    else:
      hi = mid
  return lo * unit, hi * unit


def _noting_fits(fits: Callable[[int], bool], tried: dict[int, bool]) -> Callable[[int], bool]:
  """fits(), noting each size's verdict in `tried`."""
  def noted(size: int) -> bool:
    tried[size] = fits(size)
    return tried[size]
  return noted


def _estimate(good: int, bad: int, tried: dict[int, bool],
              need: Callable[[int], Optional[float]], capacity: Optional[float]) -> Optional[float]:
  """Where the program's memory reaches capacity, from the compiler's figures; None if unknown.

  In order, the first that lands inside (good, bad):
  - the line through the two smallest refusals' requirements, extended down to capacity: above
    the boundary the TPU compiler's requirement grows about linearly with the batch (ImageNet 64
    on v5p-128: 100.66G at 13120, 154.80G at 16576; the line reaches 95.74G at 12807, the
    boundary is 13056);
  - the line through the smallest and largest fit's temporaries, where they still grow with
    the batch (below the boundary the compiler fills the HBM it has, recomputing less: 85.4 GiB
    at 4096 and 88.0 GiB at 13056 there, so this line often lands beyond the refusals);
  - false position between the largest fit and the smallest refusal (from a refusal alone,
    size x capacity / need).
  """
  if capacity is None:
    return None
  refused = sorted((s, need(s)) for s, ok in tried.items() if not ok)
  refused = [(s, n) for s, n in refused if n and n > capacity][:2]
  fitted = sorted((s, need(s)) for s, ok in tried.items() if ok)
  fitted = [(s, n) for s, n in fitted if n and 0 < n < capacity]
  for points in (refused, fitted[:1] + fitted[-1:]):
    at = (_crossing(*points, capacity)
          if len(points) == 2 and points[0][0] < points[1][0] else None)
    if at is not None and good < at < bad:
      return at
  return _false_position(good, bad, need, capacity)


def _false_position(good: int, bad: int, need: Callable[[int], Optional[float]],
                    capacity: Optional[float]) -> Optional[float]:
  """Where the needs measured at `good` (fits; 0: none) and `bad` (refused) reach capacity."""
  if capacity is None:
    return None
  above = need(bad)
  if not above or above <= capacity:
    return None
  below = need(good) if good else None
  if below is None or not 0 < below < capacity:
    return None if good else bad * capacity / above
  return _crossing((good, below), (bad, above), capacity)


def _crossing(a: tuple[int, float], b: tuple[int, float], capacity: float) -> Optional[float]:
  """The size where the line through two (size, need) points reaches capacity; None if flat
  or falling."""
  (s0, n0), (s1, n1) = a, b
  return s0 + (capacity - n0) * (s1 - s0) / (n1 - n0) if n1 > n0 else None


_BYTES = r"([\d.]+)\s*([KMGTP]?)i?B?"
_OOM_FIGURES = (  # (required, available) in the TPU compiler's two out-of-memory messages.
    re.compile(r"required for HLO temporaries \(" + _BYTES + r"\) exceeds available HBM \("
               + _BYTES + r"\)"),
    re.compile(r"Used " + _BYTES + r" of " + _BYTES + r" hbm"),
)


def _to_bytes(number: str, prefix: str) -> float:
  return float(number) * 1024.0 ** ("KMGTP".index(prefix) + 1 if prefix else 0)


def oom_figures(line: Optional[str]) -> Optional[tuple[float, float]]:
  """(bytes required, bytes available) from the compiler's out-of-memory line, or None."""
  for pattern in _OOM_FIGURES:
    match = pattern.search(line or "")
    if match:
      need, have = _to_bytes(*match.group(1, 2)), _to_bytes(*match.group(3, 4))
      return (need, have) if need > 0 else None
  return None


def program_fingerprint(lowered) -> str:
  """SHA-256 of a lowered program's text without source locations: equal fingerprints are the
  same program for the compiler (so the same verdict, memory and costs on the same slice)."""
  return hashlib.sha256(lowered.as_text(debug_info=False).encode()).hexdigest()


def compile_with_buffer_report(lower: Callable[[], Any]) -> tuple[Compiled, Optional[int]]:
  """Compiles with an XLA dump; also returns the HBM the buffer assignment placed per device.

  The dump's memory-usage report sums the buffers assigned to each memory space; the
  default space is HBM (the others are on-chip VMEM/SMEM, which memory_analysis()'s
  temporaries include). None if the compiler wrote no such report (another backend).
  """
  with tempfile.TemporaryDirectory(prefix="md4_plan_dump_") as folder:
    result = compile_or_oom(lower, {"xla_dump_to": folder, "xla_dump_hlo_pass_re": "^$"})
    return result, (assigned_hbm_bytes(folder) if result.fits else None)


def assigned_hbm_bytes(dump_folder: str) -> Optional[int]:
  """'Total bytes' of the default memory space in the dump's memory-usage report."""
  reports = sorted(glob.glob(os.path.join(dump_folder, "*memory-usage-report.txt")))
  if not reports:
    return None
  with open(reports[-1]) as f:
    text = f.read()
  match = re.search(r"Memory Space: default[^\n]*\nTotal bytes: (\d+)", text)
  return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------ costs ---

def memory(compiled) -> dict[str, int]:
  """The compiler's memory_analysis() per device, with arguments + temporaries."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "alias", "temp", "generated_code")}
  out["argument_plus_temp"] = out["argument"] + out["temp"]
  return out


def cost(compiled) -> dict[str, float]:
  """XLA's flops and bytes accessed per device (a scanned loop body counted once)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return {"flops": float(c.get("flops", float("nan"))),
          "bytes_accessed": float(c.get("bytes accessed", float("nan")))}


def _shards(mesh, specs) -> int:
  """How many distinct shards the PartitionSpecs `specs` cut over `mesh` (its named axes)."""
  axes = set()
  for spec in specs:
    for entry in spec:
      axes.update(() if entry is None else (entry if isinstance(entry, tuple) else (entry,)))
  return math.prod(mesh.shape[a] for a in axes)


def matmul_flops(jaxpr) -> float:
  """2 x MACs of every dot_general / conv_general_dilated in a (closed) jaxpr.

  A scan's body counts `length` times (so scanned layers count once per
  layer, unlike XLA's cost_analysis); a cond counts its cheapest branch; a
  Pallas kernel counts its body once per grid point (the blocks it computes,
  padding included), a shard_map body once per output shard.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
      lfree = [d for i, d in enumerate(lhs) if i not in lc and i not in lb]
      rfree = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
      total += (2.0 * math.prod(lhs[i] for i in lb) * math.prod(lhs[i] for i in lc)
                * math.prod(lfree) * math.prod(rfree))
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      per_output = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    if name == "cond":
      total += min(matmul_flops(branch) for branch in eqn.params["branches"])
      continue
    times = eqn.params.get("length", 1) if name == "scan" else 1
    if name == "pallas_call":  # The kernel body runs once per grid point (one block's dots).
      times = math.prod(eqn.params["grid_mapping"].grid)
    elif name == "shard_map":  # The body sees one shard: count every shard of the outputs.
      times = _shards(eqn.params["mesh"], eqn.params["out_specs"])
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, (jax_core.Jaxpr, jax_core.ClosedJaxpr)):
          total += times * matmul_flops(sub)
  return total


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(all-gather|reduce-scatter|all-reduce|all-to-all|"
    r"collective-permute)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|[sufc]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_CALLED = re.compile(r"(?:body|calls|branch_computations|true_computation|false_computation)="
                     r"\{?([%\w.\-, ]+)\}?")
# The TPU compiler writes a reduce-scatter as a fusion calling "%all-reduce-scatter.N" (an
# all-reduce and its dynamic-slice, run as one reduce-scatter).
_FUSED_REDUCE_SCATTER = "all-reduce-scatter"
_FUSED_CALL = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\sfusion\(.*calls=%"
                         + _FUSED_REDUCE_SCATTER)
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# Multi-slice: the TPU compiler lowers the part of a collective that crosses slices (the data
# centre network, DCN) to host-transfer sends to the "megascale" runtime, one per transfer, e.g.
# `send(...), is_host_transfer=true, frontend_attributes={..._xla_megascale_transfer_type=
# "ALL_REDUCE"}`; the in-slice part stays an ICI collective over one slice's devices.
_DCN_SEND = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\ssend\(.*"
                       r'_xla_megascale_transfer_type="(\w+)"')


def _array_bytes(shape_text: str) -> list[float]:
  return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
          for dtype, dims in _ARRAY.findall(shape_text)]


_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((\d+)\)")
_LESS_THAN = re.compile(r"ROOT .*compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT")


def _trip_count(line: str, bodies: dict[str, list[str]]) -> int:
  """A while instruction's trip count: the compiler's known_trip_count, else read from its
  condition `i < N` with N a constant (JAX's loops count i up from 0), else 1."""
  trips = _TRIPS.search(line)
  if trips:
    return int(trips.group(1))
  condition = _CONDITION.search(line)
  cond_lines = bodies.get(condition.group(1), []) if condition else []
  constants = dict(m.groups() for m in map(_CONSTANT.match, cond_lines) if m)
  for cond_line in cond_lines:
    less = _LESS_THAN.search(cond_line)
    if less and less.group(1) in constants:
      return int(constants[less.group(1)])
  return 1


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """Count and bytes (per device, per step) of each collective in a compiled HLO module.

  Bytes are the result's size (the gathered array for all-gather, the reduced
  shard for reduce-scatter); an async `-start` counts once, its output only.
  The TPU compiler's reduce-scatter fusions (an all-reduce + dynamic-slice in
  a computation named all-reduce-scatter*) count as reduce-scatters.
  A collective inside a while loop with a known trip count counts that many
  times (scanned layers).
  """
  bodies: dict[str, list[str]] = {}
  current, entry = None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match and not line.startswith(" "):
      current = match.group(1)
      bodies[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None:
      bodies[current].append(line)
  times = {entry: 1}
  pending = [entry]
  while pending:  # Multiplicity of each computation reached from the entry.
    name = pending.pop()
    for line in bodies.get(name, []):
      called = _CALLED.findall(line)
      if not called:
        continue
      n = _trip_count(line, bodies) if " while(" in line else 1
      for group in called:
        for callee in (c.strip().lstrip("%") for c in group.split(",")):
          if callee.startswith(_FUSED_REDUCE_SCATTER):
            continue  # Counted as one reduce-scatter at its call site.
          if callee in bodies and callee not in times:
            times[callee] = times[name] * n
            pending.append(callee)
  out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES + ("collective-permute",)}
  out["dcn"] = {"count": 0, "bytes": 0.0, "all_reduce_bytes": 0.0}
  for name, mult in times.items():
    for line in bodies.get(name, []):
      dcn = _DCN_SEND.match(line)
      if dcn:  # The payload: the send's first tuple element (then a u32 context, a token).
        sent = mult * _array_bytes(dcn.group(1))[0]
        out["dcn"]["count"] += mult
        out["dcn"]["bytes"] += sent
        if dcn.group(2) == "ALL_REDUCE":
          out["dcn"]["all_reduce_bytes"] += sent
        continue
      fused = _FUSED_CALL.match(line)
      if fused:
        out["reduce-scatter"]["count"] += mult
        out["reduce-scatter"]["bytes"] += mult * sum(_array_bytes(fused.group(1)))
        continue
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      shape, op, is_async = match.groups()
      sizes = _array_bytes(shape)
      if is_async and shape.startswith("(") and len(sizes) >= 2 and op != "all-reduce":
        sizes = [sizes[len(sizes) // 2]] if op == "all-gather" else sizes[-1:]
      out[op]["count"] += mult
      out[op]["bytes"] += mult * sum(sizes)
  return out


_PARAMETER = re.compile(r"=\s*(\w+)\[([\d,]*)\]\{([\d,]*)(?::([^}]*))?\}\s+parameter\(\d+\)")


def entry_parameter_bytes(hlo_text: str) -> tuple[float, float]:
  """(logical, tile-padded) bytes of the compiled program's parameters on one device.

  The logical size is the shard shapes' bytes; the padded one lays each array
  out as the compiler chose (minor-to-major order, padded to its tile, e.g.
  T(8,128) for float32 matrices), which is what memory_analysis() counts as
  arguments on TPU.
  """
  start = hlo_text.index("\nENTRY")
  entry = hlo_text[start:hlo_text.index("\n}", start)]
  logical = padded = 0.0
  for dtype, dims, minor_to_major, tiling, in _PARAMETER.findall(entry):
    shape = [int(d) for d in dims.split(",") if d]
    order = [int(d) for d in minor_to_major.split(",") if d]
    physical = [shape[i] for i in reversed(order)] if order else list(shape)
    tile = re.search(r"T\(([\d,]+)\)", tiling or "")
    tile = [int(t) for t in tile.group(1).split(",")] if tile else []
    physical = [1] * (len(tile) - len(physical)) + physical
    for k in range(1, len(tile) + 1):
      physical[-k] = -(-physical[-k] // tile[-k]) * tile[-k]
    size = _DTYPE_BYTES.get(dtype, 4)
    logical += math.prod(shape) * size
    padded += math.prod(physical) * size
  return logical, padded


def collective_seconds(colls: dict[str, dict[str, float]], ici_bandwidth: float,
                       dcn_bandwidth: Optional[float] = None, num_slices: int = 1) -> float:
  """A lower bound on the time the collectives take on one chip's links.

  In a slice (ICI): an all-reduce of N bytes moves ~2N through each chip
  (reduce-scatter then all-gather), the others ~N; divided by the chip's
  bidirectional ICI bandwidth. Across slices (colls["dcn"], the megascale
  sends): a ring all-reduce over S slices sends 2N(S-1)/S of each chip's N
  bytes, other transfers N; divided by the chip's DCN bandwidth (ICI's when
  `dcn_bandwidth` is None). Both links are assumed to run concurrently: the
  bound is the larger of the two.
  """
  ici = sum(v["bytes"] * (2 if op == "all-reduce" else 1)
            for op, v in colls.items() if op != "dcn")
  ici_s = ici / ici_bandwidth
  dcn = colls.get("dcn")
  if not dcn or not dcn["bytes"]:
    return ici_s
  reduce_factor = 2 * (num_slices - 1) / num_slices if num_slices > 1 else 1.0
  moved = dcn["all_reduce_bytes"] * reduce_factor + (dcn["bytes"] - dcn["all_reduce_bytes"])
  return max(ici_s, moved / (dcn_bandwidth or ici_bandwidth))
