"""Every command on the one-line contract: bad input, out of memory -> one line, exit 2."""

import pytest

import helpers
from md4_jax import cli
from md4_jax.experiment import validation


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


def test_an_unknown_config_key_names_the_flag(tmp_path):
  result = helpers.run_module("md4_jax.train", helpers.TINY_DIGITS, f"--workdir={tmp_path / 'w'}",
                              "--config.unet.nonexistent=1")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert "Traceback" not in result.stderr
  assert lines[-1] == ("md4_jax: error: --config.unet.nonexistent: the config has no field "
                       "'nonexistent' (every field is listed, with its choices, in "
                       "configs/base.py; nested fields are --config.GROUP.FIELD).")
  assert not (tmp_path / "w").exists()


def test_an_evaluation_time_grid_that_cannot_fit_is_refused_before_compiling(tmp_path):
  from md4_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir = helpers.saved_workdir(tmp_path / "run", helpers.digits_tiny(), step=5)
  with pytest.raises(ValueError, match=r"--num_t_samples=100000000000's time grid .* GiB on one "
                                       r"device, which has .* lower --num_t_samples"):
    evaluate.evaluate_checkpoint(workdir, num_t_samples=10**11)
