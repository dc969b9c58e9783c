"""Shared by every dataset family: the dataset record, `Datasets`, grain pipelines.

Each dataset declares one `DatasetInfo` record (shape, vocabulary, classes,
kind, headline metric, text codec, default data dir, splits, how to prepare
it, and how to open its sources); everything outside `data/` reads dataset
facts from that record instead of branching on names. A family module opens a
random-access *source* per split (anything with `__len__` and `__getitem__`
returning one example) and a per-example `transform` that turns a raw record
into `{'x': int32 [*data_shape], ('label': int32 [])}`; `make_datasets` turns
those into

* an infinite, checkpointable training iterator for this process
  (shard → shuffle → repeat → transform → (flip) → batch), and
* a finite evaluation iterable per call, padded so that every process yields
  the same number of batches and the split is covered exactly once.

grain is imported where a pipeline is built, not at the top: the records (and
the configs that read their facts) load without grain or TFDS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import os
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np

if TYPE_CHECKING:
  import grain

Example = dict[str, np.ndarray]
Transform = Callable[[Any], Example]

# Grain reads at most this many batches concurrently in the main process.
_MAX_READ_THREADS = 16

# Headline metrics: bits per position under the dataset's own name for a
# position (`md4_jax.evaluation.headline` turns a NELBO into them).
METRICS = ("bits_per_dim", "bits_per_char", "bits_per_token")


class TextCodec(Protocol):
  """Text <-> token ids for a text dataset (sampling prompts, decoded samples)."""

  def decode(self, ids_L: np.ndarray) -> str:
    """Token ids [L] -> text; ids outside the vocabulary (the mask) are shown as such."""

  def encode_prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Text -> (int32 ids [n], bool fixed [n]): positions with fixed = False are generated."""


@dataclasses.dataclass(frozen=True)
class Sources:
  """What a family opens for one run: the splits' records and the transform."""

  train: Sequence[Any]
  eval: Sequence[Any]
  transform: Transform


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Everything md4_jax knows about one dataset, declared next to its pipeline.

  Attributes:
    name: config.dataset.
    kind: 'image' (x is [H, W, C]) or 'text' (x is [L], any L).
    vocab_size: token values V (the mask id is V).
    metric: headline metric, one of METRICS.
    eval_split: the held-out split evaluated by default.
    splits: valid split names, or None for any name the backend accepts
      (TFDS also takes slices such as 'test[:1000]').
    data_shape: the example shape for images; None for text (config chooses L).
    classes: number of labels (0 = unlabelled); a class-conditional config
      sets config.classes to it, an unconditional one to 0.
    default_data_dir: where prepared data lives when config.data_dir is ''.
    prepare: how to prepare the data, as a command (shown in errors and docs).
    open_sources: (config, eval split) -> Sources; raises FileNotFoundError
      when the data is not prepared.
    codec: data_dir -> TextCodec for text datasets; None for images.
    exact_source: config -> a source whose probabilities are exact (with
      `score(tokens)` and `entropy(length)`, e.g. synthetic.MarkovSource), for
      generated benchmarks; None for real data.
    eval_only: an evaluation set (the zero-shot sets): `md4_jax.evaluate`
      scores it, training on it is refused.
    sequence_length: text: the L a config gets unless it chooses another
      (config.data_shape = (L,)); None for images.
  """

  name: str
  kind: str
  vocab_size: int
  metric: str
  eval_split: str
  splits: tuple[str, ...] | None
  data_shape: tuple[int, ...] | None
  classes: int
  default_data_dir: str
  prepare: str
  open_sources: Callable[[Any, str], Sources]
  codec: Callable[[str], TextCodec] | None = None
  exact_source: Callable[[Any], Any] | None = None
  eval_only: bool = False
  sequence_length: int | None = None

  @property
  def default_data_shape(self) -> tuple[int, ...]:
    """What configs/base.set_dataset puts in config.data_shape: the image shape, or (L,)."""
    if self.data_shape is not None:
      return tuple(self.data_shape)
    if self.sequence_length is None:
      raise ValueError(f"Dataset {self.name!r} declares neither data_shape nor sequence_length.")
    return (self.sequence_length,)

  def data_dir(self, config_data_dir: str) -> str:
    """config.data_dir, or this dataset's default ('' stays '' for TFDS's own)."""
    return os.path.expanduser(config_data_dir or self.default_data_dir)

  def text_codec(self, config_data_dir: str) -> TextCodec | None:
    """The dataset's TextCodec over its data dir; None for images."""
    return None if self.codec is None else self.codec(self.data_dir(config_data_dir))

  def resolve_split(self, split: str) -> str:
    """`split`, or the held-out default when ''; ValueError for an unknown name."""
    split = split or self.eval_split
    if self.splits is not None and split not in self.splits:
      raise ValueError(
          f"Dataset {self.name!r} has no split {split!r} (config.eval_split); "
          f"valid: {', '.join(self.splits)}."
      )
    return split

  def check_config(self, config) -> None:
    """Checks that `config` matches what this dataset provides.

    Raises:
      ValueError: On any mismatch, naming the field and the expected value.
    """
    shape = tuple(config.data_shape)
    if self.data_shape is not None and shape != tuple(self.data_shape):
      raise ValueError(
          f"Dataset {self.name!r} has examples of shape {tuple(self.data_shape)}, "
          f"but config.data_shape={shape}."
      )
    if self.kind == "text":
      if len(shape) != 1 or shape[0] <= 0:
        raise ValueError(
            f"Dataset {self.name!r} yields token sequences: config.data_shape "
            f"must be (L,) with L > 0, got {shape}."
        )
      if config.random_flip:
        raise ValueError(
            f"config.random_flip flips images; dataset {self.name!r} is text."
        )
    if config.vocab_size != self.vocab_size:
      raise ValueError(
          f"Dataset {self.name!r} has {self.vocab_size} token values, but "
          f"config.vocab_size={config.vocab_size}."
      )
    if config.classes and not self.classes:
      raise ValueError(
          f"Dataset {self.name!r} has no labels: set config.classes = 0 "
          f"(got {config.classes})."
      )
    if config.classes and config.classes != self.classes:
      raise ValueError(
          f"Dataset {self.name!r} has {self.classes} classes, but "
          f"config.classes={config.classes}; use {self.classes} or 0."
      )


@dataclasses.dataclass(frozen=True)
class Datasets:
  """What `make_datasets` hands the training loop and the evaluation.

  Attributes:
    train_iter: Infinite `grain.DatasetIterator` over this process's training
      shard. Yields `{'x': int32 [B_local, *data_shape]}` plus
      `'label': int32 [B_local]` when `config.classes > 0`. Checkpoint it with
      `grain.checkpoint.CheckpointSave` / `CheckpointRestore`.
    eval_batches: Returns a fresh finite iterator over this process's share of
      the evaluation split: like `train_iter` plus `'weight': float32
      [B_local_eval]` (1 real example, 0 padding). Every process yields the
      same number of batches (`num_eval_batches`).
    num_eval_examples: Examples in the evaluation split (all processes).
    num_eval_batches: Batches `eval_batches()` yields on every process.
    eval_split: Name of the split `eval_batches` covers.
    info: The dataset's record.
    exact_source: The source with exact probabilities (`info.exact_source`
      built for this config), or None.
  """

  train_iter: grain.DatasetIterator
  eval_batches: Callable[[], Iterator[Example]]
  num_eval_examples: int
  num_eval_batches: int
  eval_split: str
  info: DatasetInfo
  exact_source: Any = None


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """Per-process pipeline settings, resolved from the config once.

  Attributes:
    process_index: This process, in [0, process_count).
    process_count: Number of processes sharing the data.
    batch_size: Per-process training batch (B_local).
    eval_batch_size: Per-process evaluation batch (B_local_eval).
    seed: Base seed of the training order and augmentation.
    worker_count: grain worker processes (0 = read in this process).
    prefetch: Batches kept ready ahead of the consumer.
  """

  process_index: int
  process_count: int
  batch_size: int
  eval_batch_size: int
  seed: int
  worker_count: int
  prefetch: int


def pipeline_options(
    config, process_index: int | None, process_count: int | None
) -> PipelineOptions:
  """Resolves process layout and per-process batch sizes from `config`.

  Args:
    config: The run config (`batch_size`, `eval_batch_size`, `seed`,
      `grain_worker_count`, `grain_prefetch`).
    process_index: This process; None means `jax.process_index()`.
    process_count: Number of processes; None means `jax.process_count()`.

  Returns:
    The resolved `PipelineOptions`.

  Raises:
    ValueError: If a global batch size does not divide by `process_count`, or
      the process layout is invalid.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"Invalid process layout: process_index={process_index}, "
        f"process_count={process_count}."
    )
  return PipelineOptions(
      process_index=process_index,
      process_count=process_count,
      batch_size=_local_batch_size(
          config.batch_size, process_count, "batch_size"
      ),
      eval_batch_size=_local_batch_size(
          config.eval_batch_size, process_count, "eval_batch_size"
      ),
      seed=int(config.seed),
      worker_count=int(config.grain_worker_count),
      prefetch=int(config.grain_prefetch),
  )


def _local_batch_size(global_batch: int, process_count: int, field: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(
        f"config.{field}={global_batch} must be a positive multiple of the "
        f"process count ({process_count}): every process loads "
        f"{field} // process_count examples."
    )
  return global_batch // process_count


def random_flip(example: Example, rng: np.random.Generator) -> Example:
  """Flips `example['x']` [H, W, C] left-right with probability 1/2."""
  if rng.random() < 0.5:
    example = dict(example, x=np.ascontiguousarray(example["x"][:, ::-1]))
  return example


def _read_options(prefetch: int) -> grain.ReadOptions:
  import grain  # pylint: disable=g-import-not-at-top
  # Each grain element is a whole batch, so `prefetch` threads can build the
  # `prefetch` buffered batches concurrently.
  threads = min(max(prefetch, 0), _MAX_READ_THREADS)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)


def train_iterator(
    source: Sequence[Any],
    transform: Transform,
    options: PipelineOptions,
    *,
    flip: bool = False,
) -> grain.DatasetIterator:
  """Builds this process's infinite training iterator.

  Pipeline: source → shuffle (global seed, reshuffled every epoch) → repeat
  forever → transform → optional flip → this process's rows of each global
  batch (`_ProcessRows`) → batch (B_local, batches may span an epoch boundary)
  → iterator with thread prefetch, or `grain_worker_count` worker processes.
  Global batch k is the same for any process count: process p holds its rows
  [p·B_local, (p+1)·B_local).

  Args:
    source: Random-access records of the training split (all processes).
    transform: Record → `{'x': int32 [...], ('label': int32 [])}`; must be
      picklable when `options.worker_count > 0`.
    options: Per-process settings.
    flip: Random horizontal flip of `x` [H, W, C].

  Returns:
    A `grain.DatasetIterator` yielding dicts of batched numpy arrays; it has
    `get_state()` / `set_state()` for checkpointing.

  Raises:
    ValueError: If the training split is empty.
  """
  import grain  # pylint: disable=g-import-not-at-top
  if not len(source):
    raise ValueError("The training split is empty.")
  # One global order (seeded by config.seed alone), so the global batch is the
  # same whatever the number of processes; each process reads only its rows.
  ds = grain.MapDataset.source(source).shuffle(seed=options.seed).repeat(None)
  ds = ds.map(transform)
  if flip:
    ds = ds.random_map(random_flip, seed=options.seed)
  ds = grain.MapDataset.source(_ProcessRows(ds, options))
  ds = ds.batch(options.batch_size, drop_remainder=True)
  ids = ds.to_iter_dataset(_read_options(options.prefetch))
  if options.worker_count > 0:
    ids = ids.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=options.worker_count,
            per_worker_buffer_size=max(options.prefetch, 1),
        )
    )
  return iter(ids)


class _ProcessRows:
  """This process's rows of every global batch of an (infinite) record stream.

  Element j is global element (j // b)·b·P + p·b + j % b, with b = B_local,
  P processes and p this process: processes read disjoint records.
  """

  def __init__(self, stream, options: PipelineOptions):
    self._stream = stream
    self._b = options.batch_size
    self._p = options.process_index
    self._count = options.process_count

  def __len__(self) -> int:
    return len(self._stream) // self._count

  def __getitem__(self, j: int):
    step, row = divmod(j, self._b)
    return self._stream[(step * self._count + self._p) * self._b + row]


class _PaddedShard:
  """Strided shard of `source`, padded with weight-0 copies of record 0.

  Element i is `(record, weight)`: the process's i-th record with weight 1 for
  i < shard size, else `(source[0], 0.0)`.
  """

  def __init__(self, source: Sequence[Any], indices: np.ndarray, length: int):
    self._source = source
    self._indices = indices
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> tuple[Any, float]:
    if i < len(self._indices):
      return self._source[int(self._indices[i])], 1.0
    return self._source[0], 0.0


class _Weighted:
  """Applies a transform to `(record, weight)` and adds float32 `weight`."""

  def __init__(self, transform: Transform):
    self._transform = transform

  def __call__(self, record_and_weight: tuple[Any, float]) -> Example:
    record, weight = record_and_weight
    return dict(self._transform(record), weight=np.float32(weight))


def eval_batches_fn(
    source: Sequence[Any],
    transform: Transform,
    options: PipelineOptions,
) -> tuple[Callable[[], Iterator[Example]], int]:
  """Builds the evaluation-batch factory for this process.

  Process p takes records p, p + P, p + 2P, ... of the split (P processes),
  so the processes cover it exactly once. Every process yields
  ceil(ceil(N / P) / B_local_eval) batches; slots past its records hold
  weight-0 copies of record 0.

  Args:
    source: Random-access records of the evaluation split (all processes).
    transform: Record → `{'x': int32 [...], ('label': int32 [])}`.
    options: Per-process settings.

  Returns:
    (eval_batches, num_batches): a function returning a fresh iterator of
    dicts (the transform's keys batched to `[B_local_eval, ...]` plus
    `'weight'` float32 `[B_local_eval]`) and how many batches it yields.

  Raises:
    ValueError: If the split is empty.
  """
  import grain  # pylint: disable=g-import-not-at-top
  n = len(source)
  if not n:
    raise ValueError("The evaluation split is empty.")
  per_process = -(-n // options.process_count)
  num_batches = -(-per_process // options.eval_batch_size)
  indices = np.arange(options.process_index, n, options.process_count)
  shard = _PaddedShard(source, indices, num_batches * options.eval_batch_size)
  ds = grain.MapDataset.source(shard).map(_Weighted(transform))
  ds = ds.batch(options.eval_batch_size)
  ids = ds.to_iter_dataset(_read_options(options.prefetch))

  def eval_batches() -> Iterator[Example]:
    return iter(ids)

  return eval_batches, num_batches


class ArraySource:
  """In-memory records: `x` [N, ...] with optional `label` [N]."""

  def __init__(self, x: np.ndarray, label: np.ndarray | None = None):
    if label is not None and len(label) != len(x):
      raise ValueError(f"{len(x)} examples but {len(label)} labels.")
    self._x = x
    self._label = label

  def __len__(self) -> int:
    return len(self._x)

  def __getitem__(self, i: int) -> Example:
    record = {"x": self._x[i]}
    if self._label is not None:
      record["label"] = self._label[i]
    return record


class ToTokens:
  """Record `{x_key: int array, label_key: int}` → int32 `x` (and label).

  Attributes:
    x_key: Key of the token array in the record.
    label_key: Key of the label, or None to drop labels.
    shape: Expected shape of `x`, checked when given.
  """

  def __init__(
      self,
      x_key: str = "x",
      label_key: str | None = None,
      shape: tuple[int, ...] | None = None,
  ):
    self.x_key = x_key
    self.label_key = label_key
    self.shape = None if shape is None else tuple(shape)

  def __call__(self, record: dict[str, Any]) -> Example:
    x = np.asarray(record[self.x_key], np.int32)
    if self.shape is not None and x.shape != self.shape:
      raise ValueError(
          f"A record's {self.x_key!r} has shape {x.shape}, expected "
          f"{self.shape} (config.data_shape)."
      )
    example = {"x": x}
    if self.label_key is not None:
      example["label"] = np.asarray(record[self.label_key], np.int32)
    return example


def make_datasets(
    info: DatasetInfo,
    config,
    process_index: int | None = None,
    process_count: int | None = None,
    open_sources: Callable[[Any, str], Sources] | None = None,
) -> Datasets:
  """Checks the config against `info`, opens the sources and builds both pipelines.

  Args:
    info: The dataset's record.
    config: The run config (see `md4_jax.data.create_datasets`).
    process_index: This process; None means `jax.process_index()`.
    process_count: Number of processes; None means `jax.process_count()`.
    open_sources: Overrides `info.open_sources` (tests shrink text8's splits).

  Returns:
    The `Datasets` bundle for this process.
  """
  info.check_config(config)
  options = pipeline_options(config, process_index, process_count)
  split = info.resolve_split(config.eval_split)
  sources = (open_sources or info.open_sources)(config, split)
  eval_batches, num_batches = eval_batches_fn(sources.eval, sources.transform, options)
  return Datasets(
      train_iter=train_iterator(sources.train, sources.transform, options,
                                flip=config.random_flip),
      eval_batches=eval_batches,
      num_eval_examples=len(sources.eval),
      num_eval_batches=num_batches,
      eval_split=split,
      info=info,
      exact_source=None if info.exact_source is None else info.exact_source(config),
  )
