"""Exact random draws: 48-bit uniforms, Gumbel noise exact in both tails, categorical, top-p.

A float32 Gumbel −log(−log u) built from a 23-bit uniform caps near 16 and
under-samples rare outcomes (Zheng et al. 2024, arXiv 2409.02908). Scoped
`jax.enable_x64` does not work inside a jitted function in current JAX (dtypes
are canonicalised again at lowering), so the exact path builds its noise from
48-bit uniforms (`fine_uniform`, `exact_gumbel`): both Gumbel tails are right to
probabilities ~1e-14, the precision of a float64 draw.
"""

import jax
import jax.numpy as jnp


def _uniform_from_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """float32 in [2^-49, 1) from two uint32 words: (k + w·2^-24)·2^-24, k, w 24-bit."""
  scale = jnp.float32(2.0**-24)
  v = ((hi >> 8).astype(jnp.float32) + (lo >> 8).astype(jnp.float32) * scale) * scale
  return jnp.clip(v, jnp.float32(2.0**-49), jnp.float32(1.0 - 2.0**-24))


def fine_uniform(rng: jax.Array, shape) -> jax.Array:
  """float32 U[0, 1) with resolution 2^-48 near 0 (relative 2^-24 elsewhere)."""
  hi, lo = jax.random.bits(rng, (2,) + tuple(shape), jnp.uint32)
  return _uniform_from_bits(hi, lo)


def exact_gumbel(rng: jax.Array, shape) -> jax.Array:
  """Gumbel(0, 1) noise whose upper AND lower tails are exact to ~1e-14.

  g = −log E with E = −log u, u ~ U[0, 1). u is a fair mixture of v/2 and
  1 − v/2 for v = a 48-bit fine uniform: the first branch resolves large E (the
  lower tail of g), the second, via log1p, small E (the upper tail of g). The
  branch bit is a low bit of the same two random words that v discards, so a
  value costs two 32-bit words.
  """
  hi, lo = jax.random.bits(rng, (2,) + tuple(shape), jnp.uint32)
  half_v = 0.5 * _uniform_from_bits(hi, lo)
  low_u = (lo & 1) == 1
  e = jnp.where(low_u, -jnp.log(half_v), -jnp.log1p(-half_v))
  return -jnp.log(e)


def categorical(rng: jax.Array, logits: jax.Array, exact: bool = True) -> jax.Array:
  """Draws from softmax(logits) over the last axis by Gumbel-max.

  Args:
    rng: key.
    logits: float [..., V]; -inf entries are never drawn.
    exact: use `exact_gumbel` noise; False: float32 jax.random.categorical.

  Returns:
    int32 [...] draws.
  """
  logits = logits.astype(jnp.float32)
  if not exact:
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  return jnp.argmax(logits + exact_gumbel(rng, logits.shape), axis=-1).astype(jnp.int32)


def top_p_logits(logits: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest prefix of tokens, by probability, whose mass reaches top_p.

  The rule: sort the tokens by probability, descending, ties broken by the
  lower token id first; keep token k of that order iff the mass of the tokens
  before it is < top_p. So exactly the shortest prefix with mass ≥ top_p is
  kept, even when several tokens tie at its boundary. top_p ≥ 1 keeps every
  token (no float32 cumulative sum can then drop a tail of tiny ones).

  Args:
    logits: float [..., V].
    top_p: nucleus mass in (0, 1].

  Returns:
    float32 [..., V]: the logits, −inf outside the nucleus.
  """
  logits = logits.astype(jnp.float32)
  if top_p >= 1.0:
    return logits
  probs = jax.nn.softmax(logits, axis=-1)
  order = jnp.argsort(-probs, axis=-1, stable=True)  # Descending; ties: lower id first.
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < top_p
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def guided_logits(cond_logits: jax.Array, uncond_logits: jax.Array, weight: float) -> jax.Array:
  """(1 + w)·log p(x | c) − w·log p(x): log-probabilities sharpened towards the class.

  The draws then follow p(x | c)^{1+w} / p(x)^w, renormalised; w = 0 is the
  conditional model.
  """
  cond_logp = jax.nn.log_softmax(cond_logits.astype(jnp.float32), axis=-1)
  uncond_logp = jax.nn.log_softmax(uncond_logits.astype(jnp.float32), axis=-1)
  return (1.0 + weight) * cond_logp - weight * uncond_logp
