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

The command-line wiring (`md4_jax.data.prepare --dataset=lambada ...` and
`md4_jax.evaluate --zero_shot=...`) is not written yet.
"""

from collections.abc import Iterable, Sequence
import re

import numpy as np

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
