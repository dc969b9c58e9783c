r"""Tokenises a text corpus into the ArrayRecord shards tokenized.py reads.

  python -m md4_jax.data.prepare --dataset=openwebtext --data_dir=DIR \
      --tokenizer=/path/to/gpt2/tokenizer.json
  python -m md4_jax.data.prepare --dataset=ptb --tokenizer=/path/to/gpt2/tokenizer.json \
      [--raw=ptb.test.txt] [--data_dir=~/md4_data/zero_shot/ptb] [--seq_len=1024] \
      [--protocol=join|bos_eos]

Training corpora (openwebtext, fineweb_edu):

Documents come from the Hugging Face `datasets` hub entry in `SOURCES`
(streamed, so the corpus needs no local copy), are tokenised with a GPT-2
tokenizer loaded from a local `tokenizer.json` (Hugging Face `tokenizers`
format), joined with the EOS token and packed into sequences of `--seq_len`
tokens. The first `--validation_docs` documents form the 'validation' split,
the rest 'train'. Each split's final partial sequence is dropped.

Output under DIR: `{split}-{i:05d}-of-{n:05d}.array_record` (one record per
sequence: little-endian uint16 ids), a copy of `tokenizer.json`, and
`summary.json`. Progress is saved after every shard in `prepare_state.json`;
rerunning the same command resumes after the last finished shard.

Needs the `datasets` and `tokenizers` packages (not needed for training).

Zero-shot evaluation sets (lambada, wikitext2, wikitext103, ptb, lm1b; see
zero_shot.py): the test file is read from --raw (the file itself or the
archive it ships in), or downloaded from its canonical URL into
DIR/raw/ when --raw is not given; each document is detokenized with the
set's rules, GPT-2 BPE-encoded and packed into blocks of --seq_len by
--protocol ('join': documents joined by EOS, cut into full blocks, as in the
MD4 / SEDD table; 'bos_eos': BOS … EOS around each block, as in MDLM). The
blocks go to DIR/test-00000-of-00001.array_record, with tokenizer.json and
summary.json (documents, tokens, blocks, protocol, source, sha256). Score
them with `python -m md4_jax.evaluate --workdir=RUN --zero_shot=NAME,...`.
"""

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import importlib
import itertools
import json
import logging
import os
import shutil

from absl import app
from absl import flags
from array_record.python import array_record_module
import numpy as np
import tqdm

from md4_jax import cli
from md4_jax import paths
from md4_jax.data import tokenized
from md4_jax.data import zero_shot

EncodeBatch = Callable[[list[str]], list[list[int]]]
Documents = Callable[[int, int | None], Iterable[str]]

STATE_FILE = "prepare_state.json"
SUMMARY_FILE = zero_shot.SUMMARY_FILE


@dataclasses.dataclass(frozen=True)
class HFSource:
  """A Hugging Face hub corpus.

  Attributes:
    path: `datasets.load_dataset` path.
    name: Its configuration name, or None.
    text_field: Column holding the document text.
  """

  path: str
  name: str | None = None
  text_field: str = "text"


SOURCES = {
    "openwebtext": HFSource("Skylion007/openwebtext"),
    "fineweb_edu": HFSource("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
assert set(SOURCES) == set(tokenized.DATASETS)


@dataclasses.dataclass
class SplitState:
  """Progress of one split, saved after every finished shard.

  Attributes:
    docs_done: Documents consumed (all their tokens are in shards or carry).
    shards_done: Finished shards.
    sequences: Sequences written.
    tokens: Tokens of consumed documents, EOS included.
    carry: Tokens consumed but not yet in a sequence (< seq_len unless one
      document filled several shards).
    finished: All documents consumed and shards renamed to their final names.
  """

  docs_done: int = 0
  shards_done: int = 0
  sequences: int = 0
  tokens: int = 0
  carry: list[int] = dataclasses.field(default_factory=list)
  finished: bool = False


def _partial_path(data_dir: str, split: str, index: int) -> str:
  return os.path.join(data_dir, f"{split}-{index:05d}.array_record.partial")


def _done_path(data_dir: str, split: str, index: int) -> str:
  return os.path.join(data_dir, f"{split}-{index:05d}.array_record.done")


def _load_state(data_dir: str, seq_len: int) -> dict[str, SplitState]:
  path = os.path.join(data_dir, STATE_FILE)
  if not os.path.exists(path):
    return {split: SplitState() for split in tokenized.SPLITS}
  with open(path) as f:
    saved = json.load(f)
  if saved["seq_len"] != seq_len:
    raise ValueError(
        f"{path} was written with --seq_len={saved['seq_len']}, not "
        f"{seq_len}; use another --data_dir or the same length."
    )
  return {s: SplitState(**saved["splits"][s]) for s in tokenized.SPLITS}


def _save_state(
    data_dir: str, seq_len: int, states: dict[str, SplitState]
) -> None:
  path = os.path.join(data_dir, STATE_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(
        {
            "seq_len": seq_len,
            "splits": {s: dataclasses.asdict(v) for s, v in states.items()},
        },
        f,
    )
  os.replace(path + ".tmp", path)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
  it = iter(items)
  while batch := list(itertools.islice(it, size)):
    yield batch


def write_split(
    documents: Iterable[str],
    encode_batch: EncodeBatch,
    *,
    split: str,
    states: dict[str, SplitState],
    data_dir: str,
    eos_id: int,
    seq_len: int,
    sequences_per_shard: int,
    batch_docs: int = 256,
    total_docs: int | None = None,
) -> SplitState:
  """Packs `documents` into shards of `split`, resuming from `states[split]`.

  Args:
    documents: The split's documents after the `states[split].docs_done`
      already consumed.
    encode_batch: Texts → token ids (no special tokens).
    split: Split name.
    states: Progress of every split; updated and saved after every shard.
    data_dir: Output directory.
    eos_id: Token appended to every document.
    seq_len: L, tokens per sequence.
    sequences_per_shard: Sequences per ArrayRecord file.
    batch_docs: Documents tokenised per `encode_batch` call.
    total_docs: Documents of the split, for the progress bar (None: unknown).

  Returns:
    The split's final state (`finished=True`).
  """
  state = states[split]
  buffer = list(state.carry)
  shard: list[bytes] = []

  def finish_shard():
    writer = array_record_module.ArrayRecordWriter(
        _partial_path(data_dir, split, state.shards_done), "group_size:1"
    )
    for record in shard:
      writer.write(record)
    writer.close()
    os.replace(
        _partial_path(data_dir, split, state.shards_done),
        _done_path(data_dir, split, state.shards_done),
    )
    state.shards_done += 1
    state.sequences += len(shard)
    shard.clear()

  bar = tqdm.tqdm(
      desc=split, unit="doc", initial=state.docs_done, total=total_docs
  )
  for texts in _batched(documents, batch_docs):
    for ids in encode_batch(texts):
      buffer.extend(ids)
      buffer.append(eos_id)
      state.docs_done += 1
      state.tokens += len(ids) + 1
      while len(buffer) >= seq_len:
        tokens_L = np.asarray(buffer[:seq_len], tokenized.TOKEN_DTYPE)
        shard.append(tokens_L.tobytes())
        del buffer[:seq_len]
        if len(shard) == sequences_per_shard:
          finish_shard()
          # Every token of documents < docs_done is in a shard or in `buffer`.
          state.carry = list(buffer)
          _save_state(data_dir, seq_len, states)
    bar.update(len(texts))
  bar.close()
  if shard:
    finish_shard()
  count = state.shards_done
  for i in range(count):
    os.replace(
        _done_path(data_dir, split, i),
        tokenized.shard_path(data_dir, split, i, count),
    )
  state.carry = buffer  # Dropped: shorter than one sequence.
  state.finished = True
  _save_state(data_dir, seq_len, states)
  return state


def prepare(
    documents: Documents,
    encode_batch: EncodeBatch,
    *,
    data_dir: str,
    eos_id: int,
    seq_len: int = tokenized.SEQ_LEN,
    validation_docs: int = 10_000,
    max_docs: int | None = None,
    sequences_per_shard: int = 100_000,
    batch_docs: int = 256,
) -> dict[str, dict[str, int]]:
  """Writes both splits under `data_dir`, resuming any earlier run there.

  Args:
    documents: `(start, stop)` → the corpus's documents [start, stop)
      (stop None = to the end).
    encode_batch: Texts → token ids (no special tokens).
    data_dir: Output directory (created).
    eos_id: Token appended to every document.
    seq_len: L, tokens per sequence.
    validation_docs: The first this many documents form 'validation'.
    max_docs: Stop after this many documents in all (None = whole corpus).
    sequences_per_shard: Sequences per ArrayRecord file.
    batch_docs: Documents tokenised per `encode_batch` call.

  Returns:
    Per split: documents, tokens, sequences, shards, dropped_tokens; also
    written to `summary.json`.
  """
  os.makedirs(data_dir, exist_ok=True)
  states = _load_state(data_dir, seq_len)
  ranges = {
      "validation": (0, validation_docs),
      "train": (validation_docs, max_docs),
  }
  for split, (start, stop) in ranges.items():  # Corpus order.
    state = states[split]
    if state.finished:
      logging.info("%s: already prepared.", split)
      continue
    write_split(
        documents(start + state.docs_done, stop),
        encode_batch,
        split=split,
        states=states,
        data_dir=data_dir,
        eos_id=eos_id,
        seq_len=seq_len,
        sequences_per_shard=sequences_per_shard,
        batch_docs=batch_docs,
        total_docs=None if stop is None else stop - start,
    )
  summary = {
      split: {
          "documents": s.docs_done,
          "tokens": s.tokens,
          "sequences": s.sequences,
          "shards": s.shards_done,
          "dropped_tokens": len(s.carry),
      }
      for split, s in states.items()
  }
  with open(os.path.join(data_dir, SUMMARY_FILE), "w") as f:
    json.dump({"seq_len": seq_len, "splits": summary}, f, indent=2)
  return summary


def prepare_zero_shot(
    name: str,
    raw_path: str,
    encode_batch: EncodeBatch,
    *,
    data_dir: str,
    eos_id: int,
    seq_len: int = tokenized.SEQ_LEN,
    protocol: str = "join",
    bos_id: int | None = None,
) -> dict:
  """Writes zero-shot set `name`'s blocks under `data_dir` (one shard, split 'test').

  Args:
    name: a key of `zero_shot.SETS`.
    raw_path: the set's test file, or the archive holding it.
    encode_batch: texts → token ids (no special tokens).
    data_dir: output directory (created).
    eos_id: the EOS id (GPT-2: 50256).
    seq_len: L, tokens per block (the model's length).
    protocol: `zero_shot.PROTOCOLS`.
    bos_id: BOS for 'bos_eos' (default: eos_id, as GPT-2 has no other).

  Returns:
    The summary, also written to summary.json: dataset, protocol, seq_len,
    documents, tokens (EOS included), blocks, dropped_tokens, source, sha256.

  Raises:
    ValueError: a split too short for one block, or a file without the set's member.
  """
  spec = zero_shot.SETS[name]
  raw_docs = zero_shot.documents(spec, zero_shot.read_text(spec, raw_path))
  docs = zero_shot.encode_documents(spec, raw_docs, encode_batch)
  blocks = zero_shot.pack(docs, seq_len, eos_id, protocol, bos=bos_id,
                          name=f"{name} (from {raw_path})")
  if blocks.max() > np.iinfo(tokenized.TOKEN_DTYPE).max:
    raise ValueError("Token ids must fit in uint16 (GPT-2's do).")
  os.makedirs(data_dir, exist_ok=True)
  final = tokenized.shard_path(data_dir, zero_shot.SPLIT, 0, 1)
  writer = array_record_module.ArrayRecordWriter(final + ".partial", "group_size:1")
  for block in blocks:
    writer.write(block.astype(tokenized.TOKEN_DTYPE).tobytes())
  writer.close()
  os.replace(final + ".partial", final)
  tokens = sum(len(d) + 1 for d in docs)
  piece = seq_len - 2 if protocol == "bos_eos" else seq_len
  summary = {"dataset": name, "protocol": protocol, "seq_len": seq_len,
             "documents": len(docs), "tokens": tokens, "blocks": len(blocks),
             "dropped_tokens": tokens - len(blocks) * piece,
             "source": os.path.abspath(raw_path), "sha256": zero_shot.sha256(raw_path),
             "shards": [{"file": os.path.basename(final), "records": len(blocks),
                         "sha256": zero_shot.sha256(final)}]}
  with open(os.path.join(data_dir, SUMMARY_FILE), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


# ------------------------------------------------------------------ CLI ---

def _define_flags() -> None:
  """Defines the CLI flags (only when run as a script, not on import)."""
  flags.DEFINE_enum("dataset", None, sorted(SOURCES) + list(zero_shot.SETS),
                    "Corpus to tokenise: a training corpus or a zero-shot evaluation set.")
  flags.DEFINE_string(
      "data_dir", None, "Output directory (config.data_dir for training; default for a "
      f"zero-shot set: {zero_shot.DEFAULT_ROOT}/NAME, where md4_jax.evaluate looks)."
  )
  flags.DEFINE_string(
      "raw", None, "Zero-shot sets: the local test file or its archive (default: download "
      "the canonical file into DATA_DIR/raw/)."
  )
  flags.DEFINE_string("url", None, "Zero-shot sets: download from this URL instead of the "
                      "canonical one (a mirror).")
  flags.DEFINE_enum("protocol", "join", list(zero_shot.PROTOCOLS),
                    "Zero-shot sets: 'join' (MD4/SEDD table) or 'bos_eos' (MDLM) blocks.")
  flags.DEFINE_string(
      "tokenizer", None, "Local GPT-2 tokenizer.json (Hugging Face format)."
  )
  flags.DEFINE_string("eos_token", "<|endoftext|>", "Document separator.")
  flags.DEFINE_integer("seq_len", tokenized.SEQ_LEN, "Tokens per sequence.", lower_bound=1)
  flags.DEFINE_integer(
      "validation_docs", 10_000, "Leading documents held out for validation.", lower_bound=0
  )
  flags.DEFINE_integer(
      "max_docs", 0, "Documents to use in all (0 = the whole corpus).", lower_bound=0
  )
  flags.DEFINE_integer(
      "sequences_per_shard", 100_000, "Sequences per ArrayRecord file.", lower_bound=1
  )
  flags.mark_flags_as_required(["dataset", "tokenizer"])


def _hf_documents(source: HFSource) -> Documents:
  import datasets  # pylint: disable=g-import-not-at-top

  corpus = datasets.load_dataset(
      source.path, source.name, split="train", streaming=True
  )

  def documents(start: int, stop: int | None) -> Iterable[str]:
    ds = corpus.skip(start)
    if stop is not None:
      ds = ds.take(stop - start)
    return (row[source.text_field] for row in ds)

  return documents


def _require(module: str, why: str):
  """Imports an optional dependency, or a ValueError naming the extra that installs it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ValueError(f"{why} needs the `{module}` package: pip install -e \".[prepare]\" "
                     f"(or pip install {module}).") from None


def load_tokenizer(path: str, eos_token: str):
  """The Hugging Face tokenizer in `path` and its EOS id; one-line ValueErrors."""
  tokenizers = _require("tokenizers", "Tokenising")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--tokenizer={path}: no such file (a GPT-2 tokenizer.json).")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except  (the Rust library's own type)
    reason = cli.one_line(e, 200)
    raise ValueError(f"--tokenizer={path} is not a Hugging Face tokenizer.json ({reason}).") from None
  eos_id = tokenizer.token_to_id(eos_token)
  if eos_id is None:
    raise ValueError(f"{path} has no token {eos_token!r} (--eos_token).")
  if tokenizer.get_vocab_size() > np.iinfo(tokenized.TOKEN_DTYPE).max + 1:
    raise ValueError(f"{path}: token ids must fit in uint16.")
  return tokenizer, eos_id


def check_writable(directory: str) -> None:
  """Raises if `directory` cannot be created or written; creates nothing."""
  path = os.path.abspath(directory)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise ValueError(f"--data_dir={directory} cannot be created: {path} is a file.")
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"--data_dir={directory} is not writable ({path} is not writable "
                          "by this user); choose another --data_dir.")


def run(f) -> None:
  """Checks every input and dependency, then writes (nothing is created when a check fails)."""
  if f.protocol == "bos_eos" and f.dataset in zero_shot.SETS and f.seq_len < 3:
    raise ValueError(f"--seq_len={f.seq_len}: 'bos_eos' blocks need BOS, a token and EOS "
                     "(>= 3).")
  for flag in ("tokenizer", "raw"):
    if getattr(f, flag, None):
      paths.check_reachable(getattr(f, flag), f"--{flag}")
  tokenizer_file = paths.local_copy(f.tokenizer, "tokenizer") if f.tokenizer else f.tokenizer
  tokenizer, eos_id = load_tokenizer(tokenizer_file, f.eos_token)

  def encode_batch(texts: list[str]) -> list[list[int]]:
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings]

  if f.dataset in zero_shot.SETS:
    target = f.data_dir or zero_shot.DATASETS[f.dataset].default_data_dir
    data_dir, mirror = _staging(target)
    spec = zero_shot.SETS[f.dataset]
    raw = (paths.local_copy(f.raw, "--raw") if f.raw else
           zero_shot.fetch(spec, os.path.join(data_dir, "raw"), f.url))
    summary = prepare_zero_shot(f.dataset, raw, encode_batch, data_dir=data_dir, eos_id=eos_id,
                                seq_len=f.seq_len, protocol=f.protocol)
    shutil.copyfile(tokenizer_file, tokenized.tokenizer_path(data_dir))
    _upload(mirror)
    data_dir = target
    print(" ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}"
                   for k, v in summary.items() if not isinstance(v, dict)))
    if os.path.basename(os.path.normpath(data_dir)) == f.dataset:
      print(f"Score it: python -m md4_jax.evaluate --workdir=RUN --zero_shot={f.dataset} "
            f"--zero_shot_dir={os.path.dirname(os.path.normpath(data_dir))}")
    else:
      print(f"md4_jax.evaluate --zero_shot reads ROOT/{f.dataset}: move {data_dir} there.")
    return
  if f.data_dir is None:
    raise ValueError("--data_dir is required for a training corpus.")
  _require("datasets", f"--dataset={f.dataset} (streamed from the Hugging Face hub)")
  data_dir, mirror = _staging(f.data_dir)
  documents = _hf_documents(SOURCES[f.dataset])
  os.makedirs(data_dir, exist_ok=True)
  shutil.copyfile(tokenizer_file, tokenized.tokenizer_path(data_dir))
  summary = prepare(
      documents,
      encode_batch,
      data_dir=data_dir,
      eos_id=eos_id,
      seq_len=f.seq_len,
      validation_docs=f.validation_docs,
      max_docs=f.max_docs or None,
      sequences_per_shard=f.sequences_per_shard,
  )
  _upload(mirror)
  for split, numbers in summary.items():
    print(split, " ".join(f"{k}={v:,}" for k, v in numbers.items() if isinstance(v, int)))


def _staging(data_dir: str) -> tuple[str, paths.Mirror]:
  """The local directory prepare writes into (checked to be writable, nothing created), and
  the mirror that uploads it: a gs:// --data_dir is prepared in the local cache (where an
  interrupted run resumes) and uploaded when complete."""
  paths.check_reachable(data_dir, "--data_dir")
  mirror = paths.Mirror(data_dir)
  check_writable(mirror.local)
  return mirror.local, mirror


def _upload(mirror: paths.Mirror) -> None:
  if mirror.remote:
    sent = mirror.sync()
    print(f"Uploaded {len(sent)} files from {mirror.local} to {mirror.target}.", flush=True)


def main(argv):
  cli.start(argv)
  cli.run(lambda: run(flags.FLAGS), PROG)


PROG = "md4_jax.data.prepare"

if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.flags_parser(PROG))
