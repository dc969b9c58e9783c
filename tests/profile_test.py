"""The checkpointing and profiling options. The profiler's trace itself is checked on a
gs:// workdir in tests/gcs_test.py (the trained run traces its step 2), which covers the
local path too: a local workdir's mirror is the workdir itself (tests/paths_test.py)."""

import pytest

import helpers
from md4_jax.run import loop


def test_bad_profile_and_async_options_are_refused():
  with pytest.raises(ValueError, match="config.async_checkpointing must be one of"):
    loop.check_run_options(helpers.digits_tiny(async_checkpointing="yes"))
  with pytest.raises(ValueError, match="profile_start_step >= 1"):
    loop.check_run_options(helpers.digits_tiny(profile_start_step=0))
  config = helpers.digits_tiny()
  assert not loop.async_checkpointing(config, "/tmp/run")  # auto: local disks save in place,
  assert loop.async_checkpointing(config, "gs://b/run")  # the bucket in the background.
