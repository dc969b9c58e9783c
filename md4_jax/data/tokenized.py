"""Pre-tokenised web text (OpenWebText, FineWeb-Edu) stored as ArrayRecord.

The prepare step

  python -m md4_jax.data.prepare --dataset=openwebtext --data_dir=DIR

tokenises documents with the GPT-2 tokenizer, joins them with its EOS token
(50256) and packs the stream into sequences of `SEQ_LEN` tokens. It writes,
under DIR,

* `train-00000-of-000NN.array_record`, ... and `validation-...` shards: one
  record per sequence, the little-endian uint16 bytes of its L token ids;
* `tokenizer.json`: the tokenizer used, for `decode`.

This module only reads those shards; `config.data_shape` must be (L,) with L
the packed length and `config.vocab_size` the GPT-2 vocabulary (50257).
"""

import dataclasses
import functools
import logging
import os

import numpy as np

from md4_jax import paths
from md4_jax.data import common

SEQ_LEN = 1024  # Default packed sequence length (tokens).
VOCAB_SIZE = 50257  # GPT-2 byte-level BPE.
EOS_ID = 50256  # GPT-2 '<|endoftext|>', joins documents.
TOKEN_DTYPE = np.dtype("<u2")  # On-disk token type (GPT-2 ids < 2**16).
SPLITS = ("train", "validation")
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
  """A corpus of packed GPT-2 sequences.

  Attributes:
    name: Dataset name (config.dataset and prepare's --dataset).
    default_data_dir: Where shards live when config.data_dir is ''.
    train_split: The split training reads ('test' for the zero-shot
      evaluation sets, which have no other; training on them is refused by
      `validation.validate`).
    prepare_args: Flags the prepare command needs besides --dataset and
      --data_dir (shown in the missing-data error).
  """

  name: str
  default_data_dir: str
  train_split: str = "train"
  prepare_args: str = ""


DATASETS = {
    name: TokenizedDataset(name, f"~/md4_data/{name}")
    for name in ("openwebtext", "fineweb_edu")
}


def tokenizer_path(data_dir: str) -> str:
  """Where prepare saves the tokenizer, and everything reads it from."""
  return paths.join(data_dir, TOKENIZER_FILE)


def prepare_command(name: str, data_dir: str = "DIR", args: str = "") -> str:
  command = f"python -m md4_jax.data.prepare --dataset={name} --data_dir={data_dir}"
  return f"{command} {args}" if args else command


def shard_path(data_dir: str, split: str, index: int, count: int) -> str:
  """Path of shard `index` of `count` of `split` (shared with prepare)."""
  return paths.join(data_dir, f"{split}-{index:05d}-of-{count:05d}.array_record")


def find_shards(
    dataset: TokenizedDataset, data_dir: str, split: str
) -> list[str]:
  """Returns the sorted shard paths of `split`.

  Raises:
    FileNotFoundError: If there are none, naming the prepare command.
  """
  paths.check_reachable(data_dir, "config.data_dir")
  found = paths.glob(data_dir, f"{split}-*-of-*.array_record")
  if not found:
    raise FileNotFoundError(
        f"Dataset {dataset.name!r}: no prepared '{split}' shards "
        f"({split}-*-of-*.array_record) in {data_dir}. Tokenise the corpus "
        f"first with\n  {prepare_command(dataset.name, data_dir, dataset.prepare_args)}\n"
        "and set config.data_dir to that directory."
    )
  return found


class ToSequence:
  """ArrayRecord bytes → `{'x': int32 token ids [L]}`."""

  def __init__(self, length: int):
    self.length = length

  def __call__(self, record: bytes) -> dict[str, np.ndarray]:
    tokens_L = np.frombuffer(record, TOKEN_DTYPE)
    if tokens_L.shape != (self.length,):
      raise ValueError(
          f"A prepared record holds {tokens_L.size} tokens, but "
          f"config.data_shape=({self.length},); re-run prepare with "
          f"--seq_len={self.length} or fix config.data_shape."
      )
    return {"x": tokens_L.astype(np.int32)}


class Codec:
  """Text <-> GPT-2 token ids with the tokenizer saved by prepare.

  Decoding falls back to space-separated ids if the `tokenizers` package or
  `tokenizer.json` is missing (the loop's periodic samples then still log);
  encoding a prompt needs them and says so.
  """

  def __init__(self, path: str):
    self._path = path

  @functools.cached_property
  def _tokenizer(self):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top

      return tokenizers.Tokenizer.from_str(paths.read_text(self._path))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Decoding token ids as numbers: %s (%s).", self._path, e)
      return None

  def decode(self, ids_L: np.ndarray) -> str:
    ids_L = np.asarray(ids_L)
    if self._tokenizer is None:
      return " ".join(map(str, ids_L.tolist()))
    ids_L = ids_L[(ids_L >= 0) & (ids_L < VOCAB_SIZE)]
    return self._tokenizer.decode(ids_L.tolist(), skip_special_tokens=False)

  def encode_prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    if self._tokenizer is None:
      raise FileNotFoundError(
          f"A prompt needs the tokenizer {self._path} (and the `tokenizers` package); run "
          "md4_jax.data.prepare.")
    ids = np.asarray(self._tokenizer.encode(text).ids, np.int32)
    return ids, np.ones(ids.shape, bool)


def open_sources(config, split: str, *, dataset: TokenizedDataset) -> common.Sources:
  """The packed train shards and `split`'s (see `DatasetInfo.open_sources`)."""
  import grain  # pylint: disable=g-import-not-at-top  # Here, so the record loads without it.
  data_dir = os.fspath(config.data_dir or dataset.default_data_dir)
  data_dir = data_dir if paths.is_remote(data_dir) else os.path.expanduser(data_dir)
  train_source = grain.sources.ArrayRecordDataSource(
      find_shards(dataset, data_dir, dataset.train_split))
  eval_source = grain.sources.ArrayRecordDataSource(find_shards(dataset, data_dir, split))
  (length,) = config.data_shape
  transform = ToSequence(length)
  transform(train_source[0])  # Fails early on a length mismatch.
  return common.Sources(train_source, eval_source, transform)


def dataset_info(dataset: TokenizedDataset, splits: tuple[str, ...] = SPLITS,
                 eval_split: str = "validation", eval_only: bool = False) -> common.DatasetInfo:
  """The registry record of a corpus of packed GPT-2 token shards."""
  return common.DatasetInfo(
      name=dataset.name,
      kind="text",
      vocab_size=VOCAB_SIZE,
      metric="bits_per_token",
      eval_split=eval_split,
      splits=splits,
      data_shape=None,
      classes=0,
      default_data_dir=dataset.default_data_dir,
      prepare=prepare_command(dataset.name, args=dataset.prepare_args),
      open_sources=functools.partial(open_sources, dataset=dataset),
      codec=lambda data_dir: Codec(tokenizer_path(data_dir)),
      eval_only=eval_only,
      sequence_length=SEQ_LEN,
  )


INFOS = {name: dataset_info(dataset) for name, dataset in DATASETS.items()}
