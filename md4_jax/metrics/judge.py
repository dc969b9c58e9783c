"""Generative perplexity: decoded samples scored by an autoregressive judge model.

The masked-diffusion literature (SEDD, MDLM, MD4) rates unconditional text
samples by their perplexity under a pretrained autoregressive model, GPT-2
large, next to the samples' unigram entropy (a sampler can lower gen-PPL by
repeating tokens; the entropy exposes it). The protocol here:

1. the samples are decoded to text with the run's codec and re-tokenised with
   the judge's own tokenizer (no special tokens added; an `<|endoftext|>` in
   the text is the judge's EOS token, as in the decoded OpenWebText samples);
2. each sample's tokens are cut into chunks of at most C − 1 tokens (C the
   judge's context) and every chunk is scored after a BOS token, so every
   token of every sample is predicted (MDLM leaves the first token of each
   chunk unscored; the difference is one token per chunk);
3. gen-PPL = exp(Σ NLL / Σ tokens) over all samples (token-weighted), with a
   standard error from the delta method over samples.

The judge is a GPT-2-family model in this package's own Flax code
(md4_jax/metrics/gpt2.py), read from the published files: config.json,
model.safetensors and tokenizer.json (the `judge` extra: safetensors,
tokenizers, huggingface_hub; no PyTorch, no transformers). `--judge` takes a
local directory with those files or a hub name such as
`openai-community/gpt2-large`, downloaded once when online and read from the
Hugging Face cache afterwards.
"""

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from md4_jax.metrics import gpt2

_BUCKET = 64  # Rows are padded to a multiple of this many tokens (few compilations).
# What a judge needs of a hub repository (not its PyTorch/TF/ONNX copies).
_HUB_FILES = ["config.json", "model*.safetensors", "tokenizer.json"]


def _tokenizers():
  try:
    import huggingface_hub  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import safetensors  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Generative perplexity needs safetensors, tokenizers and huggingface_hub: "
                      "pip install -e '.[judge]'.") from e
  return tokenizers


def judge_directory(path: str) -> str:
  """A local directory as it is; otherwise a hub name, fetched once (then from the cache).

  Raises:
    OSError: neither a directory nor a hub model that could be fetched (e.g.
      offline and not cached), in one line.
  """
  if os.path.isdir(path):
    return path
  if path.startswith((".", "/", "~")) or path.count("/") > 1:
    raise FileNotFoundError(f"No judge directory {path}.")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return huggingface_hub.snapshot_download(path, allow_patterns=_HUB_FILES)
  except Exception as e:  # pylint: disable=broad-except  (offline, unknown, gated: one line)
    lines = str(e).strip().splitlines()
    reason = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
    raise OSError(f"The judge {path!r} is not a local directory and could not be fetched from "
                  f"the Hugging Face hub ({reason}). Fetch it once online (it is then cached) "
                  "or pass a directory with config.json, model.safetensors and "
                  "tokenizer.json.") from e


class Judge:
  """An autoregressive judge model and its tokenizer (see the module docstring).

  Attributes:
    path: what was loaded (a directory or a hub name).
    context: C, the judge's context length.
    model, params: the gpt2.GPT2 network and its parameters.
    tokenizer: a `tokenizers.Tokenizer`.
    bos_id: the token that starts every chunk (config.json's BOS, else its EOS).
  """

  def __init__(self, path: str, batch_size: int = 8):
    if batch_size < 1:
      raise ValueError(f"The judge's batch size must be >= 1, got {batch_size}.")
    tokenizers = _tokenizers()
    self.path = path
    self.batch_size = batch_size
    directory = judge_directory(path)
    config, params = gpt2.load(directory)
    tokenizer_file = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
      raise FileNotFoundError(f"The judge {path} has no tokenizer.json.")
    self.tokenizer = tokenizers.Tokenizer.from_file(tokenizer_file)
    with open(os.path.join(directory, "config.json")) as f:
      values = json.load(f)
    bos = values.get("bos_token_id")
    self.bos_id = values.get("eos_token_id") if bos is None else bos
    if self.bos_id is None:
      raise ValueError(f"The judge {path} has neither a BOS nor an EOS token to start chunks.")
    self.model = gpt2.GPT2(config)
    self.params = jax.device_put(params)
    self.context = config.n_positions
    self._row_nll = jax.jit(self._row_nll_fn)

  def _row_nll_fn(self, params, ids_BxT, mask_BxT):
    """Σ −log p(token | its prefix) per row, over the real tokens after the BOS."""
    logits = self.model.apply({"params": params}, ids_BxT, mask_BxT)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids_BxT[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask_BxT[:, 1:], axis=-1)

  def rows(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Each text's chunks as rows [BOS, tokens…] and the sample index of each row."""
    rows, owner = [], []
    piece = self.context - 1
    for i, text in enumerate(texts):
      ids = self.tokenizer.encode(text, add_special_tokens=False).ids
      for start in range(0, len(ids), piece):
        rows.append([self.bos_id] + list(ids[start:start + piece]))
        owner.append(i)
    return rows, owner

  def score(self, texts: Sequence[str]) -> dict[str, Any]:
    """Gen-PPL of `texts` (see the module docstring).

    Returns:
      judge, judge_tokens (tokens scored), judge_nll_per_token (nats),
      gen_ppl and gen_ppl_stderr.

    Raises:
      ValueError: no text yields a token.
    """
    rows, owner = self.rows(texts)
    if not rows:
      raise ValueError("The samples decode to no judge tokens: nothing to score.")
    nll = np.zeros(len(texts))
    count = np.zeros(len(texts))
    for start in range(0, len(rows), self.batch_size):
      batch = rows[start:start + self.batch_size]
      width = min(self.context, -(-max(map(len, batch)) // _BUCKET) * _BUCKET)
      ids = np.zeros((self.batch_size, width), np.int32)
      mask = np.zeros((self.batch_size, width), np.int32)
      for j, row in enumerate(batch):
        ids[j, :len(row)], mask[j, :len(row)] = row, 1
      out = np.asarray(self._row_nll(self.params, ids, mask), np.float64)
      for j, row in enumerate(batch):
        nll[owner[start + j]] += out[j]
        count[owner[start + j]] += len(row) - 1
    tokens = count.sum()
    mean = nll.sum() / tokens
    # Delta method for the ratio Σ nll_i / Σ count_i over the n samples.
    n = len(texts)
    spread = np.std(nll - mean * count, ddof=1) if n > 1 else float("nan")
    stderr = spread / (math.sqrt(n) * count.mean()) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return {"judge": self.path, "judge_tokens": int(tokens), "judge_nll_per_token": float(mean),
            "gen_ppl": ppl, "gen_ppl_stderr": float(ppl * stderr)}
