"""A text source whose probabilities are known exactly: the embedded text benchmark.

`MarkovSource` is a seeded order-k Markov chain over a small vocabulary: each of
the V^k contexts (the previous k tokens) has its own next-token distribution,
drawn once from a symmetric Dirichlet(`concentration`) with `seed`. Sequences
start in the stationary distribution of contexts, so every position has the
same law and, for sequences of length L,

  −log p(x) = −log π(x_1..x_k) − Σ_{n>k} log P(x_n | x_{n−k}..x_{n−1}),
  H_L = H(π) + (L − k)·h,  h = Σ_c π(c)·H(P(·|c))  (the entropy rate),

all exact (float64). A model's held-out NELBO per token can be compared with
H_L / L (its gap is the model's excess bits), and samples are scored by their
exact negative log-likelihood under the source (a sampler that draws from the
true distribution scores H_L / L on average; a collapsed one scores lower while
its entropy drops, so both are reported).

The dataset 'synthetic_text' (configs/synthetic_text.py) generates its splits
from fixed seeds: no download, nothing to prepare.
"""

import dataclasses
import functools
import math
import string

import numpy as np

from md4_jax.data import common

NAME = "synthetic_text"
VOCAB_SIZE = 8  # The letters a..h.
SPLITS = ("train", "validation")
SEQ_LEN = 32  # Default tokens per example (any length can be generated).
# Sequences per split; the source's seed is fixed, the splits use their own.
SPLIT_SIZES = {"train": 50_000, "validation": 2_000}
_SPLIT_SEEDS = {"train": 1, "validation": 2}
_LETTERS = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class MarkovSource:
  """A seeded order-k Markov chain over V tokens, started in stationarity.

  Attributes:
    vocab_size: V (at most 26 so that samples print as letters).
    order: k >= 1, the number of previous tokens each step depends on.
    concentration: Dirichlet parameter of each context's next-token law (small
      = nearly deterministic transitions, low entropy rate).
    seed: draws the transition table.
  """

  vocab_size: int = 8
  order: int = 2
  concentration: float = 0.2
  seed: int = 0

  def __post_init__(self):
    if not 2 <= self.vocab_size <= len(_LETTERS):
      raise ValueError(f"vocab_size must be in [2, {len(_LETTERS)}], got {self.vocab_size}.")
    if self.order < 1:
      raise ValueError(f"order must be >= 1, got {self.order}.")
    if not self.concentration > 0:
      raise ValueError(f"concentration must be > 0, got {self.concentration}.")

  @property
  def num_contexts(self) -> int:
    return self.vocab_size**self.order

  @functools.cached_property
  def transitions(self) -> np.ndarray:
    """float64 [V^k, V]: row c is P(next | context c), c = Σ_i x_i·V^(k−1−i)."""
    rng = np.random.default_rng(self.seed)
    return rng.dirichlet(np.full(self.vocab_size, self.concentration), self.num_contexts)

  @functools.cached_property
  def stationary(self) -> np.ndarray:
    """float64 [V^k]: the stationary law of the context (the last k tokens)."""
    v, k = self.vocab_size, self.num_contexts
    # Context c = (x_1..x_k) moves to (x_2..x_k, y) with probability P(y | c).
    move = np.zeros((k, k))
    shifted = (np.arange(k) * v) % k
    for y in range(v):
      move[np.arange(k), shifted + y] += self.transitions[:, y]
    values, vectors = np.linalg.eig(move.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    pi = np.abs(pi) / np.abs(pi).sum()
    for _ in range(50):  # Polish the eigenvector (and fix a near-degenerate eig).
      pi = pi @ move
    return pi / pi.sum()

  @property
  def entropy_rate(self) -> float:
    """h = Σ_c π(c)·H(P(·|c)) in nats per token."""
    return float(self.stationary @ _entropy(self.transitions))

  def entropy(self, length: int) -> float:
    """H_L, the exact entropy of a length-L sequence, in nats."""
    if length < self.order:
      raise ValueError(f"Sequences must have at least order={self.order} tokens, got {length}.")
    return float(_entropy(self.stationary)) + (length - self.order) * self.entropy_rate

  def _contexts(self, x: np.ndarray, start: int) -> np.ndarray:
    """Context index of x[:, start − k : start]."""
    c = np.zeros(x.shape[0], np.int64)
    for i in range(start - self.order, start):
      c = c * self.vocab_size + x[:, i]
    return c

  def log_prob(self, x: np.ndarray) -> np.ndarray:
    """log p(x) in nats, float64 [N], for int x [N, L] with tokens in [0, V)."""
    x = np.asarray(x, np.int64)
    if x.ndim != 2 or x.shape[1] < self.order:
      raise ValueError(f"x must be [N, L] with L >= {self.order}, got shape {x.shape}.")
    if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
      raise ValueError(f"Tokens must lie in [0, {self.vocab_size}).")
    with np.errstate(divide="ignore"):
      out = np.log(self.stationary[self._contexts(x, self.order)])
      for n in range(self.order, x.shape[1]):
        out += np.log(self.transitions[self._contexts(x, n), x[:, n]])
    return out

  def sample(self, num: int, length: int, seed: int) -> np.ndarray:
    """int32 [num, length] sequences drawn with numpy's generator `seed`."""
    if length < self.order:
      raise ValueError(f"Sequences must have at least order={self.order} tokens, got {length}.")
    rng = np.random.default_rng(seed)
    x = np.zeros((num, length), np.int64)
    context = rng.choice(self.num_contexts, size=num, p=self.stationary)
    for i in range(self.order - 1, -1, -1):
      x[:, i] = context % self.vocab_size
      context //= self.vocab_size
    cdf = np.cumsum(self.transitions, axis=1)
    for n in range(self.order, length):
      rows = cdf[self._contexts(x, n)]
      u = rng.random(num)[:, None]
      x[:, n] = np.minimum(np.sum(u >= rows, axis=1), self.vocab_size - 1)
    return x.astype(np.int32)

  def score(self, tokens: np.ndarray) -> dict[str, float]:
    """Exact scores of samples [N, L] under the source, nats and bits per token.

    Returns:
      nll_per_token (mean −log p(x)/L, nats), its standard error, entropy_per_token
      (H_L / L, nats), and both in bits.
    """
    tokens = np.asarray(tokens).reshape(len(tokens), -1)
    length = tokens.shape[1]
    nll = -self.log_prob(tokens) / length
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    entropy = self.entropy(length) / length
    return {"source_nll_per_token": float(nll.mean()), "source_nll_per_token_stderr": se,
            "source_entropy_per_token": entropy,
            "source_nll_bits_per_token": float(nll.mean()) / math.log(2),
            "source_entropy_bits_per_token": entropy / math.log(2)}


def _entropy(p: np.ndarray) -> np.ndarray:
  """−Σ p log p over the last axis, in nats (0 log 0 = 0)."""
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def source_from_config(config) -> MarkovSource:
  """The MarkovSource of `config.synthetic` (order, concentration, seed) over V = 8."""
  s = config.synthetic
  return MarkovSource(vocab_size=VOCAB_SIZE, order=int(s.order),
                      concentration=float(s.concentration), seed=int(s.seed))


def load_split(source: MarkovSource, split: str, length: int) -> common.ArraySource:
  if split not in SPLITS:
    raise ValueError(f"Dataset {NAME!r} has no split {split!r}; valid: {', '.join(SPLITS)}.")
  return common.ArraySource(source.sample(SPLIT_SIZES[split], length, _SPLIT_SEEDS[split]))


def open_sources(config, split: str) -> common.Sources:
  """Generated train split and `split` (see `DatasetInfo.open_sources`)."""
  source = source_from_config(config)
  (length,) = config.data_shape
  return common.Sources(load_split(source, "train", length), load_split(source, split, length),
                        common.ToTokens("x"))


class Codec:
  """Tokens <-> letters a..h (the mask shows as '_'); in a prompt '_' marks a token to generate."""

  letters = _LETTERS[:VOCAB_SIZE]

  def decode(self, ids_L: np.ndarray) -> str:
    return "".join(self.letters[i] if 0 <= i < VOCAB_SIZE else "_" for i in np.asarray(ids_L))

  def encode_prompt(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    fixed = np.array([c != "_" for c in text], bool)
    bad = sorted({c for c in text if c != "_" and c not in self.letters})
    if bad:
      raise ValueError(f"Prompt characters {bad} are not tokens (letters {self.letters}; '_').")
    return np.array([self.letters.index(c) if c != "_" else 0 for c in text], np.int32), fixed


INFO = common.DatasetInfo(
    name=NAME,
    kind="text",
    vocab_size=VOCAB_SIZE,
    metric="bits_per_token",
    eval_split="validation",
    splits=SPLITS,
    data_shape=None,
    classes=0,
    default_data_dir="",
    prepare="nothing to prepare: generated from a seeded Markov source",
    open_sources=open_sources,
    codec=lambda data_dir: Codec(),
    exact_source=source_from_config,
    sequence_length=SEQ_LEN,
)
