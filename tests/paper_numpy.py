"""The MD4 paper's functions re-stated in numpy (from its reference implementation's
formulas, independently of md4_jax's code), shared by tests/paper_function_test.py and
tests/convert_test.py."""

import numpy as np


def sinusoid(t, dim):
  """The MD4 paper's time features of t in [0, 1] (its backward.py, in numpy): 1000 t times
  frequencies 10000^(-i / (half - 1)), [sin | cos], a zero pad for odd widths."""
  half = dim // 2
  freqs = np.exp(-np.log(10_000.0) * np.arange(half) / (half - 1))
  args = 1000.0 * np.asarray(t, np.float64)[:, None] * freqs[None]
  emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  return np.pad(emb, ((0, 0), (0, dim % 2)))


def _layer_norm(x, eps):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _rope(x):
  """[B, L, H, K]: pairs (x_2i, x_2i+1) turned by the angle position * 10000^(-2i / K)."""
  _, length, _, k = x.shape
  angle = np.arange(length)[:, None] * 10_000.0 ** (-np.arange(0, k, 2) / k)
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  re, im = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2], out[..., 1::2] = re * cos - im * sin, re * sin + im * cos
  return out


def block(p, x, c, eps=1e-5):
  """The MD4 paper's text block in numpy: adaLN-zero from sigmoid(c), attention with RoPE,
  sigmoid GLU; x [B, L, D], c [B, C]. p: the block's weights in md4_jax's layout
  (modulation/dense [C, 6, D] and [6, D], attn query/key/value [D, H, K], out [H, K, D],
  mlp wi_gate, wi_up [D, F], wo [F, D])."""
  sigmoid = lambda a: 1 / (1 + np.exp(-a))
  mod = np.einsum("bc,ckd->bkd", sigmoid(c), p["modulation"]["dense"]["kernel"])
  mod = (mod + p["modulation"]["dense"]["bias"])[:, :, None]  # [B, 6, 1, D].
  shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod[:, i] for i in range(6))
  a = p["attn"]
  h = _layer_norm(x, eps) * (1 + scale_a) + shift_a
  q, k, v = (np.einsum("bld,dhk->blhk", h, a[n]["kernel"]) for n in ("query", "key", "value"))
  q, k = _rope(q), _rope(k)
  s = np.einsum("blhk,bmhk->bhlm", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhlm,bmhk->blhk", w, v)
  x = x + gate_a * np.einsum("blhk,hkd->bld", o, a["out"]["kernel"])
  m = p["mlp"]
  h = _layer_norm(x, eps) * (1 + scale_m) + shift_m
  glu = sigmoid(h @ m["wi_gate"]["kernel"]) * (h @ m["wi_up"]["kernel"])
  return x + gate_m * (glu @ m["wo"]["kernel"])
