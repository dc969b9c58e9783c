"""GenMD4's reverse chain (a schedule per token value, `model.per_token_schedule`).

Whether a position is revealed depends on the token it would become, so the
reveal and the token are one (V+1)-way draw per masked position and step
(tokens μ_v·(1 − (s/t)^{w_v}), mask Σ_v μ_v·(s/t)^{w_v}, after temperature and
top-p act on μ; 'mean' draws x̂ ~ μ first, then reveals it with probability
1 − (s/t)^{w_x̂}, the same law). The network is called at every step (no
idle-step skipping: `cache` does not apply and NFE = N); the last step (s = 0)
reveals everything. The grid samplers (grid.py) run it on GenMD4; samplers
that are not exact for it declare `per_token = False` and are refused.
"""

import jax
import jax.numpy as jnp

from md4_jax.diffusion import genmd4
from md4_jax.diffusion.sampling import base
from md4_jax.diffusion.sampling import draws


def run(chain: base.Chain, z, frames, two_stage: bool):
  """GenMD4's reverse chain: the network at every grid step, one exact draw per step.

  Step i (t = t_{N−i} -> s = t_{N−i−1}) for a masked position: token v with
  probability μ_v·(1 − (s/t)^{w_v}), stay masked with Σ_v μ_v·(s/t)^{w_v}
  (`two_stage`: x̂ ~ μ, then reveal x̂ with probability 1 − (s/t)^{w_x̂}).

  Returns:
    (z_BxD, nfe, frames) as `Sampler.run`.
  """
  ts = chain.ts
  powers_V = chain.model.apply(chain.variables, method="powers")
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  options = chain.options

  def body(i, carry):
    z, last, frames = carry
    t, s = ts[steps - i], ts[steps - i - 1]
    step_B = jnp.full((batch,), i, jnp.int32)
    logits = chain.tempered(chain.predict(z, jnp.full((batch,), t)))
    log_mu = jax.nn.log_softmax(logits, axis=-1)
    log_stay_V = genmd4.log_stay_masked(powers_V, s, t)  # w_v·log(s/t), −inf at s = 0.
    log_stay_11V = log_stay_V.reshape((1, 1, -1))
    keys = chain.keys(base.TOKEN, step_B)
    if two_stage:
      x_hat = jax.vmap(lambda k, l: draws.categorical(k, l, options.exact))(keys, logits)
      reveal_p = -jnp.expm1(log_stay_V[x_hat])
      u = chain.uniforms(base.REVEAL, step_B, z.shape[1:])
      draw = jnp.where(u < reveal_p, x_hat, chain.mask_id)
    else:
      log_reveal = log_mu + jnp.log(-jnp.expm1(log_stay_11V))
      log_stay = jax.nn.logsumexp(log_mu + log_stay_11V, axis=-1, keepdims=True)
      joint = jnp.concatenate([log_reveal, log_stay], axis=-1)  # Index V = the mask id.
      draw = jax.vmap(lambda k, l: draws.categorical(k, l, options.exact))(keys, joint)
    s_B = jnp.full((batch,), s)
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    masked = z == chain.mask_id
    # The last step (s = 0) decodes everything: its stay log-probability is −inf.
    return jnp.where(masked, draw, z), s_B, frames

  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, last, frames = jax.lax.fori_loop(0, steps, body, (z, inf_B, frames))
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)
