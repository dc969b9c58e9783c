"""md4_jax.plan: ahead-of-time TPU compiles on this CPU host (libtpu, no TPU).

The TPU compiler comes with the test extra on Linux x86-64 (`jax[tpu]`); elsewhere
these tests skip. Every compile is of the tiny synthetic-text transformer.
"""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_jax import plan as plan_lib
from md4_jax.configs import synthetic_text
from md4_jax.experiment import aot
from md4_jax.experiment import parallel
from md4_jax.experiment import tpu_slices
from md4_jax.networks import attention
from md4_jax.networks import backend
from tests import helpers


def _tpu_compiler_reason():
  try:
    tpu_slices.topology_devices(tpu_slices.lookup("v5e-1"))
  except ValueError as e:
    return str(e)
  return None


_MISSING = _tpu_compiler_reason()


def needs_tpu_compiler(test):
  """Skips without libtpu; a TPU compile takes seconds, so the slow tier."""
  skip = pytest.mark.skipif(_MISSING is not None, reason=f"no TPU compiler (libtpu): {_MISSING}")
  return pytest.mark.slow(skip(test))


def tiny(**mesh):
  config = synthetic_text.get_config("tiny")
  config.mesh.update(mesh)
  return config


def test_slice_names_translate_to_topologies():
  v5p = tpu_slices.lookup("v5p-128")
  assert (v5p.chips, v5p.topology_name, v5p.host_bounds) == (64, "v5:4x4x4", (2, 2, 1))
  v5e = tpu_slices.lookup("v5e-8")  # The v5litepod alias; chips, not cores.
  assert (v5e.name, v5e.chips, v5e.topology_name) == ("v5litepod-8", 8, "v5e:2x4")
  assert tpu_slices.lookup("v4-8").chips == 4  # Megacore: 8 TensorCores, 4 devices.
  assert tpu_slices.lookup("v5litepod-1").host_bounds == (1, 1, 1)
  for bad in ("v5p-7", "v5e-2", "h100-8", "v4"):
    with pytest.raises(ValueError, match=r"Unknown TPU slice .*valid: v4-8, .*v6e-256"):
      tpu_slices.lookup(bad)


def test_largest_batch_bisection_finds_the_boundary():
  for boundary in (0, 8, 24, 64, 1000):
    calls = []
    def fits(size, boundary=boundary):
      calls.append(size)
      return size <= boundary
    good, bad = aot.largest_batch(fits, 8, 64, limit=4096)
    assert (good, bad) == (boundary // 8 * 8, boundary // 8 * 8 + 8), boundary
    assert all(c % 8 == 0 for c in calls)
  assert aot.largest_batch(lambda s: True, 8, 64, limit=256) == (256, None)


def test_largest_batch_from_a_guess_takes_two_compiles_when_it_is_the_boundary():
  for boundary in (0, 8, 96, 1000, 1208, 1216, 3000):
    for guess in (1208, 1213, 8):
      calls = []
      def fits(size, boundary=boundary):
        calls.append(size)
        return size <= boundary
      good, bad = aot.largest_batch(fits, 8, 512, limit=4096, guess=guess)
      assert (good, bad) == (boundary // 8 * 8, boundary // 8 * 8 + 8), (boundary, guess)
      assert all(c % 8 == 0 for c in calls) and len(set(calls)) == len(calls)
      if boundary // 8 * 8 == guess // 8 * 8:
        assert calls == [guess // 8 * 8, guess // 8 * 8 + 8]
      # Galloping then bisecting: logarithmic in the guess's error, not in the batch.
      error = abs(boundary // 8 - guess // 8) + 1
      assert len(calls) <= 2 * error.bit_length() + 2, (boundary, guess, calls)
  # Everything fits: the search stops at 2 x guess (the limit is raised to it).
  assert aot.largest_batch(lambda s: True, 8, 64, limit=256, guess=1000) == (2000, None)


def test_largest_batch_follows_the_compilers_memory_figures():
  """A compiler that needs fixed + per-example memory and says how much, fitting or refusing."""
  capacity = 15.75
  for fixed, per_example, unit in ((3.0, 0.05, 8), (0.4, 0.011, 256), (12.0, 0.9, 4),
                                   (1.0, 0.0005, 64)):
    need = lambda size, fixed=fixed, per_example=per_example: fixed + per_example * size
    boundary = int((capacity - fixed) / per_example) // unit * unit
    calls = []
    def fits(size, need=need):
      calls.append(size)
      return need(size) <= capacity
    for guess in (None, boundary + 40 * unit, boundary // 3):
      calls.clear()
      good, bad = aot.largest_batch(fits, unit, 512, limit=64 * 512, guess=guess,
                                    need=lambda s, need=need: need(s) if s in calls else None,
                                    capacity=lambda: capacity)
      assert (good, bad) == (boundary, boundary + unit), (fixed, guess, calls)
      assert len(set(calls)) == len(calls), calls
      # Growth to a refusal, then the line through the two ends lands on the boundary:
      # bisecting the same bracket takes 8-12 compiles, half of them fits.
      assert len(calls) <= 6, (fixed, guess, calls)
      assert sum(need(c) <= capacity for c in calls) <= 4, calls
  # A need concave in the batch (the compiler rematerialises more at larger sizes): false
  # position alone would crawl from one end; bisection steps keep it within bisection's count.
  need = lambda size: 12.0 + 0.9 * size ** 0.5
  calls = []
  def fits(size):
    calls.append(size)
    return need(size) <= capacity
  good, bad = aot.largest_batch(fits, 8, 24, limit=64 * 512, need=need, capacity=lambda: capacity)
  assert (good, bad) == (16, 24) and len(calls) <= 4, calls
  good, bad = aot.largest_batch(lambda s: s <= 4000, 8, 512, limit=64 * 512,
                                need=lambda s: 10 + 2 * s ** 0.5, capacity=lambda: 12.0 + 2 * 4000 ** 0.5)
  assert (good, bad) == (4000, 4008)
  # Figures that mislead (or none) cost compiles, never the answer.
  for need, cap in ((lambda s: None, 15.0), (lambda s: 10.0 * s, 15.0), (lambda s: 1.0, 15.0),
                    (lambda s: 1e9 - s, 15.0), (lambda s: float(s), None),
                    (lambda s: 20.0 if s % 16 else 1.0, 15.0)):
    for boundary in (0, 8, 96, 1000):
      for guess in (None, 200):
        good, bad = aot.largest_batch(lambda s, b=boundary: s <= b, 8, 64, limit=4096, guess=guess,
                                      need=need, capacity=lambda cap=cap: cap)
        assert (good, bad) == (boundary // 8 * 8, boundary // 8 * 8 + 8), boundary


def test_largest_batch_closes_on_the_figures_the_tpu_compiler_gives_near_its_limit():
  """ImageNet 64 on v5p-128 as the TPU compiler reported it: below the boundary (13056) a fit's
  temporaries saturate (14.48 GiB at 512, 85.4 at 4096, 87.9 at 12288, 88.0 at 13056: with
  room, it recomputes less), above it the requirement grows linearly from a jump (100.66G at
  13120, 154.80G at 16576; 95.74G available). False position from a fit that close to capacity
  creeps up a few hundred at a time, each step a program that fits, the slowest compile (the
  search went 8256, 8448, 8640, 8896, 9024, 9536, 10048 before); the line through the
  refusals does not."""
  capacity, boundary, unit = 95.74, 13056, 64
  def figure(size):
    if size <= boundary:
      return min(14.48 / 512 * size, 88.03 - 2.6 * (boundary - size) / boundary)
    return 100.66 + (154.80 - 100.66) / (16576 - 13120) * (size - 13120)
  calls = []
  def fits(size):
    calls.append(size)
    return size <= boundary
  need = lambda size: figure(size) if size in calls else None
  # Minutes on a 2-core host: a fitting UViT compile takes about 5, a refusal about 1. Before,
  # the same three searches took 60, 62 and 11 (16, 18 and 3 compiles).
  for start, guess, most in ((512, None, 50), (8192, 8192, 45), (4096, 13056, 11)):
    calls.clear()
    fits(start)  # The plan's own compile at --batch.
    good, bad = aot.largest_batch(fits, unit, start, limit=64 * 512, guess=guess, need=need,
                                  capacity=lambda: capacity)
    assert (good, bad) == (boundary, boundary + unit), (start, guess, calls)
    fitting = sum(c <= boundary for c in set(calls))
    assert 5 * fitting + len(set(calls)) - fitting <= most, calls
  # (Bisection of (4096, 32768) alone takes 9 compiles, half of them fits.) Temporaries that
  # wobble by up to 3% around a line, refusals far beyond the boundary that overstate: the
  # boundary always, in about a bisection's count of compiles and fewer fits.
  rng = np.random.default_rng(0)
  counts = []
  for _ in range(100):
    fixed, per_example = rng.uniform(0.5, 40), rng.uniform(0.001, 0.05)
    unit, wobble, power = rng.choice([4, 8, 64, 256]), rng.uniform(0, 0.03), rng.choice([0, 1, 2])
    boundary = int((capacity - fixed) / per_example) // unit * unit
    if not unit <= boundary <= 4096:
      continue
    line = lambda size, f=fixed, p=per_example: f + p * size
    calls = []
    def fits(size, line=line):
      calls.append(size)
      return line(size) <= capacity
    def need(size, line=line, boundary=boundary, wobble=wobble, power=power):
      if size not in calls:
        return None
      if line(size) <= capacity:
        return line(size) * (1 + wobble * np.sin(size))
      return line(size) * (size / boundary) ** power
    start = int(rng.choice([unit, max(unit, 512 // unit * unit), 3 * boundary]))
    guess = [None, boundary // 2, boundary][rng.integers(3)]
    fits(start)
    good, bad = aot.largest_batch(fits, unit, start, limit=64 * 512, guess=guess, need=need,
                                  capacity=lambda: capacity)
    assert (good, bad) == (boundary, boundary + unit), (fixed, per_example, unit, start, guess)
    counts.append((len(set(calls)), sum(line(c) <= capacity for c in set(calls))))
  compiles, fitting = np.array(counts).T
  assert len(counts) > 50 and compiles.max() <= 16 and np.median(compiles) <= 7, counts
  assert fitting.max() <= 10 and np.median(fitting) <= 4, counts


def test_out_of_memory_figures_are_read_from_both_of_the_compilers_messages():
  gib = 2**30
  assert aot.oom_figures(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (68.97G) exceeds available HBM (15.75G).") == (68.97 * gib, 15.75 * gib)
  need, have = aot.oom_figures("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out "
                               "of memory in memory space hbm. Used 101.5M of 16.00G hbm.")
  assert (need, have) == (101.5 * 2**20, 16 * gib)
  assert aot.oom_figures("RESOURCE_EXHAUSTED: something else") is None
  assert aot.oom_figures(None) is None


def test_each_plan_compile_leaves_no_program_in_jaxs_caches():
  """JAX caches what `.lower().compile()` builds; a search of a dozen large programs then held
  24 GB of host memory. After compile_or_oom the same program is compiled again, not reused."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, seconds, **kw: compiles.append(name)
      if name == "/jax/core/compile/backend_compile_duration" else None)
  step = jax.jit(lambda x: jnp.tanh(x) * 3.0)
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  step.lower(x).compile()
  step.lower(x).compile()
  assert len(compiles) == 1  # JAX's own cache served the second compile.
  # The first is still served from the cache the plain compiles filled; each later one compiles.
  for expected in (1, 2, 3):
    assert aot.compile_or_oom(lambda: step.lower(x)).fits
    assert len(compiles) == expected


def test_collectives_count_loop_bodies_by_trip_count():
  hlo = "\n".join([
      "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
      "  %ag = f32[64,32]{1,0} all-gather(f32[8,32]{1,0} %x), dimensions={0}",
      "}",
      "%cond (p: (s32[], f32[8])) -> pred[] {",
      "  ROOT %lt = pred[] compare(%a, %b), direction=LT",
      "}",
      "%all-reduce-scatter.3 (input: f32[64,4]) -> f32[16,4] {",
      "  %r = f32[64,4]{1,0} all-reduce(%input), to_apply=%add",
      "  ROOT %d = f32[16,4]{1,0} dynamic-slice(%r, %i, %j), dynamic_slice_sizes={16,4}",
      "}",
      "ENTRY %main (a: f32[8]) -> f32[8] {",
      "  %f = f32[16,4]{1,0:T(8,128)} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.3",
      '  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, '
      'backend_config={"known_trip_count":{"n":"12"}}',
      "  %ar = (f32[16,4]{1,0}, bf16[10]{0}) all-reduce(%p, %q), to_apply=%add",
      "  %rs = f32[2,32]{1,0} reduce-scatter(%g), dimensions={0}",
      '  %send.1 = (f32[4,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%b, %t), channel_id=2, '
      'is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
      '"xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",'
      '_xla_megascale_transfer_type="ALL_REDUCE"}',
      '  %send.2 = (bf16[64]{0}, u32[], token[]) send(%c, %t), is_host_transfer=true, '
      'frontend_attributes={_xla_megascale_transfer_type="ALL_GATHER"}',
      "}",
  ])
  colls = aot.collectives(hlo)
  assert colls["all-gather"] == {"count": 12, "bytes": 12 * 64 * 32 * 4}
  assert colls["all-reduce"] == {"count": 1, "bytes": 16 * 4 * 4 + 10 * 2}
  # The plain one and the TPU's fused all-reduce-scatter (not counted as an all-reduce).
  assert colls["reduce-scatter"] == {"count": 2, "bytes": 2 * 32 * 4 + 16 * 4 * 4}
  assert colls["all-to-all"]["count"] == 0
  # Cross-slice (DCN) transfers: the megascale sends' payloads, apart from the ICI collectives.
  assert colls["dcn"] == {"count": 2, "bytes": 4 * 8 * 128 * 4 + 64 * 2,
                          "all_reduce_bytes": 4 * 8 * 128 * 4}


def test_a_loop_without_known_trip_count_reads_it_from_its_condition():
  """The TPU compiler leaves known_trip_count out of some loops (the scanned blocks' backward
  pass, where it sinks each layer's gradient all-reduce): `i < 12` in the condition counts."""
  hlo = "\n".join([
      "%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
      "  %ar = f32[3,5]{1,0} all-reduce(f32[3,5]{1,0} %x), to_apply=%add",
      "}",
      "%cond (p: (s32[], f32[8])) -> pred[] {",
      "  %constant.7 = s32[]{:T(128)} constant(12)",
      "  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0",
      "  ROOT %lt = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT, metadata={}",
      "}",
      "ENTRY %main (a: f32[8]) -> f32[8] {",
      "  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body",
      "}",
  ])
  assert aot.collectives(hlo)["all-reduce"] == {"count": 12, "bytes": 12 * 3 * 5 * 4}
  # Without a readable bound the body counts once.
  assert aot.collectives(hlo.replace("direction=LT", "direction=NE"))["all-reduce"]["count"] == 1


def test_collective_seconds_charge_dcn_at_dcn_bandwidth():
  colls = {"all-reduce": {"count": 1, "bytes": 1e6}, "all-gather": {"count": 2, "bytes": 3e6},
           "dcn": {"count": 1, "bytes": 0.0, "all_reduce_bytes": 0.0}}
  assert aot.collective_seconds(colls, 1e9) == pytest.approx(5e-3)  # (2 x 1 + 3) MB / 1 GB/s.
  colls["dcn"] = {"count": 2, "bytes": 5e5, "all_reduce_bytes": 4e5}
  # A ring all-reduce over 4 slices sends 2 x 3/4 of its bytes; the rest once: 0.7 MB.
  assert aot.collective_seconds(colls, 1e9, 1e8, 4) == pytest.approx(7e-3)  # DCN-bound.
  assert aot.collective_seconds(colls, 1e9, 1e9, 4) == pytest.approx(5e-3)  # ICI-bound.
  assert aot.collective_seconds(colls, 1e9, None, 4) == pytest.approx(5e-3)  # No figure: ICI.
  v5e = tpu_slices.lookup("v5e-8").generation
  assert v5e.dcn_bandwidth == 25e9 / 8  # 2 x 100 Gb/s NICs per 8-chip host.
  assert tpu_slices.lookup("v5p-8").generation.dcn_bandwidth == 50e9 / 8


def test_backend_choices_follow_the_target_platform():
  assert attention.resolve_attention_impl("auto", jnp.bfloat16, 64) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  with backend.target("gpu"):
    assert attention.resolve_attention_impl("auto", jnp.bfloat16, 64) == "cudnn"
  with backend.target("tpu"):
    assert backend.platform() == "tpu"
    assert attention.resolve_attention_impl("auto", jnp.float32, 64) == "pallas"
  assert attention.resolve_attention_impl("chunked", jnp.float32, 64) == "chunked"


@needs_tpu_compiler
def test_v5e8_plan_has_every_field_and_the_state_bytes_by_hand():
  config = tiny()
  # XLA's attention: auto's Pallas kernel recomputes the scores in its backward pass (and pads
  # L = 32 to its 128-block), so the step's FLOPs would exceed 3 x the forward's.
  config.attention_impl = "xla"
  report = plan_lib.plan(config, "v5e-8", largest_batch=False)
  json.dumps(report)  # Serialisable as the CLI writes it.
  assert report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert (report["chips"], report["device_kind"]) == (8, "TPU v5 lite")
  train = report["train"]
  assert train["verdict"] == "FITS" and train["oom"] is None
  assert re.fullmatch(r"[0-9a-f]{64}", train["program_sha256"])
  chip = train["per_chip"]
  for key in ("params", "opt_state", "ema_params", "state", "batch", "arguments", "temporaries",
              "total", "hbm", "tile_padding", "hbm_assigned"):
    assert chip[key] >= 0, key
  for key in ("compute_seconds", "hbm_seconds", "collective_seconds", "step_seconds",
              "mfu_ceiling", "days_to_num_train_steps"):
    assert train["roofline"][key] > 0, key
  assert train["hbm_bytes_accessed"] > 0
  assert report["eval"]["verdict"] == report["sampler"]["verdict"] == "FITS"
  # Data parallel: every chip holds the whole state. By hand: float32 params, AdamW's two
  # moments and the EMA (4 x 4 bytes a parameter); int32 step, the rng key (2 x uint32),
  # and the int32 counts of Adam and of the learning-rate schedule.
  num_params = report["num_params"]
  assert chip["params"] == chip["ema_params"] == 4 * num_params
  assert chip["state"] == 16 * num_params + 4 + 8 + 2 * 4
  assert chip["batch"] == 16 // 8 * 32 * 4  # int32 tokens [B/8, L].
  # The compiled program's parameters are exactly those shards; memory_analysis counts them
  # padded to the TPU's tiles.
  assert chip["arguments"] == chip["state"] + chip["batch"] + chip["tile_padding"]
  # The trusted figure, the HBM the buffer assignment placed, holds the arguments and is below
  # memory_analysis()'s arguments + temporaries (which count on-chip memories too).
  assert chip["arguments"] <= chip["hbm_assigned"] < chip["total"]
  assert "buffer assignment" in report["trusted"]
  # Pure data parallel: parameters replicated, the gradients reduced once, nothing gathered.
  colls = train["collectives"]
  assert colls["all-reduce"]["count"] == 1
  assert colls["all-gather"]["count"] == colls["reduce-scatter"]["count"] == 0
  assert colls["all-to-all"]["count"] == 0
  # Model FLOPs: 3 x the forward's matmuls; the step's own count (backward included) is the
  # same without remat, and XLA's count (matmuls + elementwise work) a little more.
  flops = train["flops_per_chip"]
  assert flops["step"] == pytest.approx(flops["model"], rel=0.02)
  assert flops["step"] <= flops["xla"] <= 1.5 * flops["step"]


@pytest.mark.skipif(_MISSING is not None, reason=f"no TPU compiler (libtpu): {_MISSING}")
def test_the_program_fingerprint_tells_the_same_training_step_from_another():
  from md4_jax.configs import fineweb_edu, openwebtext  # pylint: disable=g-import-not-at-top
  def fingerprint(config):
    config = plan_lib.plan_config(config, 1)
    experiment = plan_lib.setup(config, tpu_slices.lookup("v5e-8"), 1)
    batch = aot.abstract_batch(experiment.config, 16, experiment.mesh)
    return aot.program_fingerprint(experiment.train_step.lower(experiment.abstract_state, batch))
  owt = fingerprint(openwebtext.get_config("tiny"))
  assert re.fullmatch(r"[0-9a-f]{64}", owt)
  # Another corpus, the same network and recipe: the same program, so the same verdicts.
  assert fingerprint(fineweb_edu.get_config("tiny")) == owt
  other = openwebtext.get_config("tiny")
  other.learning_rate *= 2
  assert fingerprint(other) != owt


@needs_tpu_compiler
def test_fsdp_gathers_weights_and_scatters_gradients_on_v4_8():
  config = tiny(data=1, fsdp=-1)
  config.transformer.width = 64  # Divisible by the 4 fsdp shards.
  experiment = plan_lib.setup(plan_lib.plan_config(config, 1), tpu_slices.lookup("v4-8"), 1)
  assert dict(experiment.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  assert parallel.platform(experiment.mesh) == "tpu"
  result = aot.compile_train(experiment, 16)
  assert result.fits
  hlo = result.compiled.as_text()
  colls = aot.collectives(hlo)
  # Each block's weights are gathered (forward and backward) and its gradients scattered.
  assert colls["all-gather"]["count"] >= 2 * config.transformer.depth
  assert colls["reduce-scatter"]["count"] >= 1
  # No activation is gathered: no gathered array has the batch's [B, L] leading dimensions
  # (the [B, L, V] logits least of all).
  gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
  assert len(gathered) == colls["all-gather"]["count"]
  assert not [g for g in gathered if g.startswith("16,32")], gathered
  # Per chip a quarter of each sharded parameter.
  state = aot.state_bytes(experiment)
  assert state["params"] < 4 * experiment.num_params / 2


@needs_tpu_compiler
def test_two_slices_compile_with_the_data_axis_over_dcn():
  config = plan_lib.plan_config(tiny(), 2)
  experiment = plan_lib.setup(config, tpu_slices.lookup("v5e-8"), 2)
  mesh = experiment.mesh
  assert dict(mesh.shape) == {"data": 16, "fsdp": 1, "tensor": 1}
  slices = [d.slice_index for d in mesh.devices.reshape(16)]
  assert slices == [0] * 8 + [1] * 8  # Slice-major: only the data axis crosses DCN.
  result = aot.compile_train(experiment, 32)
  assert result.fits
  colls = aot.collectives(result.compiled.as_text())
  assert colls["all-reduce"]["count"] >= 1
  # The gradients cross slices over DCN as megascale all-reduce sends: at least each chip's
  # in-slice shard of the float32 gradients (4 bytes a parameter / 8), at most all of them
  # (+ tile padding).
  grads = 4 * experiment.num_params
  assert colls["dcn"]["count"] >= 1
  assert colls["dcn"]["bytes"] == colls["dcn"]["all_reduce_bytes"]
  assert grads / 8 <= colls["dcn"]["all_reduce_bytes"] <= 1.5 * grads
  with pytest.raises(ValueError, match="dcn_data=3"):
    parallel.make_mesh({"data": -1, "dcn_data": 3}, mesh.devices.reshape(16))


@needs_tpu_compiler
def test_a_tpu_plan_runs_the_pallas_kernel_unless_probabilities_are_dropped():
  """attention_impl=auto on a TPU slice: JAX's Pallas flash-attention kernel per shard (a
  shard_map), and XLA's attention where the training step drops attention probabilities
  (the kernel has none); evaluation never drops, so it keeps the kernel."""
  for rate, kernel_in_training in ((0.0, True), (0.1, False)):
    config = tiny(data=8)
    config.attention_impl, config.dropout_rate = "auto", rate
    config.transformer.dropout = "channel"
    config = plan_lib.plan_config(config, 1)
    experiment = plan_lib.setup(config, tpu_slices.lookup("v5e-8"), 1)
    batch = aot.abstract_batch(config, 8, experiment.mesh)
    train = str(experiment.train_step.trace(experiment.abstract_state, batch).jaxpr)
    assert ("pallas_call" in train) == kernel_in_training, rate
    assert ("shard_map" in train) == kernel_in_training, rate
    eval_batch = aot.abstract_batch(config, 8, experiment.mesh, eval_batch=True)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                               sharding=parallel.replicated(experiment.mesh))
    evaluate = experiment.eval_step().trace(experiment.abstract_state.ema_params, eval_batch, rng)
    assert "pallas_call" in str(evaluate.jaxpr)


@needs_tpu_compiler
def test_a_tpu_plan_compiles_xla_convolutions():
  """The UNet's CPU weight-gradient path stays on the CPU: a TPU trace keeps XLA's convs."""
  config = helpers.digits_tiny()
  config.batch_size = 8
  config = plan_lib.plan_config(config, 1)
  experiment = plan_lib.setup(config, tpu_slices.lookup("v5e-8"), 1)
  batch = aot.abstract_batch(config, 8, experiment.mesh)
  jaxpr = str(experiment.train_step.trace(experiment.abstract_state, batch).jaxpr)
  # unet.same_conv (the CPU path) is a custom_vjp; the only one left is auto's TPU attention.
  assert set(re.findall(r"custom_vjp_call\[\s*name=(\w+)", jaxpr)) == {"_flash_attention"}
  assert jaxpr.count("conv_general_dilated") > 0


@needs_tpu_compiler
def test_cli_oversized_batch_is_a_verdict_and_bad_input_one_line(tmp_path):
  out = tmp_path / "plan.json"
  proc = helpers.run_module(
      "md4_jax.plan", "--config=configs/synthetic_text.py:tiny", "--config.data_shape=(4096,)",
      "--config.attention_impl=xla",  # [B, H, L, L] scores: auto's flash kernel fits this batch.
      "--slice=v5e-8", "--batch=1024", "--nolargest_batch", "--noside_steps", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  verdict = next(l for l in proc.stdout.splitlines() if l.startswith("verdict"))
  assert "DOES NOT FIT: RESOURCE_EXHAUSTED" in verdict and "exceeds available HBM" in verdict
  report = json.loads(out.read_text())
  assert report["train"]["verdict"] == "DOES NOT FIT"
  assert "\n" not in report["train"]["oom"]
  for args, message in ((["--slice=v5p-7"], "Unknown TPU slice 'v5p-7'; valid: v4-8"),
                        (["--slice=v5e-8", "--config.mesh.tensor=3"], "Mesh")):
    proc = helpers.run_module("md4_jax.plan", "--config=synthetic_text:tiny", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("md4_jax.plan")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert proc.stdout == ""


@needs_tpu_compiler
def test_the_largest_batch_compiles_and_one_step_more_does_not():
  config = tiny()
  config.data_shape = (4096,)
  config.attention_impl = "xla"  # [B, H, L, L] scores: the boundary is a few hundred sequences.
  lines = []
  # 232 was the boundary with libtpu 0.0.42.1; elsewhere the search gallops away from it. The
  # precision the CLI compiles with (conftest's "highest" makes 6-pass float32 matmuls).
  with jax.default_matmul_precision("default"):
    report = plan_lib.plan(config, "v5e-8", batch=232, side_steps=False, largest_batch_guess=232,
                           progress=lines.append)
  lb = report["largest_batch"]
  assert lb["unit"] == 8 and lb["fails"] == lb["fits"] + 8, lb
  assert lb["fails_with"].startswith("RESOURCE_EXHAUSTED") and "\n" not in lb["fails_with"]
  # The planned batch's compile is not repeated: one more compile when 232 is the boundary.
  if lb["fits"] == 232:
    assert lb["compiles"] == 2 and report["train"]["verdict"] == "FITS"
  assert lines[0].startswith("compiling the training step at batch 232 for 8 chips")
  assert any(l.startswith(f"largest batch search: {lb['fails']} does not fit") for l in lines)
  # From a refused batch and no guess, the compiler's figures lead to the same boundary in a few
  # compiles (at libtpu 0.0.42.1: 1024 needs 68.97G of 15.75G, so 232 fits and 240 does not).
  with jax.default_matmul_precision("default"):
    blind = plan_lib.plan(config, "v5e-8", batch=1024, side_steps=False)
  assert blind["train"]["verdict"] == "DOES NOT FIT"
  assert (blind["largest_batch"]["fits"], blind["largest_batch"]["fails"]) == (
      lb["fits"], lb["fails"]), blind["largest_batch"]
  trail = blind["largest_batch"]["trail"]
  assert blind["largest_batch"]["compiles"] == len(trail) <= 5, trail
  assert trail[0]["batch"] == 1024 and not trail[0]["fits"] and trail[0]["need_bytes"] > 0
  assert all(t["need_bytes"] > 0 for t in trail), trail
  verdicts = {t["batch"]: t["fits"] for t in trail}
  assert verdicts[lb["fits"]] and not verdicts[lb["fails"]], trail
  # Checked apart from the search: one unit more is refused, and the reported batch compiles
  # (at 232 the plan's own report of the training step is that compile).
  with jax.default_matmul_precision("default"):
    experiment = plan_lib.setup(plan_lib.plan_config(config, 1), tpu_slices.lookup("v5e-8"), 1)
    assert not aot.compile_train(experiment, lb["fails"]).fits
    assert aot.compile_train(experiment, lb["fits"]).fits if lb["fits"] != 232 else (
        report["train"]["verdict"] == "FITS" and report["train"]["per_chip"]["hbm_assigned"] > 0)


@needs_tpu_compiler
def test_flops_of_scanned_layers_count_every_layer():
  """The jaxpr count is the same scanned or unrolled; XLA's counts a scanned body once."""
  counts = {}
  for scan in (False, True):
    config = tiny()
    config.transformer.depth = 4
    config.scan_layers = scan
    experiment = plan_lib.setup(plan_lib.plan_config(config, 1), tpu_slices.lookup("v5e-8"), 1)
    batch = aot.abstract_batch(config, 16, experiment.mesh)
    traced = experiment.train_step.trace(experiment.abstract_state, batch)
    counts[scan] = aot.matmul_flops(traced.jaxpr)
    if scan:
      xla_scanned = aot.cost(traced.lower().compile())["flops"] * 8
  assert counts[True] == pytest.approx(counts[False], rel=1e-9)
  assert xla_scanned < 0.6 * counts[True]  # One of four layers' matmuls, plus the rest.


@needs_tpu_compiler
def test_head_and_embedding_shard_over_tensor_on_the_compiled_program():
  """With tensor=4 the vocabulary splits where it divides: the head's V columns or the
  embedding's V + 1 rows (never both for an even tensor size; the other stays replicated),
  and both with transformer.vocab_multiple=4 (V = 15: 16 columns and 16 rows). Read from the
  compiled program's input shardings. Not the [B, L, V] logits nor the attention's heads are
  gathered, with XLA's attention (heads kept a batch dimension of their own off the CPU) or
  auto's Pallas kernel (per shard of batch and heads); with the head split alone nothing is
  gathered at all (a split embedding gathers its table for the lookup)."""
  tensor, length = 4, 32
  for vocab, multiple, split, impl in ((16, 1, {"head"}, "xla"), (15, 1, {"embedding"}, "auto"),
                                       (15, 4, {"head", "embedding"}, "xla")):
    config = tiny(data=-1, tensor=tensor)
    config.vocab_size, config.attention_impl = vocab, impl
    config.transformer.vocab_multiple = multiple
    experiment = plan_lib.setup(plan_lib.plan_config(config, 1), tpu_slices.lookup("v5e-8"), 1)
    assert dict(experiment.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": tensor}
    result = aot.compile_train(experiment, 16)
    assert result.fits
    params = result.compiled.input_shardings[0][0].params["network"]
    columns, rows = -(-vocab // multiple) * multiple, -(-(vocab + 1) // multiple) * multiple
    shards = {"head": (params["head"]["kernel"], (32, columns)),
              "embedding": (params["token_embedding"]["embedding"], (rows, 32))}
    for name, (sharding, shape) in shards.items():
      per_chip = sharding.shard_shape(shape)
      if name in split:  # A quarter of the vocabulary on each chip, split over 'tensor'.
        assert math.prod(per_chip) * tensor == math.prod(shape), (vocab, name, per_chip)
        assert "tensor" in tuple(sharding.spec), (vocab, name, sharding.spec)
      else:
        assert tuple(per_chip) == shape, (vocab, name, per_chip)
    if "head" in split:
      assert tuple(params["head"]["bias"].spec) == ("tensor",)
    hlo = result.compiled.as_text()
    gathered = [tuple(int(d) for d in g.split(",") if d)
                for g in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)]
    assert len(gathered) == aot.collectives(hlo)["all-gather"]["count"]
    # Neither [B or B/data, L, V] nor its flattened [B*L, V]: the logits stay split.
    assert not [g for g in gathered if g[-1:] in ((vocab,), (columns,)) and (
        length in g[:-1] or g[0] % length == 0)], (vocab, gathered)
    # The attention's heads stay apart over `tensor`: no gather inside a block.
    names = re.findall(r"all-gather(?:-start)?\(.*?op_name=\"([^\"]*)\"", hlo)
    assert not [n for n in names if "/attn/" in n or "/block_" in n], (impl, names)
    if split == {"head"}:  # Nothing at all: the embedding (V + 1 rows) is replicated.
      assert not gathered, (impl, gathered)


def test_mesh_candidates_split_the_slice():
  assert plan_lib.mesh_candidates(1) == [{"data": -1}, {"fsdp": -1}]
  assert plan_lib.mesh_candidates(8) == [
      {"data": -1}, {"fsdp": -1}, {"data": -1, "tensor": 2}, {"fsdp": -1, "tensor": 2},
      {"data": -1, "tensor": 4}, {"fsdp": -1, "tensor": 4}]


@needs_tpu_compiler
def test_search_mesh_suggests_the_fitting_mesh_with_the_least_communication():
  config = plan_lib.plan_config(tiny(), 1)
  config.batch_size = 16
  v5e4 = tpu_slices.lookup("v5e-4")
  # Two candidates (the enumeration is tested above) and a mesh the slice cannot take.
  rows = plan_lib.search_mesh(config, v5e4, 1, 16, [{"data": -1}, {"fsdp": -1}, {"data": 3}])
  json.dumps(rows)
  assert [r["mesh"] for r in rows] == [{"data": 4, "fsdp": 1, "tensor": 1},
                                       {"data": 1, "fsdp": 4, "tensor": 1},
                                       {"data": 3, "fsdp": 1, "tensor": 1}]
  assert [r["verdict"] for r in rows] == ["FITS", "FITS", "SKIPPED"]
  assert "has 3 devices, but 4" in rows[2]["reason"]
  (best,) = [r for r in rows if r.get("suggested")]
  # Pure data parallel reduces the float32 gradients once: 4 bytes a parameter (+ the loss
  # and metrics, a few scalars), moved twice by an all-reduce. FSDP gathers each layer's
  # weights in forward and backward and scatters the gradients: more traffic in all.
  num_params = plan_lib.setup(config, v5e4, 1).num_params
  data, fsdp = rows[0]["collectives"], rows[1]["collectives"]
  assert data["all-gather"]["count"] == data["reduce-scatter"]["count"] == 0
  assert 4 * num_params <= data["all-reduce"]["bytes"] <= 4 * num_params + 256
  assert rows[0]["collective_seconds"] == pytest.approx(
      2 * data["all-reduce"]["bytes"] / v5e4.generation.ici_bandwidth)
  assert fsdp["all-gather"]["count"] > 0 and fsdp["reduce-scatter"]["count"] > 0
  assert rows[1]["collective_seconds"] > rows[0]["collective_seconds"]
  assert best is rows[0]
