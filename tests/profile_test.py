"""--config.profile_steps: a jax.profiler trace of the chosen steps in the workdir's
TensorBoard profile folder (a gs:// workdir is covered in tests/gcs_test.py)."""

import glob
import os

import pytest

import helpers
from md4_jax.run import loop


@pytest.mark.slow
def test_profile_steps_write_a_trace_into_the_workdir(tmp_path):
  config = helpers.digits_tiny(num_train_steps=3, profile_steps=2, profile_start_step=2,
                               checkpoint_every_steps=3, eval_every_steps=0, num_samples=0,
                               sample_every_steps=0, log_loss_every_steps=1)
  loop.run(config, str(tmp_path / "run"))
  traces = glob.glob(str(tmp_path / "run" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_bad_profile_and_async_options_are_refused():
  with pytest.raises(ValueError, match="config.async_checkpointing must be one of"):
    loop.check_run_options(helpers.digits_tiny(async_checkpointing="yes"))
  with pytest.raises(ValueError, match="profile_start_step >= 1"):
    loop.check_run_options(helpers.digits_tiny(profile_start_step=0))
  config = helpers.digits_tiny()
  assert not loop.async_checkpointing(config, "/tmp/run")  # auto: local disks save in place,
  assert loop.async_checkpointing(config, "gs://b/run")  # the bucket in the background.
