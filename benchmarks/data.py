r"""Input-pipeline throughput: `create_datasets(config).train_iter` alone.

Builds local stand-ins for each dataset in the on-disk format the real one
uses, then times the training iterator of the dataset's config (its batch
size, one process) for every `--workers` x `--prefetch` combination:

* digits: the embedded scikit-learn set (nothing generated).
* cifar10, imagenet64: a prepared TFDS ArrayRecord dataset (records
  serialised with the real TFDS features, so PNG for CIFAR-10 and JPEG for
  downsampled ImageNet; `dataset_info.json`), read through
  `tfds.data_source` exactly as in training. Images are 4x4 colour blocks
  plus noise: ~2.5 KB records for cifar10 (real ones average ~2.3 KB) and
  ~4.4 KB for imagenet64 (the table's "record KB" column).
* text8: a 100M-character file in the text8 format (random characters).
* openwebtext: ArrayRecord shards of 1024-token sequences written by
  `md4_jax.data.prepare` from generated token documents (fineweb_edu reads
  the same shards with the same code).

Per combination: build the datasets, time the first batch (startup: opening
files, spawning workers), warm up for at least `--warmup` batches and
`--warmup_s` seconds (this drains what was buffered during startup), then
time `--repeats` back-to-back windows of at least `--batches` batches and
`--window_s` seconds each. Nothing else consumes the batches, so the windows
measure production; the table shows the median rate over windows (min-max in
brackets). Read MB/s counts stored record bytes, out MB/s the int32
batches handed to the loop. Then it prints how many examples/sec each
config's batch needs at a few step rates, next to the steps/sec the fastest
setting sustains.

  .venv/bin/python benchmarks/data.py
  .venv/bin/python benchmarks/data.py --datasets=text8 --workers=0 \
      --prefetch=2 --repeats=3
"""

import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from md4_jax.configs import cifar10 as cifar10_config
from md4_jax.configs import digits as digits_config
from md4_jax.configs import imagenet64 as imagenet64_config
from md4_jax.configs import openwebtext as openwebtext_config
from md4_jax.configs import text8 as text8_config
from md4_jax import data
from md4_jax.data import images
from md4_jax.data import prepare
from md4_jax.data import text8
from md4_jax.data import tokenized

# pylint: enable=g-import-not-at-top,wrong-import-position

_DATASETS = flags.DEFINE_list(
    "datasets",
    ["digits", "cifar10", "imagenet64", "text8", "openwebtext"],
    "Datasets to time.",
)
_WORKERS = flags.DEFINE_list(
    "workers", ["0", "2"], "config.grain_worker_count values."
)
_PREFETCH = flags.DEFINE_list(
    "prefetch", ["2", "8"], "config.grain_prefetch values."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 0, "Per-process batch (0 = the dataset config's)."
)
_WARMUP = flags.DEFINE_integer(
    "warmup", 3, "Least batches taken after the first one before timing."
)
_WARMUP_S = flags.DEFINE_float(
    "warmup_s", 1.0, "Least seconds of warmup after the first batch."
)
_BATCHES = flags.DEFINE_integer(
    "batches", 4, "Least batches per timed window."
)
_WINDOW_S = flags.DEFINE_float(
    "window_s", 0.75, "Least seconds per timed window."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows per setting.")
_IMAGE_EXAMPLES = flags.DEFINE_integer(
    "image_examples", 4096, "Training images written per image dataset."
)
_OWT_SEQUENCES = flags.DEFINE_integer(
    "owt_sequences", 8192, "Training sequences (of 1024 tokens) written."
)
_STEP_RATES = flags.DEFINE_list(
    "step_rates", ["1", "2", "5", "10"], "Steps/sec for the needs table."
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    "",
    "Where to write the generated data ('' = a temporary directory, deleted "
    "at the end); an existing directory is reused.",
)

_CONFIGS = {
    "digits": digits_config.get_config,
    "cifar10": cifar10_config.get_config,
    "imagenet64": imagenet64_config.get_config,
    "text8": text8_config.get_config,
    "openwebtext": openwebtext_config.get_config,
}


# ------------------------------------------------------------ generators ---


def _smooth_images(rng, n, size):
  """uint8 [n, size, size, 3]: 4x4 colour blocks plus noise.

  They compress about as well as photos: a 32x32 PNG takes ~2.4 KB.
  """
  coarse = rng.integers(0, 256, (n, size // 4, size // 4, 3))
  x = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.float32)
  x += rng.normal(0, 8, x.shape)
  return np.clip(x, 0, 255).astype(np.uint8)


def _write_tfds(root: str, name: str, train: int) -> float:
  """Writes a prepared ArrayRecord TFDS dataset; returns bytes per record."""
  spec = images.DATASETS[name]
  builder = tfds.builder(spec.tfds_name, data_dir=root)
  if builder.is_prepared():
    split = builder.info.splits[spec.train_split]
    return split.num_bytes / split.num_examples
  os.makedirs(builder.data_dir, exist_ok=True)
  features = builder.info.features
  rng = np.random.default_rng(0)
  split_infos = []
  for split, n in ((spec.train_split, train), (spec.eval_split, 256)):
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir,
        template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
        dataset_name=builder.name,
        split=split,
        filetype_suffix="array_record",
    )
    writer = array_record_module.ArrayRecordWriter(
        os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)),
        "group_size:1",
    )
    num_bytes = 0
    for i, image in enumerate(_smooth_images(rng, n, spec.data_shape[0])):
      example = {"image": image}
      if "label" in features:
        example["label"] = i % spec.classes
      if "id" in features:
        example["id"] = f"{split}_{i:05d}"
      record = features.serialize_example(example)
      writer.write(record)
      num_bytes += len(record)
    writer.close()
    split_infos.append(
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[n],
            num_bytes=num_bytes,
            filename_template=template,
        )
    )
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.set_file_format("array_record", override=True)
  builder.info.write_to_directory(builder.data_dir)
  return split_infos[0].num_bytes / train


def _write_text8(directory: str) -> float:
  """Writes a random 100M-character text8 file; returns bytes per character."""
  path = os.path.join(directory, "text8")
  if not os.path.exists(path):
    os.makedirs(directory, exist_ok=True)
    chars = np.frombuffer(text8.CHARS.encode("ascii"), np.uint8)
    ids = np.random.default_rng(0).integers(
        0, text8.VOCAB_SIZE, sum(text8.SPLIT_SIZES), np.uint8
    )
    chars[ids].tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
  return 1.0


def _write_openwebtext(directory: str, sequences: int, length: int) -> float:
  """Packs generated token documents with `prepare`; bytes per token."""
  if not os.path.exists(os.path.join(directory, prepare.SUMMARY_FILE)):
    rng = np.random.default_rng(0)
    doc_lengths = rng.integers(50, 2000, 2 * sequences * length // 1000)
    docs = [str(n) for n in doc_lengths]

    def documents(start, stop):
      return docs[start:stop]

    def encode_batch(texts):
      return [
          rng.integers(0, tokenized.EOS_ID, int(t), np.uint16).tolist()
          for t in texts
      ]

    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(
        devnull
    ):  # prepare's progress bars.
      prepare.prepare(
          documents,
          encode_batch,
          data_dir=directory,
          eos_id=tokenized.EOS_ID,
          seq_len=length,
          validation_docs=20,
          max_docs=None,
          sequences_per_shard=max(sequences // 8, 1),
          batch_docs=256,
      )
  return float(tokenized.TOKEN_DTYPE.itemsize)


def _generate(name: str, config, root: str) -> float:
  """Writes `name`'s data under `root`, sets `config.data_dir`.

  Returns:
    Stored bytes per example (0 for the embedded digits).
  """
  if name == "digits":
    return 0.0
  directory = os.path.join(root, name)
  config.data_dir = directory
  if name in images.DATASETS:
    return _write_tfds(directory, name, _IMAGE_EXAMPLES.value)
  (length,) = config.data_shape
  if name == "text8":
    return _write_text8(directory) * length
  return _write_openwebtext(directory, _OWT_SEQUENCES.value, length) * length


# ---------------------------------------------------------------- timing ---


def _time(config) -> dict[str, float]:
  """Times one pipeline setting; see the module docstring."""
  start = time.perf_counter()
  it = data.create_datasets(config, 0, 1).train_iter
  try:
    batch = next(it)
    first = time.perf_counter() - start
    # Batches buffered during startup come out at once: the warmup drains
    # them, then windows back to back time production alone.
    start = time.perf_counter()
    for n in itertools.count(1):
      next(it)
      if n >= _WARMUP.value and time.perf_counter() - start >= _WARMUP_S.value:
        break
    rates = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      for n in itertools.count(1):
        next(it)
        elapsed = time.perf_counter() - start
        if n >= _BATCHES.value and elapsed >= _WINDOW_S.value:
          break
      rates.append(n / elapsed)
  finally:
    if hasattr(it, "close"):
      it.close()
  return {
      "first": first,
      "batches_per_s": statistics.median(rates),
      "min": min(rates),
      "max": max(rates),
      "out_bytes": sum(v.nbytes for v in batch.values()),
  }


def _shape(config) -> str:
  return "x".join(map(str, config.data_shape))


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  workers = [int(w) for w in _WORKERS.value]
  prefetches = [int(p) for p in _PREFETCH.value]
  with contextlib.ExitStack() as stack:
    root = _DATA_DIR.value or stack.enter_context(
        tempfile.TemporaryDirectory(prefix="md4_data_bench_")
    )
    rows, best = [], {}
    for name in _DATASETS.value:
      config = _CONFIGS[name]()
      if _BATCH_SIZE.value:
        config.batch_size = _BATCH_SIZE.value
      start = time.perf_counter()
      record_bytes = _generate(name, config, root)
      print(
          f"{name}: data ready in {time.perf_counter() - start:.1f} s",
          file=sys.stderr,
      )
      for w in workers:
        for p in prefetches:
          config.grain_worker_count = w
          config.grain_prefetch = p
          r = _time(config)
          b = config.batch_size
          ex = r["batches_per_s"] * b
          rows.append(
              f"| {name} | {_shape(config)} | {record_bytes / 1e3:.2f} "
              f"| {b} | {w} | {p} "
              f"| {r['first']:.2f} | {ex:,.0f} ({r['min'] * b:,.0f}-"
              f"{r['max'] * b:,.0f}) | {r['batches_per_s']:.2f} "
              f"| {ex * record_bytes / 1e6:.1f} "
              f"| {r['batches_per_s'] * r['out_bytes'] / 1e6:.1f} |"
          )
          print(rows[-1], file=sys.stderr)
          if ex > best.get(name, (0,))[0]:
            best[name] = (ex, b, w, p)

  print(
      "| dataset | example | record KB | batch | workers | prefetch "
      "| first batch s "
      "| examples/s median (min-max) | batches/s | read MB/s | out MB/s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  rates = [float(s) for s in _STEP_RATES.value]
  print()
  print(
      "| dataset | batch | best examples/s (workers, prefetch) | sustains "
      "steps/s | "
      + " | ".join(f"needed at {s:g} steps/s" for s in rates)
      + " |"
  )
  print("|---|---|---|---|" + "---|" * len(rates))
  for name, (ex, b, w, p) in best.items():
    print(
        f"| {name} | {b} | {ex:,.0f} ({w}, {p}) | {ex / b:.1f} | "
        + " | ".join(f"{b * s:,.0f}" for s in rates)
        + " |"
    )


if __name__ == "__main__":
  app.run(main)
