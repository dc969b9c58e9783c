"""first_hitting: one network call per revealed token, at the time it is revealed; no grid.

Per example, draw the time s at which the next of the n masked positions is
revealed, (1 − α_s) = (1 − α_t)·u^(1/n), and reveal one uniformly chosen masked
position with a token ~ p_θ(·|z, s): exactly one network call per revealed
token. Refused for GenMD4: its reveal time would depend on predictions at times
between network calls.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from md4_jax.diffusion.sampling import base


def _first_hitting_chain(chain: base.Chain, z, frames):
  """One masked position per network call and example, at its first-hitting time."""
  batch, num_positions = z.shape
  schedule = chain.schedule

  def cond(carry):
    return jnp.any(carry[1] > 0)

  def body(carry):
    z, n_B, t_B, last, nfe, frames = carry
    active = n_B > 0
    call_B = jnp.full((batch,), nfe)
    u_B = chain.uniforms(base.TIME, call_B, ())
    # (1 − α_s) = (1 − α_t)·u^(1/n): the first of n reveal times below t.
    one_minus_alpha_s = (1.0 - schedule.alpha(t_B)) * jnp.exp(
        jnp.log(u_B) / jnp.maximum(n_B, 1).astype(jnp.float32))
    s_B = jnp.minimum(schedule.inverse(1.0 - one_minus_alpha_s), t_B)
    masked = z == chain.mask_id
    scores = jnp.where(masked, chain.uniforms(base.POSITION, call_B, (num_positions,)), -1.0)
    pos_B = jnp.argmax(scores, axis=-1)
    logits = chain.predict(z, s_B)
    row_BxV = jnp.take_along_axis(logits, pos_B[:, None, None], axis=1)[:, 0]
    token_B = chain.draw_tokens(row_BxV, base.TOKEN, call_B)
    frames = chain.record(frames, z, s_B, last, active)
    new = jnp.where(active, token_B, z[jnp.arange(batch), pos_B])
    z = z.at[jnp.arange(batch), pos_B].set(new)
    return (z, n_B - active.astype(jnp.int32), jnp.where(active, s_B, t_B),
            jnp.where(active, s_B, last), nfe + 1, frames)

  n_B = jnp.sum(z == chain.mask_id, axis=-1).astype(jnp.int32)
  t_B = jnp.full((batch,), chain.t_start, jnp.float32)
  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, _, _, last, nfe, frames = jax.lax.while_loop(
      cond, body, (z, n_B, t_B, inf_B, jnp.int32(0), frames))
  return z, nfe, chain.finish_frames(frames, z, last)


@dataclasses.dataclass(frozen=True)
class FirstHitting(base.Sampler):
  """Reveals one position per call at its first-hitting time (NFE = masked positions)."""

  name: ClassVar[str] = "first_hitting"
  on_grid: ClassVar[bool] = False

  def run(self, chain, z_BxD, frames):
    return _first_hitting_chain(chain, z_BxD, frames)
