"""Every command on the one-line contract: bad input, out of memory -> one line, exit 2."""

import os
import re
import pytest

import helpers
from md4_jax import cli
from md4_jax.experiment import validation

# The hostile-input table's workdirs are built once: its tests stay on one xdist worker.
pytestmark = pytest.mark.xdist_group("contract")


def test_out_of_memory_is_one_line_naming_the_knob(capsys):
  def oom():
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.0GiB.\n"
                       "  (a long XLA report)\nTraceback-like noise")

  with pytest.raises(SystemExit) as stop:
    cli.run(oom, "md4_jax.evaluate", memory_knobs="--batch_size or --num_t_samples")
  assert stop.value.code == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert err[0].startswith("md4_jax.evaluate: error: out of memory (RESOURCE_EXHAUSTED")
  assert err[0].endswith("lower --batch_size or --num_t_samples.")
  with pytest.raises(SystemExit):
    cli.run(lambda: (_ for _ in ()).throw(MemoryError()), "md4_jax.sample")
  # Any other runtime error is not disguised as a memory problem.
  with pytest.raises(RuntimeError, match="something else"):
    cli.run(lambda: (_ for _ in ()).throw(RuntimeError("something else")), "md4_jax")


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_dtype_without_loss_scaling_is_refused(dtype):
  with pytest.raises(ValueError, match=r"dtype='.*' is out of range.*bfloat16"):
    validation.validate(helpers.digits_tiny(dtype=dtype))


def test_an_evaluation_time_grid_that_cannot_fit_is_refused_before_compiling(tmp_path):
  from md4_jax import evaluate  # pylint: disable=g-import-not-at-top
  from md4_jax.run import saved_config  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  saved_config.save_config(helpers.digits_tiny(), workdir)  # Refused before any checkpoint read.
  with pytest.raises(ValueError, match=r"--num_t_samples=100000000000's time grid .* GiB on one "
                                       r"device, which has .* lower --num_t_samples"):
    evaluate.evaluate_checkpoint(workdir, num_t_samples=10**11)


# ------------------------------------------------- sampling: no wrong answer with exit 0 ---

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from md4_jax.diffusion import sampling  # noqa: E402
from md4_jax.experiment import build  # noqa: E402


def test_guidance_needs_a_model_trained_with_label_dropout():
  no_null = build.setup(helpers.digits_tiny("tiny_cond", label_dropout=0.0))
  with pytest.raises(ValueError, match=r"label_dropout=0.0, so its null label was never trained"):
    no_null.sampler(steps=4, options=sampling.SamplerOptions(guidance=1.0))
  build.setup(helpers.digits_tiny("tiny_cond")).sampler(  # label_dropout 0.1: fine.
      steps=4, options=sampling.SamplerOptions(guidance=1.0))


@pytest.mark.parametrize("options, message", [
    (dict(guidance=float("inf")), "guidance must be a finite weight"),
    (dict(guidance=1e38), "guidance must be a finite weight"),
    (dict(guidance=float("nan")), "guidance must be a finite weight"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=-1.0), "temperature must be a finite number"),
])
def test_non_finite_and_overflowing_sampling_values_are_refused(options, message):
  with pytest.raises(ValueError, match=message):
    sampling.check_arguments("ancestral", 8, "uniform",
                             sampling.SamplerOptions(**options, cache=True))


@pytest.mark.parametrize("sampler", ["ancestral", "first_hitting"])
def test_a_near_zero_temperature_draws_the_argmax(sampler):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  model, variables = helpers.fixed_logits_model(logits)
  tokens, _ = sampling.sample(model, variables, jax.random.key(0), batch_size=16, steps=8,
                              sampler=sampler,
                              options=sampling.SamplerOptions(temperature=1e-45))
  np.testing.assert_array_equal(np.asarray(tokens), np.broadcast_to(logits.argmax(-1), (16, 6)))
  # Not every token is 0 (what dividing by 1e-45 used to give).
  assert len(set(logits.argmax(-1))) > 1


@pytest.mark.slow  # A subprocess that imports TensorFlow's gfile.
@pytest.mark.parametrize("command", ["md4_jax.evaluate", "md4_jax.sample"])
def test_an_unreachable_bucket_is_one_line(command):
  # No network here (or no such bucket where there is one): one line, exit 2, no traceback.
  result = helpers.run_module(command, "--workdir=gs://md4-jax-no-such-bucket/run")
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{command}: error:"), lines
  assert "gs://md4-jax-no-such-bucket/run" in lines[0]
  assert not os.path.exists(os.path.join(helpers.REPO, "gs:"))  # No folder named after the URL.


def test_a_remdm_loop_needs_three_numbers():
  from md4_jax.diffusion.sampling import remdm  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"takes three numbers t_on,t_off,alpha_on.*got 0.5\."):
    remdm.ReMDM(remask="loop", loop=(0.5,)).check(1.0)


# --------------------------------------- the table: each hostile input through its command ---

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
  """A digits run, a conditional run trained without label dropout, and zero-shot sets whose
  summary disagrees with the shards or whose shard is truncated."""
  import json as json_lib  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from md4_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from zero_shot_test import byte_encode_batch, write_raw  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("hostile")
  shutil.copytree(helpers.REPO + "/tests/data/workdir_cea09dd_digits_tiny", root / "digits")
  helpers.saved_workdir(root / "cond", helpers.digits_tiny("tiny_cond", label_dropout=0.0))
  raw = write_raw(root)["ptb"]
  for name in ("mismatch", "truncated"):
    prepare.prepare_zero_shot("ptb", str(raw), byte_encode_batch, data_dir=str(root / name / "ptb"),
                              eos_id=0, seq_len=8)
  summary = root / "mismatch" / "ptb" / "summary.json"
  summary.write_text(json_lib.dumps({**json_lib.loads(summary.read_text()), "protocol": "bos_eos",
                                     "blocks": 99}))
  shard = next((root / "truncated" / "ptb").glob("*.array_record"))
  shard.write_bytes(shard.read_bytes()[:40])
  shutil.copytree(root / "mismatch", root / "bad_summary")
  (root / "bad_summary" / "ptb" / "summary.json").write_text("{oops")
  return root


ROWS = {
    "guidance without label dropout": ("md4_jax.sample", ["--workdir={r}/cond", "--guidance=1"],
                                       "null label was never trained"),
    "guidance=inf": ("md4_jax.sample", ["--workdir={r}/digits", "--guidance=inf"],
                     "guidance must be a finite weight"),
    "guidance=1e38": ("md4_jax.sample", ["--workdir={r}/digits", "--guidance=1e38"],
                      "guidance must be a finite weight"),
    "zero-shot summary disagrees": ("md4_jax.evaluate", [
        "--workdir={r}/digits", "--zero_shot=ptb", "--zero_shot_dir={r}/mismatch"], "ptb"),
    "truncated zero-shot shard": ("md4_jax.evaluate", [
        "--workdir={r}/digits", "--zero_shot=ptb", "--zero_shot_dir={r}/truncated"],
                                  "does not match the checksum"),
    "invalid summary.json": ("md4_jax.evaluate", [
        "--workdir={r}/digits", "--zero_shot=ptb", "--zero_shot_dir={r}/bad_summary"],
                             "is not valid JSON"),
    "num_t_samples=1e8": ("md4_jax.evaluate", ["--workdir={r}/digits",
                                               "--num_t_samples=100000000"],
                          "lower --num_t_samples"),
    "num_samples=3e9": ("md4_jax.sample", ["--workdir={r}/digits", "--num_samples=3000000000",
                                           "--batch_size=3000000000"], "lower --batch_size"),
    "remdm loop=0.5": ("md4_jax.sample", ["--workdir={r}/digits", "--sampler=remdm",
                                          "--remask=loop", "--loop=0.5"], "three numbers"),
    "judge=/no/such/dir": ("md4_jax.sample", ["--workdir={r}/digits", "--judge=/no/such/dir"],
                           "--judge"),
    "dtype=float16": ("md4_jax.train", [helpers.TINY_DIGITS, "--workdir={r}/new",
                                        "--config.dtype=float16"], "use bfloat16"),
    "unknown config key": ("md4_jax.train", [helpers.TINY_DIGITS, "--workdir={r}/new",
                                             "--config.nonexistent=1"], "no field 'nonexistent'"),
}


@pytest.mark.slow  # One subprocess per row.
@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_hostile_input_is_one_line_exit_2_and_creates_nothing(hostile, row):
  module, args, message = ROWS[row]
  before = sorted(str(p) for p in hostile.rglob("*"))
  result = helpers.run_module(module, *[a.format(r=hostile) for a in args], "--num_samples=8"
                              if module == "md4_jax.sample" and not any(
                                  a.startswith("--num_samples") for a in args) else "--seed=0"
                              if module != "md4_jax.train" else "--config.seed=0")
  lines = result.stderr.strip().splitlines()
  if module == "md4_jax.train":  # Training logs its progress at INFO (absl: "I1205 ...").
    lines = [l for l in lines if not re.match(r"I\d{4} ", l)]
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  prog = "md4_jax" if module == "md4_jax.train" else module
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), lines
  assert message in lines[0], lines[0]
  assert sorted(str(p) for p in hostile.rglob("*")) == before  # Nothing created.
