"""Statistics of generated samples that need no reference model.

The per-sample unigram entropy is what masked-diffusion papers report next to
generative perplexity (Zheng et al. 2024 use it to show that float32
categorical draws lower sample diversity): a sample that repeats a few tokens
has low entropy however good its perplexity.
"""

import numpy as np


def unigram_entropy(tokens_BxD: np.ndarray) -> np.ndarray:
  """Entropy (nats) of each sample's empirical token distribution: float64 [B].

  tokens_BxD: int [B, ...] tokens; everything after the batch axis is one sample.
  """
  tokens = np.asarray(tokens_BxD).reshape(len(tokens_BxD), -1)
  out = np.empty(len(tokens))
  for i, row in enumerate(tokens):
    _, counts = np.unique(row, return_counts=True)
    p = counts / counts.sum()
    out[i] = -np.sum(p * np.log(p))
  return out
