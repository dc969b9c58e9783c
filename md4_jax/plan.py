r"""Compiles a config for a Cloud TPU slice, without a TPU: does it fit, what will it cost.

  python -m md4_jax.plan --config=configs/openwebtext.py --slice=v5p-128
  python -m md4_jax.plan --config=openwebtext --slice=v5e-8 --batch=256 --out=plan.json
  python -m md4_jax.plan --config=text8 --slice=v5p-32 --num_slices=2 --config.mesh.fsdp=4
  python -m md4_jax.plan --config=digits:tiny --slice=v4-8 --search_mesh

Builds the experiment exactly as training does (`build.setup`, any config,
variant and --config.* override) over the slice's compile-only devices (the
TPU compiler, libtpu: `pip install -e ".[tpu]"`, Linux x86-64), with the state
as sharded shapes (nothing is allocated), and compiles the training step, the
evaluation step and one sampler step. Prints a table and, with --out, writes
it as JSON: the mesh; per chip the state (params + optimiser + EMA), the
temporaries, the total against the chip's HBM and the compiler's verdict
(FITS, or DOES NOT FIT with its out-of-memory line); the largest global batch
that compiles (bisection; the next size up shown failing); model FLOPs per
chip (scanned layers counted per layer); HBM bytes accessed; the collectives
in the compiled program; a roofline lower bound on the step time, the MFU
ceiling it implies and the time to config.num_train_steps. --slice names are
Cloud TPU accelerator types (v4-8, v5p-128, v5litepod-8 = v5e-8, v6e-256;
experiment/tpu_slices.py). Exit codes: 0 (a verdict, fits or not), 2 bad
input (unknown slice, a mesh the slice cannot take, no TPU compiler).
"""

import json
import os
import sys
import time
from typing import Callable, Optional

# The host computes nothing: never initialise a local accelerator (or libtpu's search for one).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from md4_jax import cli  # noqa: E402
from md4_jax.experiment import aot  # noqa: E402
from md4_jax.experiment import build  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.experiment import tpu_slices  # noqa: E402

_CONFIG = cli.define_config_flag(
    "config", "Config to plan: a file (configs/openwebtext.py[:variant]) or a shipped config's "
    "name (openwebtext[:variant]).")
_SLICE = flags.DEFINE_string("slice", None, "Cloud TPU accelerator type, e.g. v5p-128, v5e-8.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (data parallel).")
_BATCH = flags.DEFINE_integer("batch", 0, "Global training batch (0: config.batch_size).")
_LARGEST = flags.DEFINE_bool("largest_batch", True,
                             "Search on compiles for the largest global batch that fits.")
_GUESS = flags.DEFINE_integer(
    "largest_batch_guess", 0, "Start the search for the largest batch here (0: grow x8 from "
    "--batch until the compiler refuses, then follow its memory figures). Per-chip memory "
    "depends on the per-chip batch, so a slice of the same chip generation gives a guess: its "
    "largest batch / its chips x this slice's chips. Two compiles when the guess is the "
    "boundary.")
_SIDE_STEPS = flags.DEFINE_bool("side_steps", True, "Also compile the evaluation step (at "
                                 "config.eval_batch_size) and one sampler step (at --batch).")
_SEARCH = flags.DEFINE_bool("search_mesh", False, "Also compile the data/fsdp/tensor meshes of "
                            "the slice and suggest the one that fits with the least communication.")
_OUT = flags.DEFINE_string("out", None, "Write the plan as JSON here.")
flags.mark_flags_as_required(["config", "slice"])

LARGEST_BATCH_FACTOR = 64  # The bisection stops at 64x the planned batch.
TRUSTED = ("the TPU compiler's: it assigns every buffer at compile time and refuses "
           "(RESOURCE_EXHAUSTED) a program that does not fit HBM; per_chip.hbm_assigned is the HBM "
           "its buffer assignment placed (XLA dump, default memory space). memory_analysis() "
           "arguments + temporaries (per_chip.total) also counts on-chip VMEM/SMEM and shared "
           "buffers, so it can exceed HBM for a program that fits")


def plan_config(config: ml_collections.ConfigDict, num_slices: int) -> ml_collections.ConfigDict:
  """The config with mesh.dcn_data = num_slices (checked against a value the config sets)."""
  config = ml_collections.ConfigDict(config.to_dict())
  dcn = int(config.mesh.get("dcn_data", 1))
  if num_slices < 1:
    raise ValueError(f"--num_slices must be >= 1, got {num_slices}.")
  if dcn not in (1, num_slices):
    raise ValueError(f"config.mesh.dcn_data={dcn} but --num_slices={num_slices}: the data axis "
                     "spans one slice per DCN replica; set them equal.")
  config.mesh.dcn_data = num_slices
  return config


def setup(config, tpu_slice: tpu_slices.Slice, num_slices: int, mesh_sizes=None):
  """build.setup over the slice's compile-only devices (the config's mesh, or `mesh_sizes`)."""
  devices = tpu_slices.topology_devices(tpu_slice, num_slices)
  sizes = dict(config.mesh.to_dict()) if mesh_sizes is None else dict(mesh_sizes)
  mesh = parallel.make_mesh(sizes, devices)
  return build.setup(config, mesh)


def _batch_unit(experiment) -> int:
  return parallel.batch_size_per_shard(experiment.mesh) * experiment.config.grad_accum_steps


def _train_report(experiment, batch: int, tpu_slice) -> dict:
  """Compile the train step at `batch`; its memory, FLOPs, bytes, collectives and roofline."""
  gen = tpu_slice.generation
  chips = experiment.mesh.size
  state = aot.state_bytes(experiment)
  inputs = aot.abstract_batch(experiment.config, batch, experiment.mesh)
  traced = experiment.train_step.trace(experiment.abstract_state, inputs)
  step_flops = aot.matmul_flops(traced.jaxpr) / chips
  eval_inputs = aot.abstract_batch(experiment.config, batch, experiment.mesh, eval_batch=True)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  fwd = experiment.eval_step().trace(experiment.abstract_state.params, eval_inputs, rng)
  model_flops = 3.0 * aot.matmul_flops(fwd.jaxpr) / chips
  start = time.perf_counter()
  lowered = traced.lower()
  result, assigned = aot.compile_with_buffer_report(lambda: lowered)
  report = {
      "batch_size": batch, "compile_seconds": round(time.perf_counter() - start, 1),
      "program_sha256": aot.program_fingerprint(lowered),
      "verdict": "FITS" if result.fits else "DOES NOT FIT", "oom": result.oom,
      "per_chip": {"params": state["params"], "opt_state": state["opt_state"],
                   "ema_params": state["ema_params"], "other_state": state["other"],
                   "state": sum(state.values()), "batch": aot.shard_bytes(inputs),
                   "hbm": gen.hbm_bytes},
      "flops_per_chip": {"model": model_flops, "step": step_flops},
  }
  if not result.fits:
    return report
  mem = aot.memory(result.compiled)
  hlo = result.compiled.as_text()
  _, padded = aot.entry_parameter_bytes(hlo)
  report["per_chip"].update(hbm_assigned=assigned, arguments=mem["argument"], tile_padding=padded - (
      report["per_chip"]["state"] + report["per_chip"]["batch"]), temporaries=mem["temp"],
                            total=mem["argument_plus_temp"], outputs_not_aliased=mem["output"] - mem["alias"])
  costs = aot.cost(result.compiled)
  report["flops_per_chip"]["xla"] = costs["flops"]
  report["hbm_bytes_accessed"] = costs["bytes_accessed"]
  colls = aot.collectives(hlo)
  report["collectives"] = colls
  compute_s = step_flops / gen.peak_bf16_flops
  memory_s = costs["bytes_accessed"] / gen.hbm_bandwidth
  num_slices = int(experiment.config.mesh.get("dcn_data", 1))
  comm_s = aot.collective_seconds(colls, gen.ici_bandwidth, gen.dcn_bandwidth, num_slices)
  step_s = max(compute_s, memory_s, comm_s)
  bound = ("compute", "memory", "collectives")[[compute_s, memory_s, comm_s].index(step_s)]
  steps = int(experiment.config.num_train_steps)
  report["roofline"] = {
      "compute_seconds": compute_s, "hbm_seconds": memory_s, "collective_seconds": comm_s,
      "dcn_at": ("dcn_bandwidth" if gen.dcn_bandwidth else "ici_bandwidth (no DCN figure)")
                if num_slices > 1 else None,
      "step_seconds": step_s, "bound_by": bound,
      "mfu_ceiling": model_flops / (step_s * gen.peak_bf16_flops) if step_s > 0 else None,
      "num_train_steps": steps, "days_to_num_train_steps": step_s * steps / 86400}
  return report


def _side_report(compiled: aot.Compiled) -> dict:
  if not compiled.fits:
    return {"verdict": "DOES NOT FIT", "oom": compiled.oom}
  mem = aot.memory(compiled.compiled)
  return {"verdict": "FITS", "oom": None, "arguments": mem["argument"],
          "temporaries": mem["temp"], "total": mem["argument_plus_temp"],
          "collectives": aot.collectives(compiled.compiled.as_text())}


def mesh_candidates(chips: int) -> list[dict]:
  """The meshes --search_mesh tries inside a slice of `chips`: all data, all fsdp, and each
  with tensor = 2, 4, 8 where it divides the chips and leaves more than one."""
  candidates = [{"data": -1}, {"fsdp": -1}]
  for tensor in (2, 4, 8):
    if chips % tensor == 0 and chips > tensor:
      candidates += [{"data": -1, "tensor": tensor}, {"fsdp": -1, "tensor": tensor}]
  return candidates


def search_mesh(config, tpu_slice, num_slices: int, batch: int,
                candidates: Optional[list[dict]] = None) -> list[dict]:
  """Each data/fsdp/tensor split (default `mesh_candidates`) tried at `batch`: fits,
  per-chip total, collectives.

  The suggestion ("suggested": True) is the fitting mesh whose collectives take the
  least time on the links (`aot.collective_seconds`: an all-reduce moves its bytes
  twice), ties broken by the smaller per-chip total. A mesh the batch or the model
  cannot take is SKIPPED with the reason.
  """
  if candidates is None:
    candidates = mesh_candidates(tpu_slice.chips)
  rows = []
  for sizes in candidates:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes, "dcn_data": num_slices}
    row = {"mesh": {k: v for k, v in sizes.items() if k != "dcn_data"}}
    try:
      experiment = setup(config, tpu_slice, num_slices, sizes)
      row["mesh"] = dict(experiment.mesh.shape)
      parallel.check_batch_size(batch, experiment.mesh)
    except ValueError as e:
      rows.append({**row, "verdict": "SKIPPED", "reason": cli.one_line(e)})
      continue
    result = aot.compile_train(experiment, batch)
    row["verdict"] = "FITS" if result.fits else "DOES NOT FIT"
    if result.fits:
      colls = aot.collectives(result.compiled.as_text())
      row["total"] = aot.memory(result.compiled)["argument_plus_temp"]
      row["collectives"] = colls
      row["collective_bytes"] = sum(v["bytes"] for v in colls.values())
      gen = tpu_slice.generation
      row["collective_seconds"] = aot.collective_seconds(colls, gen.ici_bandwidth,
                                                         gen.dcn_bandwidth, num_slices)
    else:
      row["oom"] = result.oom
    rows.append(row)
  fitting = [r for r in rows if r["verdict"] == "FITS"]
  if fitting:
    best = min(fitting, key=lambda r: (r["collective_seconds"], r["total"]))
    best["suggested"] = True
  return rows


def plan(config: ml_collections.ConfigDict, slice_name: str, *, num_slices: int = 1,
         batch: int = 0, largest_batch: bool = True, side_steps: bool = True,
         mesh_search: bool = False, largest_batch_guess: int = 0,
         progress: Callable[[str], None] = lambda line: None) -> dict:
  """The plan of `config` on `num_slices` x `slice_name` (see the module docstring).

  `progress` gets a line as each compile starts and ends (the CLI prints them to stderr).

  Raises:
    ValueError: unknown slice, a mesh the slice cannot take, a batch the mesh
      does not divide, or no TPU compiler (one-line messages).
  """
  tpu_slice = tpu_slices.lookup(slice_name)
  config = plan_config(config, num_slices)
  batch = int(batch or config.batch_size)
  config.batch_size = batch  # So setup checks it (masked_head packs per batch shard).
  experiment = setup(config, tpu_slice, num_slices)
  mesh = experiment.mesh
  if batch % _batch_unit(experiment):
    raise ValueError(f"--batch={batch} must be a multiple of the mesh's "
                     f"{parallel.batch_size_per_shard(mesh)} batch shards x grad_accum_steps="
                     f"{config.grad_accum_steps}.")
  gen = tpu_slice.generation
  out = {
      "slice": tpu_slice.name, "num_slices": num_slices, "chips": mesh.size,
      "topology": tpu_slice.topology_name, "device_kind": mesh.devices.flat[0].device_kind,
      "mesh": dict(mesh.shape), "num_params": experiment.num_params,
      "datasheet": {"hbm_bytes": gen.hbm_bytes, "peak_bf16_flops": gen.peak_bf16_flops,
                    "hbm_bandwidth": gen.hbm_bandwidth, "ici_bandwidth": gen.ici_bandwidth,
                    "dcn_bandwidth": gen.dcn_bandwidth,
                    "source": gen.source},
      "trusted": TRUSTED, "dtype": config.dtype,
  }
  progress(f"compiling the training step at batch {batch} for {mesh.size} chips")
  out["train"] = _train_report(experiment, batch, tpu_slice)
  progress(f"batch {batch}: {out['train']['verdict']} ({out['train']['compile_seconds']:.0f} s)")
  if side_steps:
    eval_batch = int(config.eval_batch_size)
    if eval_batch % parallel.batch_size_per_shard(mesh):
      eval_batch = batch
    progress(f"compiling the evaluation step (batch {eval_batch}) and one sampler step")
    out["eval"] = {"batch_size": eval_batch,
                   **_side_report(aot.compile_eval(experiment, eval_batch))}
    out["sampler"] = {"batch_size": batch, **_side_report(aot.compile_sampler(experiment, batch))}
  if largest_batch:
    unit = _batch_unit(experiment)
    # size -> (None if it fits, else the out-of-memory line; the bytes it needs: the
    # temporaries of a fit, the requirement of a refusal). The trail keeps the compiles' order.
    tried, trail = {}, []
    available = []  # What the compiler refuses beyond, from the first refusal that says it.
    def record(size, oom, temporaries, seconds):
      figures = aot.oom_figures(oom)
      if figures and not available:
        available.append(figures[1])
      tried[size] = oom, (figures[0] if figures else None) if oom else temporaries
      trail.append({"batch": size, "fits": oom is None, "seconds": seconds,
                    "need_bytes": tried[size][1]})
    record(batch, out["train"]["oom"], out["train"]["per_chip"].get("temporaries"),
           out["train"]["compile_seconds"])
    def fits(size):
      if size not in tried:
        start = time.perf_counter()
        result = aot.compile_train(experiment, size)
        record(size, result.oom, aot.memory(result.compiled)["temp"] if result.fits else None,
               round(time.perf_counter() - start, 1))
        oom, need = tried[size]
        progress(f"largest batch search: {size} {'does not fit' if oom else 'fits'} "
                 f"({trail[-1]['seconds']:.0f} s; {_gib(need)} "
                 f"{'required' if oom else 'of temporaries'} per chip)")
      return tried[size][0] is None
    good, bad = aot.largest_batch(
        fits, unit, batch, limit=LARGEST_BATCH_FACTOR * batch, guess=largest_batch_guess,
        need=lambda size: tried[size][1] if size in tried else None,
        capacity=lambda: available[0] if available else None)
    out["largest_batch"] = {"fits": good, "fails": bad,
                            "fails_with": tried[bad][0] if bad in tried else None,
                            "unit": unit, "compiles": len(tried), "trail": trail}
  if mesh_search:
    progress("compiling the slice's meshes")
    out["mesh_search"] = search_mesh(config, tpu_slice, num_slices, batch)
    out["suggested_mesh"] = next((r["mesh"] for r in out["mesh_search"] if r.get("suggested")),
                                 None)
  return out


def _gib(n) -> str:
  """Bytes in GiB, or MiB / KiB when smaller."""
  if n is None:
    return "-"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
    if abs(n) >= size / 10:
      return f"{n / size:.2f} {unit}"
  return f"{n / 2**10:.1f} KiB"


def _flop(n) -> str:
  for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if abs(n) >= size:
      return f"{n / size:.3g} {unit}"
  return f"{n / 1e6:.3g} MFLOP"


def _seconds(s) -> str:
  return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def table(report: dict) -> str:
  """The plan as aligned text lines."""
  train = report["train"]
  chip = train["per_chip"]
  rows = [
      ("slice", f"{report['slice']} x {report['num_slices']} ({report['chips']} chips, "
                f"{report['topology']}, {report['device_kind']})"),
      ("mesh", " ".join(f"{k}={v}" for k, v in report["mesh"].items())),
      ("parameters", f"{report['num_params'] / 1e6:.1f} M ({report['dtype']} activations)"),
      ("global batch", str(train["batch_size"])),
      ("per chip: params + opt + EMA",
       f"{_gib(chip['params'])} + {_gib(chip['opt_state'])} + {_gib(chip['ema_params'])}"),
      ("per chip: temporaries", _gib(chip.get("temporaries"))),
      ("per chip: arguments (tile-padded)", _gib(chip.get("arguments"))),
      ("per chip: arguments + temporaries", _gib(chip.get("total"))),
      ("per chip: HBM assigned (trusted)", f"{_gib(chip.get('hbm_assigned'))} of {_gib(chip['hbm'])}"),
      ("verdict (compiler)", train["verdict"] + (f": {train['oom']}" if train["oom"] else "")),
  ]
  if "largest_batch" in report:
    lb = report["largest_batch"]
    if lb["fails"] is None:
      rows.append(("largest global batch", f"{lb['fits']} fits (the search stopped there)"))
    else:
      fail = f" ({lb['fails_with']})" if lb.get("fails_with") else ""
      rows.append(("largest global batch", f"{lb['fits']} fits; {lb['fails']} does not{fail}"))
  flops = train["flops_per_chip"]
  xla = f"; XLA's count {_flop(flops['xla'])}, a scanned body once" if "xla" in flops else ""
  rows.append(("model FLOPs / step / chip", f"{_flop(flops['model'])} (the step's matmuls "
               f"with recompute {_flop(flops['step'])}{xla})"))
  if train["verdict"] == "FITS":
    rows.append(("HBM bytes accessed / chip", _gib(train["hbm_bytes_accessed"])))
    colls = train["collectives"]
    rows.append(("collectives / step", ", ".join(
        f"{op} {v['count']} x ({_gib(v['bytes'])})" for op, v in colls.items() if v["count"])
        or "none"))
    roof = train["roofline"]
    rows.append(("step time lower bound", f"{_seconds(roof['step_seconds'])} ({roof['bound_by']}"
                 f"; compute {_seconds(roof['compute_seconds'])}, HBM {_seconds(roof['hbm_seconds'])}, "
                 f"collectives {_seconds(roof['collective_seconds'])})"))
    rows.append(("MFU ceiling", f"{roof['mfu_ceiling']:.1%} (of bf16 peak)"))
    rows.append((f"time to {roof['num_train_steps']} steps", f"{roof['days_to_num_train_steps']:.3g} days at the bound"))
  for name in ("eval", "sampler"):
    if name not in report:
      continue
    side = report[name]
    detail = _gib(side.get("total")) if side["verdict"] == "FITS" else side["oom"]
    rows.append((f"{name} step (batch {side['batch_size']})", f"{side['verdict']}: {detail}"))
  for row in report.get("mesh_search", []):
    mark = "  <- suggested" if row.get("suggested") else ""
    detail = (f"{_gib(row['total'])}, collectives {_gib(row['collective_bytes'])} "
              f"({_seconds(row['collective_seconds'])})" if row["verdict"] == "FITS"
              else row.get("reason") or row.get("oom") or "")
    rows.append((f"mesh {row['mesh']}", f"{row['verdict']} {detail}{mark}"))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv):
  cli.start(argv, quiet=True)
  def go():
    report = plan(_CONFIG.value, _SLICE.value, num_slices=_NUM_SLICES.value, batch=_BATCH.value,
                  largest_batch=_LARGEST.value, side_steps=_SIDE_STEPS.value,
                  mesh_search=_SEARCH.value, largest_batch_guess=_GUESS.value,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(report), flush=True)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        json.dump(report, f, indent=1)
    logging.info("Wrote %s", _OUT.value)
  cli.run(go, "md4_jax.plan")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("md4_jax.plan"))
