"""Tests of md4_jax.data: pipelines, sharding, checkpoints, loaders."""

import collections
import functools
import json
import os
import subprocess
import sys
import textwrap
import zipfile

from absl import flags
from array_record.python import array_record_module
import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from md4_jax.configs import base
from md4_jax.configs import digits as digits_config
from md4_jax import data
from md4_jax.data import common
from md4_jax.data import digits
from md4_jax.data import prepare
from md4_jax.data import text8
from md4_jax.data import tokenized

import helpers


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def concat(batches):
  batches = list(batches)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def digits_cfg(**overrides):
  config = digits_config.get_config("cond")
  config.batch_size = 16
  config.eval_batch_size = 64
  config.grain_prefetch = 0
  config.update(overrides)
  return config


def options(batch_size=4, eval_batch_size=4, process_index=0, process_count=1,
            seed=0, worker_count=0):
  return common.PipelineOptions(
      process_index=process_index,
      process_count=process_count,
      batch_size=batch_size,
      eval_batch_size=eval_batch_size,
      seed=seed,
      worker_count=worker_count,
      prefetch=2,
  )


def index_source(n):
  """Records whose x is their own index, to track where examples go."""
  return common.ArraySource(np.arange(n)[:, None])


# ------------------------------------------------------------- interface ---


def test_unknown_dataset_lists_valid_names():
  config = digits_cfg(dataset="mnist")
  with pytest.raises(ValueError, match="digits.*text8|cifar10.*digits"):
    data.create_datasets(config, 0, 1)


@pytest.mark.parametrize("field", ["batch_size", "eval_batch_size"])
def test_indivisible_batch_is_an_error(field):
  config = digits_cfg(**{field: 15})
  with pytest.raises(ValueError, match=f"{field}=15.*multiple.*process count"):
    data.create_datasets(config, 0, 2)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"vocab_size": 256}, "vocab_size"),
        ({"data_shape": (8, 8, 3)}, "data_shape"),
        ({"classes": 5}, "10 classes"),
    ],
)
def test_config_mismatch_is_an_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    data.create_datasets(digits_cfg(**overrides), 0, 1)


# ---------------------------------------------------------------- digits ---


def test_digits_batches():
  ds = data.create_datasets(digits_cfg(), 0, 1)
  assert (ds.info.kind, ds.info.codec, ds.num_eval_examples) == ("image", None, 300)
  batch = next(ds.train_iter)
  assert batch["x"].shape == (16, 8, 8, 1) and batch["x"].dtype == np.int32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert 0 <= batch["x"].min() and batch["x"].max() <= 16
  assert 0 <= batch["label"].min() and batch["label"].max() <= 9

  evals = list(ds.eval_batches())
  assert len(evals) == ds.num_eval_batches == 5  # ceil(300 / 64)
  for b in evals:
    assert b["x"].shape == (64, 8, 8, 1) and b["label"].shape == (64,)
    assert b["weight"].dtype == np.float32
  assert sum(b["weight"].sum() for b in evals) == ds.num_eval_examples
  # A second call starts over.
  assert_batches_equal(list(ds.eval_batches()), evals)


def test_digits_unconditional_has_no_label():
  ds = data.create_datasets(digits_cfg(classes=0), 0, 1)
  assert set(next(ds.train_iter)) == {"x"}
  assert set(next(ds.eval_batches())) == {"x", "weight"}


def test_digits_split_is_fixed_and_disjoint():
  train, test = digits.load_split("train"), digits.load_split("test")
  assert (len(train), len(test)) == (1497, 300)
  np.testing.assert_array_equal(test[0]["x"], digits.load_split("test")[0]["x"])
  all_x = np.stack([train[i]["x"] for i in range(len(train))] +
                   [test[i]["x"] for i in range(len(test))])
  assert all_x.shape == (1797, 8, 8, 1)


def test_train_order_depends_only_on_seed():
  a = take(data.create_datasets(digits_cfg(seed=3), 0, 1).train_iter, 3)
  b = take(data.create_datasets(digits_cfg(seed=3), 0, 1).train_iter, 3)
  c = take(data.create_datasets(digits_cfg(seed=4), 0, 1).train_iter, 3)
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["x"], c[0]["x"])


def test_processes_split_eval_exactly_once():
  config = digits_cfg(eval_batch_size=64)
  per_process = [list(data.create_datasets(config, p, 2).eval_batches())
                 for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 5  # ceil(150 / 32)
  real = []
  for batches in per_process:
    b = concat(batches)
    assert b["x"].shape[0] == 5 * 32
    real += [(x.tobytes(), int(y))
             for x, y, w in zip(b["x"], b["label"], b["weight"]) if w == 1]
  test = digits.load_split("test")
  expected = [(test[i]["x"].astype(np.int32).tobytes(), int(test[i]["label"]))
              for i in range(len(test))]
  assert collections.Counter(real) == collections.Counter(expected)


def test_iterator_state_round_trip():
  config = digits_cfg(random_flip=True)
  it = data.create_datasets(config, 0, 1).train_iter
  take(it, 5)
  state = it.get_state()
  expected = take(it, 3)
  restored = data.create_datasets(config, 0, 1).train_iter
  restored.set_state(state)
  assert_batches_equal(take(restored, 3), expected)


def test_iterator_checkpoints_with_orbax(tmp_path):
  config = digits_cfg()
  it = data.create_datasets(config, 0, 1).train_iter
  take(it, 4)
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
    manager.save(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = take(it, 2)
  fresh = data.create_datasets(config, 0, 1).train_iter
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
    restored = manager.restore(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(restored["data"], 2), expected)


_RESTORE_IN_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import grain, numpy as np, orbax.checkpoint as ocp
    from md4_jax.configs import digits as digits_config
    from md4_jax import data
    workdir, overrides, n = sys.argv[1], json.loads(sys.argv[2]), int(
        sys.argv[3])
    config = digits_config.get_config("cond")
    config.update(overrides)
    it = data.create_datasets(config, 0, 1).train_iter
    with ocp.CheckpointManager(workdir, item_names=("data",)) as manager:
      it = manager.restore(manager.latest_step(), args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(it)))["data"]
    batches = [next(it) for _ in range(n)]
    np.savez(workdir + "/next.npz", **{f"{i}_{k}": v
             for i, b in enumerate(batches) for k, v in b.items()})
""")


@pytest.mark.slow
def test_iterator_resumes_in_a_fresh_process(tmp_path):
  overrides = dict(batch_size=16, eval_batch_size=64, grain_prefetch=0,
                   random_flip=True, seed=7)
  config = digits_cfg(**overrides)
  it = data.create_datasets(config, 0, 1).train_iter
  take(it, 100)  # Past the first epoch of 1497 // 16 batches.
  with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
    manager.save(100, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = take(it, 3)

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", _RESTORE_IN_FRESH_PROCESS, str(tmp_path),
       json.dumps(overrides), "3"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(tmp_path / "next.npz") as saved:
    resumed = [{k: saved[f"{i}_{k}"] for k in b}
               for i, b in enumerate(expected)]
  assert_batches_equal(resumed, expected)


@pytest.mark.slow
def test_worker_processes_match_in_process_reading():
  if not flags.FLAGS.is_parsed():  # grain workers read absl flags.
    flags.FLAGS.mark_as_parsed()
  in_process = take(data.create_datasets(digits_cfg(), 0, 1).train_iter, 4)
  it = data.create_datasets(digits_cfg(grain_worker_count=2), 0, 1).train_iter
  try:
    assert_batches_equal(take(it, 4), in_process)
  finally:
    it.close()


# ------------------------------------------------------ common pipeline ---


def test_train_shards_are_disjoint_and_epochs_reshuffle():
  n = 24
  single = concat(take(common.train_iterator(
      index_source(n), common.ToTokens("x"), options(batch_size=8)), 6))["x"][:, 0]
  per_process = []
  for p in range(2):
    it = common.train_iterator(
        index_source(n), common.ToTokens("x"),
        options(batch_size=4, process_index=p, process_count=2))
    per_process.append(concat(take(it, 6))["x"][:, 0])  # Two epochs of 24.
  # Global batch k = process 0's rows then process 1's: the same as one process.
  merged = np.concatenate(
      [np.concatenate([per_process[0][k:k + 4], per_process[1][k:k + 4]])
       for k in range(0, 24, 4)])
  np.testing.assert_array_equal(merged, single)
  for epoch in (slice(0, 12), slice(12, 24)):
    first, second = set(per_process[0][epoch]), set(per_process[1][epoch])
    assert first.isdisjoint(second) and first | second == set(range(n))
  assert not np.array_equal(single[:24], single[24:])  # Reshuffled each epoch.
  assert sorted(single[:24]) == sorted(single[24:])


@pytest.mark.parametrize("n, process_count, batch", [(10, 3, 2), (2, 4, 3)])
def test_eval_covers_split_once_in_equal_batch_counts(n, process_count, batch):
  counts, seen = set(), []
  for p in range(process_count):
    make, num_batches = common.eval_batches_fn(
        index_source(n), common.ToTokens("x"),
        options(eval_batch_size=batch, process_index=p,
                process_count=process_count))
    batches = list(make())
    assert len(batches) == num_batches
    counts.add(len(batches))
    b = concat(batches)
    seen += b["x"][b["weight"] == 1, 0].tolist()
  assert len(counts) == 1
  assert sorted(seen) == list(range(n))


def test_random_flip_flips_some_images():
  x = np.arange(16 * 2 * 3, dtype=np.int32).reshape(16, 2, 3, 1)
  it = common.train_iterator(
      common.ArraySource(x), common.ToTokens("x"), options(batch_size=16),
      flip=True)
  out = next(it)["x"]
  by_key = {img.tobytes(): img for img in x}
  flipped = 0
  for img in out:
    if img.tobytes() not in by_key:
      assert img[:, ::-1].tobytes() in by_key
      flipped += 1
  assert 0 < flipped < 16


# -------------------------------------------------------------- cifar10 ---


def image_cfg(name, **overrides):
  config = base.get_config()
  config.dataset = name
  config.data_shape = {"cifar10": (32, 32, 3), "imagenet64": (64, 64, 3)}[name]
  config.vocab_size = 256
  config.batch_size = 8
  config.eval_batch_size = 8
  config.update(overrides)
  return config


def test_tfds_images_on_mock_data():
  with tfds.testing.mock_data(num_examples=21):
    ds = data.create_datasets(image_cfg("cifar10", classes=10), 1, 2)
    batch = next(ds.train_iter)
    evals = list(ds.eval_batches())
  assert batch["x"].shape == (4, 32, 32, 3) and batch["x"].dtype == np.int32
  assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
  assert 0 <= batch["x"].min() and batch["x"].max() < 256
  assert ds.num_eval_examples == 21
  assert len(evals) == 3  # ceil(ceil(21 / 2) / 4)
  assert sum(b["weight"].sum() for b in evals) == 10  # Records 1, 3, ..., 19.



def test_tfds_image_processes_share_global_batches():
  config = image_cfg("cifar10", classes=10)
  with tfds.testing.mock_data(num_examples=24):
    single = data.create_datasets(config, 0, 1)
    whole = take(single.train_iter, 2)
    whole_eval = concat(single.eval_batches())
    parts = [data.create_datasets(config, p, 2) for p in range(2)]
    per_process = [take(ds.train_iter, 2) for ds in parts]
    evals = [concat(ds.eval_batches()) for ds in parts]
  for k in range(2):  # Global batch k = process 0's rows then process 1's.
    assert_batches_equal([concat([per_process[0][k], per_process[1][k]])],
                         [whole[k]])

  def real(b):
    return collections.Counter(
        (x.tobytes(), int(y))
        for x, y, w in zip(b["x"], b["label"], b["weight"]) if w == 1)

  assert real(evals[0]) + real(evals[1]) == real(whole_eval)
  assert sum(real(whole_eval).values()) == 24
  assert not real(evals[0]) & real(evals[1])


def test_imagenet64_on_mock_data():
  # Its TFDS image feature has no static shape, so the random mock would draw
  # images of any size: mock the source with fixed-size images instead.
  def as_data_source(self, split, **kwargs):
    del self, kwargs
    rng = np.random.default_rng(len(split))
    return [{"image": rng.integers(0, 256, (64, 64, 3), np.uint8)}
            for _ in range(5)]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    ds = data.create_datasets(image_cfg("imagenet64"), 0, 1)
    assert set(next(ds.train_iter)) == {"x"}
    assert next(ds.train_iter)["x"].shape == (8, 64, 64, 3)
    assert ds.num_eval_examples == 5


def test_imagenet64_has_no_labels():
  with pytest.raises(ValueError, match="no labels"):
    data.create_datasets(image_cfg("imagenet64", classes=1000), 0, 1)


@pytest.mark.parametrize("name", ["cifar10", "imagenet64"])
def test_unprepared_tfds_data_is_a_clear_error(tmp_path, name):
  with pytest.raises(FileNotFoundError) as error:
    data.create_datasets(image_cfg(name, data_dir=str(tmp_path)), 0, 1)
  message = str(error.value)
  assert str(tmp_path) in message and "tfds build" in message
  assert "array_record" in message


# ---------------------------------------------------------------- text8 ---


SPLIT_SIZES = (900, 50, 50)


def text8_build(config, process_index, process_count, split_sizes=SPLIT_SIZES):
  """text8's Datasets with the splits shrunk to fit a small generated file."""
  return common.make_datasets(
      text8.INFO, config, process_index, process_count,
      open_sources=functools.partial(text8.open_sources, split_sizes=split_sizes))


def write_text8(directory, size=1003, seed=0):
  rng = np.random.default_rng(seed)
  text = "".join(rng.choice(list(text8.CHARS), size))
  (directory / "text8").write_text(text)
  return text


def text8_cfg(data_dir, length=8, **overrides):
  config = base.get_config()
  config.dataset = "text8"
  config.data_dir = str(data_dir)
  config.data_shape = (length,)
  config.vocab_size = 27
  config.batch_size = 4
  config.eval_batch_size = 4
  config.update(overrides)
  return config


def test_text8_vocabulary_round_trip():
  text = "the quick brown fox jumps over the lazy dog"
  ids = text8.encode(text)
  assert ids.min() >= 0 and ids.max() < 27 and ids[3] == 0
  assert text8.decode(ids) == text
  assert text8.decode(np.array([1, 27, 0, 26])) == "a_ z"
  with pytest.raises(ValueError):
    text8.encode("Hello")


def test_text8_on_generated_file(tmp_path):
  text = write_text8(tmp_path)
  config = text8_cfg(tmp_path, length=8)
  ds = text8_build(config, 0, 1)
  assert ds.info.kind == "text" and ds.num_eval_examples == 50 // 8
  batch = next(ds.train_iter)
  assert batch["x"].shape == (4, 8) and batch["x"].dtype == np.int32
  train_chunks = {text[i:i + 8] for i in range(0, 896, 8)}
  assert all(text8.decode(row) in train_chunks for row in batch["x"])

  # Every full validation chunk exactly once across two processes; tail dropped.
  seen = []
  counts = set()
  for p in range(2):
    shard = text8_build(config, p, 2)
    batches = list(shard.eval_batches())
    counts.add(len(batches))
    b = concat(batches)
    seen += [text8.decode(row) for row in b["x"][b["weight"] == 1]]
  assert len(counts) == 1
  assert sorted(seen) == sorted(text[900 + i:908 + i] for i in range(0, 48, 8))

  # The split sizes must fit in the file.
  with pytest.raises(ValueError, match="fewer than"):
    text8_build(config, 0, 1, split_sizes=(1000, 50, 50))


@pytest.mark.parametrize("process_count", [1, 3])
def test_text8_eval_scores_every_character_once(tmp_path, process_count):
  text = write_text8(tmp_path)
  sizes = (896, 48, 56)  # Validation: 6 chunks of 8, nothing dropped.
  config = text8_cfg(tmp_path, batch_size=6, eval_batch_size=6)
  rows = []
  for p in range(process_count):
    ds = text8_build(config, p, process_count, split_sizes=sizes)
    b = concat(ds.eval_batches())
    rows.append([text8.decode(x) for x in b["x"][b["weight"] == 1]])
  # Process p holds chunks p, p + P, ...: interleave back into split order.
  chunks = [rows[i % process_count][i // process_count]
            for i in range(sum(map(len, rows)))]
  assert "".join(chunks) == text[896:944]


def test_text8_standard_split_drops_only_the_tail():
  # Record counts need no file: 5M = 19,531 x 256 + 64 characters.
  valid = text8.load_split("unused", "validation", 256)
  train = text8.load_split("unused", "train", 256)
  assert len(valid) == 19_531 and 5_000_000 - len(valid) * 256 == 64
  assert len(train) == 351_562 and 90_000_000 - len(train) * 256 == 128


def test_text8_reads_zip(tmp_path):
  text = write_text8(tmp_path)
  with zipfile.ZipFile(tmp_path / "text8.zip", "w") as z:
    z.write(tmp_path / "text8", "text8")
  os.remove(tmp_path / "text8")
  ds = text8_build(text8_cfg(tmp_path), 0, 1)
  assert text8.decode(next(ds.eval_batches())["x"][0]) == text[900:908]


def test_text8_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(text8, "URL", "http://127.0.0.1:9/text8.zip")
  with pytest.raises(FileNotFoundError) as error:
    data.create_datasets(text8_cfg(tmp_path), 0, 1)
  assert str(tmp_path / "text8") in str(error.value)
  assert "127.0.0.1:9/text8.zip" in str(error.value)


def test_text8_rejects_flips(tmp_path):
  with pytest.raises(ValueError, match="random_flip"):
    data.create_datasets(text8_cfg(tmp_path, random_flip=True), 0, 1)


# ------------------------------------------------------ tokenized corpora ---


def owt_cfg(data_dir, length=16):
  config = base.get_config()
  config.dataset = "openwebtext"
  config.data_dir = str(data_dir)
  config.data_shape = (length,)
  config.vocab_size = tokenized.VOCAB_SIZE
  config.batch_size = 4
  config.eval_batch_size = 4
  return config


def write_shards(directory, split, sequences, num_shards=2):
  for s in range(num_shards):
    writer = array_record_module.ArrayRecordWriter(
        tokenized.shard_path(str(directory), split, s, num_shards),
        "group_size:1")
    for seq in sequences[s::num_shards]:
      writer.write(np.asarray(seq, tokenized.TOKEN_DTYPE).tobytes())
    writer.close()


def test_tokenized_shards(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, tokenized.VOCAB_SIZE, (10, 16))
  valid = rng.integers(0, tokenized.VOCAB_SIZE, (7, 16))
  write_shards(tmp_path, "train", train)
  write_shards(tmp_path, "validation", valid)
  ds = data.create_datasets(owt_cfg(tmp_path), 0, 1)
  assert ds.info.kind == "text" and ds.num_eval_examples == 7
  batch = next(ds.train_iter)
  assert batch["x"].shape == (4, 16) and batch["x"].dtype == np.int32
  train_rows = {row.tobytes() for row in train.astype(np.int32)}
  assert all(row.tobytes() in train_rows for row in batch["x"])
  b = concat(ds.eval_batches())
  assert sorted(r.tobytes() for r in b["x"][b["weight"] == 1]) == sorted(
      r.tobytes() for r in valid.astype(np.int32))
  codec = ds.info.text_codec(str(tmp_path))  # No tokenizer.json here: ids as numbers.
  assert codec.decode(batch["x"][0]) == " ".join(map(str, batch["x"][0].tolist()))

  with pytest.raises(ValueError, match="16 tokens"):
    data.create_datasets(owt_cfg(tmp_path, length=32), 0, 1)


@pytest.mark.parametrize("name", ["openwebtext", "fineweb_edu"])
def test_unprepared_tokenized_data_is_a_clear_error(tmp_path, name):
  config = owt_cfg(tmp_path)
  config.dataset = name
  with pytest.raises(FileNotFoundError) as error:
    data.create_datasets(config, 0, 1)
  message = str(error.value)
  assert str(tmp_path) in message
  assert f"python -m md4_jax.data.prepare --dataset={name}" in message


# ----------------------------------------------------- evaluation split ---


def test_digits_eval_split_is_selectable():
  default = data.create_datasets(digits_cfg(), 0, 1)
  assert (default.eval_split, default.num_eval_examples) == ("test", 300)
  ds = data.create_datasets(digits_cfg(eval_split="train", classes=0), 0, 1)
  assert (ds.eval_split, ds.num_eval_examples) == ("train", 1497)
  b = concat(ds.eval_batches())
  train = digits.load_split("train")
  expected = sorted(train[i]["x"].astype(np.int32).tobytes() for i in range(len(train)))
  assert sorted(x.tobytes() for x in b["x"][b["weight"] == 1]) == expected
  with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
    data.create_datasets(digits_cfg(eval_split="validation"), 0, 1)


def test_text8_eval_split_is_selectable(tmp_path):
  text = write_text8(tmp_path)
  default = text8_build(text8_cfg(tmp_path), 0, 1)
  assert default.eval_split == "validation"
  ds = text8_build(text8_cfg(tmp_path, eval_split="test"), 0, 1)
  assert ds.eval_split == "test" and ds.num_eval_examples == 50 // 8
  b = concat(ds.eval_batches())
  assert [text8.decode(r) for r in b["x"][b["weight"] == 1]] == [
      text[950 + i:958 + i] for i in range(0, 48, 8)]
  with pytest.raises(ValueError, match="no split 'dev'"):
    text8_build(text8_cfg(tmp_path, eval_split="dev"), 0, 1)


def test_tfds_eval_split_is_passed_through():
  with tfds.testing.mock_data(num_examples=5):
    assert data.create_datasets(image_cfg("cifar10"), 0, 1).eval_split == "test"
    ds = data.create_datasets(image_cfg("cifar10", eval_split="train"), 0, 1)
  assert ds.eval_split == "train" and ds.num_eval_examples == 5


def test_tokenized_eval_split_is_selectable(tmp_path):
  rng = np.random.default_rng(1)
  train = rng.integers(0, tokenized.VOCAB_SIZE, (10, 16))
  write_shards(tmp_path, "train", train)
  write_shards(tmp_path, "validation", train[:3])
  config = owt_cfg(tmp_path)
  config.eval_split = "train"
  ds = data.create_datasets(config, 0, 1)
  assert ds.eval_split == "train" and ds.num_eval_examples == 10
  config.eval_split = "test"
  with pytest.raises(ValueError, match="no split 'test'.*train, validation"):
    data.create_datasets(config, 0, 1)


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_every_dataset_record_is_consistent(name):
  """Each record describes a config it accepts, and its facts agree with each other."""
  info = data.get_info(name)
  assert info.name == name and info.kind in ("image", "text")
  assert info.metric in common.METRICS and info.prepare
  assert (info.kind == "text") == (info.codec is not None) == (info.data_shape is None)
  assert info.metric == {"image": "bits_per_dim"}.get(info.kind, info.metric)
  if info.splits is not None:
    assert info.resolve_split("") == info.eval_split in info.splits
  config = base.set_dataset(base.get_config(), name, conditional=bool(info.classes))
  info.check_config(config)  # The record's own facts pass its own check ...
  config.vocab_size += 1
  with pytest.raises(ValueError, match="token values"):  # ... and a wrong V does not.
    info.check_config(config)


def test_text8_codec_marks_infill_positions():
  codec = text8.INFO.text_codec("")
  ids, fixed = codec.encode_prompt("ab_ c")
  np.testing.assert_array_equal(ids, [1, 2, 0, 0, 3])
  np.testing.assert_array_equal(fixed, [True, True, False, True, True])
  assert codec.decode(np.array([1, 2, 27, 0, 3])) == "ab_ c"


# --------------------------------------------------------------- prepare ---


def byte_encode_batch(texts):
  """A stand-in tokenizer: UTF-8 bytes are the ids; 256 is EOS."""
  return [list(t.encode()) for t in texts]


def corpus(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return ["".join(rng.choice(list("abc xyz"), rng.integers(1, 40)))
          for _ in range(n)]


def packed(docs, seq_len):
  stream = [t for d in docs for t in list(d.encode()) + [256]]
  usable = len(stream) // seq_len * seq_len
  return np.array(stream[:usable]).reshape(-1, seq_len)


def read_split(directory, split):
  source = grain.sources.ArrayRecordDataSource(
      tokenized.find_shards(tokenized.DATASETS["openwebtext"], str(directory),
                            split))
  return np.stack([np.frombuffer(source[i], tokenized.TOKEN_DTYPE)
                   for i in range(len(source))])


def run_prepare(docs, directory, encode_batch=byte_encode_batch):
  return prepare.prepare(
      lambda start, stop: docs[start:stop], encode_batch,
      data_dir=str(directory), eos_id=256, seq_len=16, validation_docs=10,
      sequences_per_shard=5, batch_docs=4)


def test_prepare_packs_documents_with_eos(tmp_path):
  docs = corpus()
  summary = run_prepare(docs, tmp_path)
  np.testing.assert_array_equal(read_split(tmp_path, "validation"),
                                packed(docs[:10], 16))
  np.testing.assert_array_equal(read_split(tmp_path, "train"),
                                packed(docs[10:], 16))
  train = summary["train"]
  assert train["documents"] == 30 and train["sequences"] == len(
      packed(docs[10:], 16))
  assert train["tokens"] == train["sequences"] * 16 + train["dropped_tokens"]
  assert train["shards"] == -(-train["sequences"] // 5)

  ds = data.create_datasets(owt_cfg(tmp_path, length=16), 0, 1)
  assert ds.num_eval_examples == summary["validation"]["sequences"]


def test_prepare_resumes_after_a_crash(tmp_path):
  docs = corpus(seed=1)
  encoded = []

  def crashing_encode_batch(texts):
    if len(encoded) == 6:  # 3 batches of validation, then 2 of train.
      raise KeyboardInterrupt
    encoded.append(texts)
    return byte_encode_batch(texts)

  with pytest.raises(KeyboardInterrupt):
    run_prepare(docs, tmp_path, crashing_encode_batch)
  with open(tmp_path / prepare.STATE_FILE) as f:
    train_state = json.load(f)["splits"]["train"]
  assert train_state["shards_done"] >= 1 and not train_state["finished"]
  assert not list(tmp_path.glob("train-*-of-*.array_record"))

  encoded.clear()
  def counting_encode_batch(texts):
    encoded.append(texts)
    return byte_encode_batch(texts)

  run_prepare(docs, tmp_path, counting_encode_batch)
  assert sum(map(len, encoded)) == 30 - train_state["docs_done"]
  np.testing.assert_array_equal(read_split(tmp_path, "train"),
                                packed(docs[10:], 16))
  np.testing.assert_array_equal(read_split(tmp_path, "validation"),
                                packed(docs[:10], 16))
  assert not list(tmp_path.glob("*.partial")) + list(tmp_path.glob("*.done"))


def test_prepare_with_a_locally_trained_bpe_tokenizer(tmp_path):
  """A real (tiny) BPE tokenizer built here: packing = concatenated encodings + EOS."""
  docs = corpus(n=60, seed=3)
  tok, encode = helpers.tiny_bpe(docs, vocab_size=300)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  eos = tok.token_to_id("<|endoftext|>")
  out = tmp_path / "owt"
  summary = prepare.prepare(lambda start, stop: docs[start:stop], encode, data_dir=str(out),
                            eos_id=eos, seq_len=16, validation_docs=10, sequences_per_shard=5,
                            batch_docs=4)
  stream = [t for ids in encode(docs[10:]) for t in ids + [eos]]
  usable = len(stream) // 16 * 16
  np.testing.assert_array_equal(read_split(out, "train"), np.array(stream[:usable]).reshape(-1, 16))
  assert summary["train"]["dropped_tokens"] == len(stream) - usable
  # Decoding a packed sequence gives back the documents' text around the EOS markers.
  first = read_split(out, "validation")[0].tolist()
  assert tok.decode(first, skip_special_tokens=False).startswith(docs[0][:5])
