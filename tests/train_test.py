"""Training: loss goes down, determinism, grad accumulation, devices, resume."""

import functools
import json
import os

import jax
import numpy as np
import pytest

import helpers
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax import data as data_lib
from md4_jax.experiment import parallel
from md4_jax.experiment import build
from md4_jax.run import loop


def tiny_config(variant="tiny", **overrides):
  """configs/digits.py:tiny (or another tiny variant) without dropout, with a short warmup."""
  return helpers.digits_tiny(variant, dropout_rate=0.0, warmup_steps=5, num_train_steps=40,
                             **overrides)


def _setup(config, devices):
  experiment = build.setup(config, parallel.make_mesh({"data": -1}, devices=devices))
  return experiment.mesh, experiment.model, experiment.init_state(), experiment.train_step


def _batches(config, n):
  it = data_lib.create_datasets(config, 0, 1).train_iter
  return [next(it) for _ in range(n)]


@pytest.mark.slow
def test_a_few_steps_lower_the_loss():
  config = tiny_config(learning_rate=3e-3)
  mesh, _, state, step = _setup(config, jax.devices()[:1])
  losses = []
  for batch in _batches(config, 40):
    state, metrics = step(state, parallel.to_global(batch, mesh))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4]), losses


def _run_steps(step, state, batches, mesh):
  losses = []
  for batch in batches:
    state, metrics = step(state, parallel.to_global(batch, mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params)


@pytest.mark.slow
def test_same_seed_same_run_and_eight_devices_match_one():
  from md4_jax.experiment import step as step_lib
  config = tiny_config()
  batches = _batches(config, 3)
  grads = {}
  losses = {}
  for name, devices in (("8", jax.devices()), ("1", jax.devices()[:1])):
    mesh, model, state, step = _setup(config, devices)
    batch0 = parallel.to_global(batches[0], mesh)
    grads[name] = jax.device_get(jax.jit(
        lambda p, b: step_lib.compute_grads(model, p, b, jax.random.key(1))[0])(state.params, batch0))
    if name == "8":  # Same seed → the same run, bit for bit (the step donates its input).
      again = _run_steps(step, jax.tree.map(jax.numpy.copy, state), batches, mesh)
    losses[name], params = _run_steps(step, state, batches, mesh)
    if name == "8":
      assert again[0] == losses["8"]
      jax.tree.map(np.testing.assert_array_equal, again[1], params)
  assert len(jax.devices()) == 8
  # 8 devices vs 1: same global batch and seed, equal up to float reassociation.
  np.testing.assert_allclose(losses["8"], losses["1"], rtol=2e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads["1"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
               grads["8"], grads["1"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "tiny_genmd4"])
def test_gradient_accumulation_equals_full_batch(variant):
  from md4_jax.experiment import step as step_lib
  config = tiny_config(variant, batch_size=16)
  mesh, model, state, _ = _setup(config, jax.devices()[:1])
  batch = parallel.to_global(_batches(config, 1)[0], mesh)
  rng = jax.random.key(3)
  full = jax.jit(lambda p: step_lib.compute_grads(model, p, batch, rng, 1))(state.params)
  micro = jax.jit(lambda p: step_lib.compute_grads(model, p, batch, rng, 4))(state.params)
  np.testing.assert_allclose(full[1]["loss"], micro[1]["loss"], rtol=1e-5)
  # Entries whose true value is 0 (biases feeding a norm) are float noise: atol is relative
  # to the largest gradient.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(full[0]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * scale),
               full[0], micro[0])
  assert any(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(full[0]))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(full[0]))


@pytest.mark.slow
def test_checkpoint_roundtrip_restores_identical_state_and_data(tmp_path):
  config = tiny_config()
  mesh, _, state, step = _setup(config, jax.devices())
  ds = data_lib.create_datasets(config, 0, 1)
  for _ in range(2):
    state, _ = step(state, parallel.to_global(next(ds.train_iter), mesh))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(2, state, ds.train_iter)
  expected_next = next(ds.train_iter)

  fresh_ds = data_lib.create_datasets(config, 0, 1)
  _, _, fresh_state, _ = _setup(config, jax.devices())
  restored = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt")).restore(fresh_state, fresh_ds.train_iter)
  assert int(restored.step) == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))
  np.testing.assert_array_equal(next(fresh_ds.train_iter)["x"], expected_next["x"])


def _run_main(workdir, *overrides):
  # One device, as the other tiny-digits trainings of the suite: their compiled programs are
  # shared through the session's compilation cache (the multi-host test runs the command on 8).
  return helpers.run_module("md4_jax.train", helpers.TINY_DIGITS, f"--workdir={workdir}",
                            "--config.num_samples=4", "--config.log_loss_every_steps=5",
                            *overrides)


@pytest.mark.slow
def test_command_trains_checkpoints_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  first = _run_main(workdir, "--config.num_train_steps=10", "--config.checkpoint_every_steps=5",
                    "--config.eval_every_steps=10", "--config.sample_every_steps=10")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "Final eval at step 10" in first.stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]
  assert os.path.exists(workdir / "samples" / "step_00000010.png")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  metrics = json.loads((workdir / "final_metrics.json").read_text())
  assert metrics["eval_metric"] == "bits_per_dim" and metrics["eval_examples"] == 300
  assert np.isfinite(metrics["eval_bits_per_dim"])
  assert "bits/dim" in first.stdout

  second = _run_main(workdir, "--allow_config_change", "--config.num_train_steps=15",
                     "--config.checkpoint_every_steps=5",
                     "--config.eval_every_steps=0", "--config.sample_every_steps=0")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming from step 10" in second.stderr
  assert "Final eval at step 15" in second.stdout
  assert "15" in os.listdir(workdir / "checkpoints")


@pytest.mark.slow
def test_text_runs_report_bits_per_char_never_bits_per_dim(tmp_path, monkeypatch, capsys, caplog):
  """text8 (a generated file, splits shrunk): log lines, the final line and
  final_metrics.json name bits per character."""
  from md4_jax.configs import text8 as text8_config  # pylint: disable=g-import-not-at-top
  from md4_jax.data import common, text8  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  (tmp_path / "text8").write_text("".join(rng.choice(list(text8.CHARS), 2000)))
  sizes = (1600, 200, 200)
  monkeypatch.setattr(loop.data_lib, "create_datasets", lambda config, *args: common.make_datasets(
      text8.INFO, config, *args,
      open_sources=functools.partial(text8.open_sources, split_sizes=sizes)))
  config = text8_config.get_config("tiny")
  config.update(data_dir=str(tmp_path), data_shape=(16,), num_train_steps=4, warmup_steps=1,
                log_loss_every_steps=2, eval_every_steps=2, checkpoint_every_steps=4,
                num_samples=8, sample_every_steps=4, sampling_steps=4)
  config.transformer.width = 32
  with caplog.at_level("INFO"):
    metrics = loop.run(config, str(tmp_path / "run"), mesh=helpers.one_device())
  assert metrics["eval_metric"] == "bits_per_char" and metrics["eval_examples"] == 200 // 16
  assert 0 < metrics["eval_bits_per_char"] < 10
  saved = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
  # It trained on the mesh given (one of the 8 devices), and run_info.json says so.
  info = json.loads((tmp_path / "run" / "run_info.json").read_text())
  assert info["devices"] == [str(jax.devices()[0])]
  assert "eval_bits_per_char" in saved and not any("bpd" in k or "per_dim" in k for k in saved)
  final = capsys.readouterr().out
  assert "bits/char" in final and "bits/dim" not in final
  logs = caplog.text
  assert "eval " in logs and "bits/char" in logs and "bits/dim" not in logs
  assert "train_bits_per_char=" in logs and "bpd" not in logs
  samples = (tmp_path / "run" / "samples" / "step_00000004.txt").read_text()
  assert samples.count("=== sample") == 8
