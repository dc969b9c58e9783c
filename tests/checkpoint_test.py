"""Checkpoints that cannot lie: checksums, fallback to the last good step, the run's identity."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax.experiment import parallel
from md4_jax.run import saved_config
from md4_jax.run import workdir as workdir_lib
from md4_jax.experiment import build
from md4_jax.run import loop
from md4_jax.experiment import step as step_lib


def _state(scale: float):
  """A small state with one large array (several data chunks on disk)."""
  return {"a": jnp.arange(200_000, dtype=jnp.float32) * scale,
          "b": jnp.full((3, 4), scale, jnp.bfloat16), "k": jnp.arange(2, dtype=jnp.uint32)}


def _largest_file(path):
  files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
  return max(files, key=os.path.getsize)


def _garble_arrays(state_dir):
  """Random bytes over every array data file (orbax may leave some files unreferenced)."""
  for root, _, files in os.walk(state_dir):
    if os.path.basename(root) == "d":
      for i, name in enumerate(files):
        _garble(os.path.join(root, name), seed=i)


def _garble(path, nbytes=100_000, seed=0):
  data = bytearray(open(path, "rb").read())
  start = max(0, len(data) // 2 - nbytes // 2)
  data[start:start + nbytes] = np.random.default_rng(seed).bytes(min(nbytes, len(data)))
  open(path, "wb").write(bytes(data[:len(data)]))


def test_digest_is_mesh_independent_and_sees_one_changed_value():
  state = _state(3.0)
  one = checkpoint_lib.digest(state)
  mesh = parallel.make_mesh({"data": -1})
  sharded = jax.device_put(state["a"], parallel.batch_sharding(mesh))
  assert checkpoint_lib.digest({**state, "a": sharded}) == one  # Same on 8 devices.
  changed = checkpoint_lib.digest({**state, "a": state["a"].at[12345].add(1.0)})
  assert changed["['a']"] != one["['a']"] and changed["['b']"] == one["['b']"]
  swapped = state["a"].at[jnp.array([1, 2])].set(state["a"][jnp.array([2, 1])])
  assert checkpoint_lib.digest({**state, "a": swapped})["['a']"][1] != one["['a']"][1]


def test_corrupt_checkpoints_are_reported_moved_aside_and_skipped(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=10)
  for step in range(1, 6):
    ckpt.save(step, _state(float(step)), config={"step": step})
  like = jax.tree.map(jnp.zeros_like, _state(0.0))
  _garble(_largest_file(os.path.join(directory, "5", "state")))  # Random bytes.
  with open(_largest_file(os.path.join(directory, "4", "state")), "r+b") as f:
    f.truncate(1000)  # Truncated.
  open(os.path.join(directory, "3", "state", "_METADATA"), "w").close()  # Empty metadata.
  digest_file = os.path.join(directory, "2", "digest", "metadata")  # Values that decode
  saved = json.load(open(digest_file))  # fine but differ from what was saved.
  saved["['a']"][0] += 1
  json.dump(saved, open(digest_file, "w"))

  # An explicit step fails in one line naming the step and its directory.
  for step, what in ((5, "cannot be read|fails verification"), (4, "cannot be read"),
                     (3, "cannot be read"), (2, r"fails verification.*\['a'\]")):
    with pytest.raises(checkpoint_lib.CorruptCheckpointError,
                       match=rf"step {step} \({directory}/{step}\) ({what})"):
      ckpt.restore(like, step=step)
  # A read-only reader skips them but leaves them in place ...
  reader = checkpoint_lib.Checkpointer(directory, read_only=True)
  np.testing.assert_array_equal(reader.restore_latest_good(like)["a"], _state(1.0)["a"])
  assert reader.all_steps() == [1, 2, 3, 4, 5]
  # ... and the training checkpointer moves them aside, never deleting them.
  restored = ckpt.restore_latest_good(like)
  jax.tree.map(np.testing.assert_array_equal, restored, _state(1.0))
  assert ckpt.all_steps() == [1]
  aside = sorted(os.listdir(tmp_path / checkpoint_lib.CORRUPT_DIR))
  assert [name.split(".")[0] for name in aside] == ["2", "3", "4", "5"]
  assert ckpt.saved_config() == {"step": 1}
  # When nothing verifies, it is an error, not a fresh start.
  _garble(_largest_file(os.path.join(directory, "1", "state")))
  with pytest.raises(checkpoint_lib.CorruptCheckpointError, match="none of them verifies"):
    ckpt.restore_latest_good(like)


@pytest.mark.slow
def test_nan_in_the_optimiser_state_is_caught_like_a_nan_loss():
  experiment = build.setup(helpers.digits_tiny(), helpers.one_device())
  state = experiment.init_state()
  poisoned = state.replace(opt_state=jax.tree.map(
      lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      state.opt_state))
  assert bool(step_lib.all_finite(state)) and not bool(step_lib.all_finite(poisoned.opt_state))
  batch = parallel.to_global(
      {"x": np.zeros((16, 8, 8, 1), np.int32)}, experiment.mesh)
  before = jax.device_get(state.params)
  new, metrics = experiment.train_step(poisoned, batch)  # Donates its input.
  assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
  # check_nans (skip_nonfinite) keeps the old parameters: the NaN never reaches them.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.params), before)


@pytest.mark.slow
def test_resume_falls_back_to_the_last_good_step_and_ends_bit_identical(tmp_path):
  """Garbled latest checkpoint: the run falls back to the previous one, moves the bad one
  aside and finishes bit-identical to an uninterrupted run; config.json is not the truth."""
  base = dict(num_samples=0, eval_every_steps=0, sample_every_steps=0, checkpoint_every_steps=2,
              log_loss_every_steps=2, max_checkpoints_to_keep=3)
  reference = tmp_path / "reference"
  loop.run(helpers.digits_tiny(num_train_steps=8, **base), str(reference),
           mesh=helpers.one_device())
  # The interrupted run: the reference as it stood at step 6 (checkpoints 4 and 6).
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  (workdir / "final_metrics.json").unlink(missing_ok=True)
  assert helpers.checkpoint_steps(workdir) == [4, 6]

  # The run's identity lives in its checkpoints: without config.json a changed model is refused.
  os.remove(workdir / "config.json")
  changed = helpers.digits_tiny(num_train_steps=8, **base)
  changed.unet.channels = 16
  with pytest.raises(ValueError, match=r"unet.channels: 8 -> 16"):
    loop.run(changed, str(workdir), mesh=helpers.one_device())

  _garble_arrays(workdir / "checkpoints" / "6" / "state")
  metrics = loop.run(helpers.digits_tiny(num_train_steps=8, **base), str(workdir),
                     allow_config_change=True, mesh=helpers.one_device())
  assert metrics["step"] == 8
  assert [n.split(".")[0] for n in os.listdir(workdir / checkpoint_lib.CORRUPT_DIR)] == ["6"]
  _, _, ours = workdir_lib.restore_run(str(workdir))
  _, _, theirs = workdir_lib.restore_run(str(reference))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ours), jax.device_get(theirs))
  assert saved_config.load_config(str(workdir)).num_train_steps == 8  # Rewritten copy.

  # sample / evaluate with an explicit corrupt --step: one line, exit 2.
  _garble_arrays(workdir / "checkpoints" / "8" / "state")
  for module, extra in (("md4_jax.evaluate", []), ("md4_jax.sample", ["--num_samples=1"])):
    result = helpers.run_module(module, f"--workdir={workdir}", "--step=8", *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith(f"{module}: error:")]
    assert len(errors) == 1 and "Checkpoint step 8" in errors[0], result.stderr[-2000:]


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_error_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch):
  real_save = checkpoint_lib.ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(28, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", save)
  config = helpers.digits_tiny(num_train_steps=6, num_samples=0, eval_every_steps=0,
                               sample_every_steps=0, checkpoint_every_steps=2)
  with pytest.raises(OSError, match="step 4 .*No space left on device.*previous checkpoints "
                                    "are intact"):
    loop.run(config, str(tmp_path), mesh=helpers.one_device())
  _, _, state = workdir_lib.restore_run(str(tmp_path))
  assert int(state.step) == 2


@pytest.mark.slow
def test_a_checkpoint_of_another_network_is_a_mismatch_not_corruption(tmp_path):
  mesh = helpers.one_device()
  config = helpers.digits_tiny()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(1, build.setup(config, mesh).init_state(), config={"step": 1})
  wider = helpers.digits_tiny()
  wider.unet.channels *= 2
  other = build.setup(wider, mesh)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"step 1 .*different state.*other shapes \(first: \w+/network/"):
    other.restore(ckpt)
  assert ckpt.all_steps() == [1]  # Left in place, not moved aside as corrupt.
  assert not (tmp_path / checkpoint_lib.CORRUPT_DIR).exists()
  # A network with other parameter names: arrays only on one side.
  wider.network = "transformer"
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="only in the checkpoint"):
    build.setup(wider, mesh).restore(ckpt, step=1)
  restored = build.setup(config, mesh).restore(ckpt)  # The same structure still restores.
  assert int(restored.step) == 0
