"""text8: the first 10^8 characters of a cleaned English Wikipedia dump.

Tokens: ' ' → 0 and 'a'..'z' → 1..26 (vocabulary 27, see `CHARS`). The
standard split takes the first 90M characters for training, the next 5M for
validation and the last 5M for test; evaluation uses validation. Examples are
non-overlapping chunks of L = config.data_shape[0] characters; in each split
the tail shorter than L is dropped, so evaluation scores every character of
the split exactly once except the last 5M mod L. At L = 256:
5,000,000 = 19,531 x 256 + 64, so bits per character are measured on
4,999,936 characters (the last 64 are not scored); training uses
351,562 chunks, 89,999,872 of the 90M characters (the last 128 unused).
Scoring the tail would need a padded last chunk with per-token weights,
which the batch contract (one weight per example) does not carry.

The reader looks for `text8` (or `text8.zip`, extracted next to it) in
`config.data_dir` ('' = `DEFAULT_DATA_DIR`) and otherwise downloads `URL`
there.
"""

from collections.abc import Sequence
import logging
import os
import urllib.request
import zipfile

import numpy as np

from md4_jax import paths
from md4_jax.data import common

NAME = "text8"
URL = "http://mattmahoney.net/dc/text8.zip"
DEFAULT_DATA_DIR = "~/md4_data/text8"
CHARS = " abcdefghijklmnopqrstuvwxyz"  # Token i is CHARS[i].
VOCAB_SIZE = len(CHARS)
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = (90_000_000, 5_000_000, 5_000_000)  # Characters, in SPLITS order.
SEQ_LEN = 256  # Default characters per example (the MD4 paper's).
_UNKNOWN = "_"  # decode() shows ids outside [0, VOCAB_SIZE) (e.g. the mask).

# Byte → token id; -1 for bytes that text8 never contains.
_ENCODE = np.full(256, -1, np.int16)
_ENCODE[np.frombuffer(CHARS.encode("ascii"), np.uint8)] = np.arange(VOCAB_SIZE)
_DECODE = np.array(list(CHARS + _UNKNOWN))


def encode(text: str) -> np.ndarray:
  """Maps text over `CHARS` to int32 ids [len(text)]."""
  ids = _ENCODE[np.frombuffer(text.encode("ascii"), np.uint8)]
  if (ids < 0).any():
    raise ValueError(f"text8 text may only contain {CHARS!r}.")
  return ids.astype(np.int32)


def decode(ids_L: np.ndarray) -> str:
  """Maps ids [L] back to characters; ids outside the vocabulary become '_'."""
  ids_L = np.asarray(ids_L)
  ids_L = np.where((ids_L >= 0) & (ids_L < VOCAB_SIZE), ids_L, VOCAB_SIZE)
  return "".join(_DECODE[ids_L])


def _download(url: str, path: str) -> None:
  tmp = path + ".part"
  with urllib.request.urlopen(url, timeout=60) as response:
    with open(tmp, "wb") as f:
      while chunk := response.read(1 << 20):
        f.write(chunk)
  os.replace(tmp, path)


def find_or_fetch(data_dir: str) -> str:
  """Returns the path of the uncompressed `text8` file under `data_dir`.

  Extracts `text8.zip` if only the archive is there; downloads the archive
  from `URL` if neither is. A gs:// data_dir is read through a local copy in
  the cache (`paths.local_copy`: once, with a progress line), since the file is
  memory-mapped; nothing is downloaded into a bucket.

  Args:
    data_dir: Directory holding (or to hold) `text8`; '' = `DEFAULT_DATA_DIR`.

  Returns:
    Path of the `text8` file.

  Raises:
    FileNotFoundError: If the file is absent and the download fails.
  """
  if paths.is_remote(data_dir):
    return _from_bucket(data_dir)
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  path = os.path.join(data_dir, "text8")
  archive = path + ".zip"
  if not os.path.exists(path) and not os.path.exists(archive):
    logging.info("Downloading %s to %s.", URL, archive)
    try:
      os.makedirs(data_dir, exist_ok=True)
      _download(URL, archive)
    except OSError as e:
      raise FileNotFoundError(
          f"Dataset 'text8' not found: neither {path} nor {archive} exists, "
          f"and downloading {URL} failed ({e}). Download text8.zip from that "
          f"URL on a machine with internet and copy it to {data_dir}/ "
          "(config.data_dir)."
      ) from None
  if not os.path.exists(path):
    with zipfile.ZipFile(archive) as z:
      z.extract("text8", data_dir)
  return path


def _from_bucket(data_dir: str) -> str:
  """The local cache's copy of gs://.../text8 (or of text8.zip, extracted there)."""
  paths.check_reachable(data_dir, "config.data_dir")
  path = paths.join(data_dir, "text8")
  if paths.exists(path):
    return paths.local_copy(path, "text8")
  if paths.exists(path + ".zip"):
    archive = paths.local_copy(path + ".zip", "text8.zip")
    local = os.path.join(os.path.dirname(archive), "text8")
    if not os.path.exists(local):
      with zipfile.ZipFile(archive) as z:
        z.extract("text8", os.path.dirname(archive))
    return local
  raise FileNotFoundError(
      f"Dataset 'text8' not found: neither {path} nor {path}.zip exists. Copy text8.zip "
      f"({URL}) there (gcloud storage cp text8.zip {data_dir}/) or set config.data_dir to a "
      "local directory.")


def _check_file(path: str, split_sizes: Sequence[int]) -> None:
  data = np.memmap(path, np.uint8, mode="r")
  if len(data) < sum(split_sizes):
    raise ValueError(
        f"{path} has {len(data)} characters, fewer than the "
        f"{sum(split_sizes)} of the splits {dict(zip(SPLITS, split_sizes))}."
    )
  counts = np.bincount(data, minlength=256)
  bad = np.flatnonzero(counts * (_ENCODE < 0))
  if bad.size:
    raise ValueError(
        f"{path} is not text8: it contains bytes {bad[:10].tolist()} "
        f"outside {CHARS!r}."
    )


class Chunks:
  """Non-overlapping length-L chunks of a character range of the text8 file.

  Record i is `{'x': int16 ids [L]}` of characters
  [start + i * L, start + (i + 1) * L). The file is memory-mapped lazily, so
  pickling (to grain workers) sends only the path.
  """

  def __init__(self, path: str, start: int, size: int, length: int):
    self._path = path
    self._start = start
    self._length = length
    self._num = size // length  # The tail shorter than L is dropped.
    self._data = None

  def __len__(self) -> int:
    return self._num

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    if not 0 <= i < self._num:
      raise IndexError(i)
    if self._data is None:
      self._data = np.memmap(self._path, np.uint8, mode="r")
    begin = self._start + i * self._length
    return {"x": _ENCODE[self._data[begin : begin + self._length]]}

  def __getstate__(self):
    return dict(self.__dict__, _data=None)


def load_split(
    path: str,
    split: str,
    length: int,
    split_sizes: Sequence[int] = SPLIT_SIZES,
) -> Chunks:
  """Returns the length-`length` chunks of one split of the file at `path`."""
  index = SPLITS.index(split)
  start = sum(split_sizes[:index])
  return Chunks(path, start, split_sizes[index], length)


def open_sources(
    config, split: str, *, split_sizes: Sequence[int] = SPLIT_SIZES
) -> common.Sources:
  """Chunks of the train split and of `split` (see `DatasetInfo.open_sources`).

  Args:
    config: The run config (`data_dir`, `data_shape`).
    split: The evaluation split.
    split_sizes: Characters of (train, validation, test); tests shrink it.
  """
  path = find_or_fetch(config.data_dir)
  _check_file(path, split_sizes)
  (length,) = config.data_shape
  return common.Sources(
      load_split(path, "train", length, split_sizes),
      load_split(path, split, length, split_sizes),
      common.ToTokens("x"),
  )


class Codec:
  """text8 text <-> ids. In a prompt, '_' marks a character to generate."""

  def decode(self, ids_L: np.ndarray) -> str:
    return decode(ids_L)

  def encode_prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    fixed = np.array([c != _UNKNOWN for c in text], bool)
    return encode(text.replace(_UNKNOWN, " ")), fixed


INFO = common.DatasetInfo(
    name=NAME,
    kind="text",
    vocab_size=VOCAB_SIZE,
    metric="bits_per_char",
    eval_split="validation",
    splits=SPLITS,
    data_shape=None,
    classes=0,
    default_data_dir=DEFAULT_DATA_DIR,
    prepare=f"nothing to run: downloaded from {URL} when online (or copy text8.zip into the "
            "data dir)",
    open_sources=open_sources,
    codec=lambda data_dir: Codec(),
    sequence_length=SEQ_LEN,
)
