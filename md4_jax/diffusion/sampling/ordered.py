"""ordered: confidence-ordered unmasking (MaskGIT-style).

Each step reveals the schedule's expected count of positions (`reveal_counts`),
those with the highest `order` score ('confidence', 'margin', 'entropy'); tokens
come from the prediction (argmax at temperature 0). Revealed tokens never
change. The network runs at every step (NFE = N, no idle-step caching);
refused for GenMD4.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from md4_jax.diffusion.sampling import base
from md4_jax.diffusion.sampling import draws

ORDERS = ("confidence", "margin", "entropy")


def reveal_counts(alpha: jax.Array, masked_B: jax.Array) -> jax.Array:
  """int32 [N+1, B]: how many positions stay masked at each grid time.

  m_b·(1 − α_j)/(1 − α_N), rounded (m_b masked at the start; 0 at j = 0), so a
  step from j + 1 to j reveals the schedule's expected count, the same grids apply
  and the counts add up to m_b exactly.
  """
  r = base.still_masked_fraction(alpha).at[0].set(0.0)
  return jnp.round(r[:, None] * masked_B[None].astype(jnp.float32)).astype(jnp.int32)


def order_scores(probs: jax.Array, tokens: jax.Array, order: str) -> jax.Array:
  """How sure the prediction is at each position (higher = revealed first)."""
  if order == "confidence":
    return jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  if order == "margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if order == "entropy":
    return jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0),
                   axis=-1)
  raise ValueError(f"Unknown order {order!r}; valid: {ORDERS}.")


def _ordered_chain(chain: base.Chain, z, frames, order: str):
  """At each step reveal the k masked positions the prediction is surest of, k from
  the schedule; the tokens are drawn from the prediction (argmax at temperature 0).
  Ties go to the lower position."""
  ts = chain.ts
  alpha = chain.schedule.alpha(ts)
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  options = chain.options
  keep_masked = reveal_counts(alpha, jnp.sum(z == chain.mask_id, axis=-1))

  def body(i, carry):
    z, last, frames = carry
    step_B = jnp.full((batch,), i, jnp.int32)
    logits = chain.predict(z, jnp.full((batch,), ts[steps - i])).astype(jnp.float32)
    if options.temperature == 0:
      logits = chain.sampler.token_logits(logits)
      tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      logits = chain.sampler.token_logits(base.temper(logits, options.temperature))
      keys = chain.keys(base.TOKEN, step_B)
      tokens = jax.vmap(lambda k, l: draws.categorical(k, l, options.exact))(keys, logits)
    masked = z == chain.mask_id
    score = jnp.where(masked, order_scores(jax.nn.softmax(logits, -1), tokens, order), -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1)
    count_B = jnp.sum(masked, axis=-1) - keep_masked[steps - i - 1]
    reveal = masked & (rank < count_B[:, None])
    s_B = jnp.full((batch,), ts[steps - i - 1])
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    return jnp.where(reveal, tokens, z), s_B, frames

  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, last, frames = jax.lax.fori_loop(0, steps, body, (z, inf_B, frames))
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)


@dataclasses.dataclass(frozen=True)
class Ordered(base.Sampler):
  """Confidence-ordered unmasking.

  Attributes:
    order: the score that picks the positions to reveal: 'confidence'
      (probability of the drawn token), 'margin' (top-1 − top-2 probability)
      or 'entropy' (−entropy of the prediction).
  """

  name: ClassVar[str] = "ordered"
  caches: ClassVar[bool] = False
  argmax_at_zero_temperature: ClassVar[bool] = True
  flags: ClassVar[tuple[base.Flag, ...]] = (
      base.Flag("order", "enum", "confidence", "ordered: which positions to reveal first.",
                choices=ORDERS),)
  order: str = "confidence"

  def check(self, t_start):
    del t_start
    if self.order not in ORDERS:
      raise ValueError(f"Unknown order {self.order!r}; valid: {', '.join(ORDERS)}.")

  def file_tag(self):
    return f"{self.order}_"

  def json_fields(self):
    return {"order": self.order}

  def run(self, chain, z_BxD, frames):
    return _ordered_chain(chain, z_BxD, frames, self.order)
