"""The grid samplers of MD4: ancestral, topp and mean, with idle-step caching.

  ancestral  the MD4 reverse step on a time grid: from t to s < t every masked
             position unmasks with probability p_u = (α_s − α_t)/(1 − α_t), to a
             token ~ softmax(μ_θ(z_t, t)/τ).
  topp       ancestral with the prediction truncated to its top-p nucleus
             (`draws.top_p_logits`).
  mean       the two-stage step of MD4 App. G: draw x̂ ~ p_θ for every position,
             then reveal x̂_n with probability p_u.

Exact draws (`SamplerOptions.exact`, the default). Every step splits into its
two independent parts — whether a position is revealed (it does not depend on
the network) and which token — and draws each exactly: the reveal step of
every position is drawn once up front by inverse CDF, P(still masked after grid
time t_j) = (1 − α(t_j))/(1 − α(t_start)) (the product of the per-step
(1 − p_u) telescopes), and the token by Gumbel-max. `exact=False` runs the
reference MD4 float32 step instead, for comparison: one
`jax.random.categorical` over the V + 1 outcomes [p_u·p_θ, 1 − p_u] per step
('mean': a float32 categorical and a float32 coin). A token of probability
1e-5 then comes out at ~1.8e-6 over 1000 linear steps (tests/samplers_test.py).

Skipping idle steps (`SamplerOptions.cache`, the default). A grid step at which
an example reveals nothing never uses that example's logits, and its z does not
change. So with `cache=True` each example jumps from one step at which it
reveals something to the next, and the network is called on the batch once per
such event, at each example's own time t (the networks take t per example).
Same rng → identical samples to `cache=False`, for any network. The number of
network calls (NFE) is the largest number of distinct reveal steps of an
example in the batch: at most D + 1 (the +1 decodes leftovers) whatever N is.
`cache=False` calls the network at every step (NFE = N).

On GenMD4 (a schedule per token value) the three run its own chain
(per_token.py).
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from md4_jax.diffusion.sampling import base
from md4_jax.diffusion.sampling import draws
from md4_jax.diffusion.sampling import per_token


def _reveal_steps(chain: base.Chain, masked_BxD: jax.Array) -> jax.Array:
  """Grid step (0..N−1, chain order) at which each position is revealed; N: never.

  Step i moves from t_{N−i} to t_{N−i−1}. A position masked at t_N = t_start is
  still masked after step i with probability r_{N−i−1}, r_j =
  (1 − α(t_j))/(1 − α(t_start)), so its reveal step is #{j < N : u < r_j} for
  one uniform u: the same law as drawing a p_u coin at every step.
  """
  ts = chain.ts
  steps = ts.shape[0] - 1
  alpha = chain.schedule.alpha(ts)
  r_N = base.still_masked_fraction(alpha)[:steps]  # Increasing.
  u = chain.uniforms(base.REVEAL, jnp.zeros(masked_BxD.shape[0], jnp.int32),
                     masked_BxD.shape[1:])
  count = steps - jnp.searchsorted(r_N, u, side="right").astype(jnp.int32)
  return jnp.where(masked_BxD, count, steps)


def _grid_update(chain, z, logits, reveal_step, step_B, steps):
  """z after step i_b (per example): reveal positions whose reveal step is i_b.

  At the last step (i = N−1) positions never revealed (reveal step N, probability
  ~eps) take the argmax of the prediction.
  """
  tokens = chain.draw_tokens(logits, base.TOKEN, step_B)
  masked = z == chain.mask_id
  now = masked & (reveal_step == step_B[:, None])
  leftover = masked & (reveal_step == steps) & (step_B == steps - 1)[:, None]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jnp.where(now, tokens, jnp.where(leftover, greedy, z))


def exact_chain(chain: base.Chain, z, frames):
  """ancestral / topp / mean with exact draws; cache or call at every step."""
  ts = chain.ts
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  reveal_step = _reveal_steps(chain, z == chain.mask_id)
  # Step at which an example next reveals something (the leftovers' at N−1).
  def next_event(z):
    event = jnp.where(z == chain.mask_id, jnp.minimum(reveal_step, steps - 1), steps)
    return jnp.min(event, axis=-1)

  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)

  if not chain.options.cache:
    def body(i, carry):
      z, last, frames = carry
      step_B = jnp.full((batch,), i, jnp.int32)
      logits = chain.predict(z, jnp.full((batch,), ts[steps - i]))
      s_B = jnp.full((batch,), ts[steps - i - 1])
      frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
      return _grid_update(chain, z, logits, reveal_step, step_B, steps), s_B, frames

    z, last, frames = jax.lax.fori_loop(0, steps, body, (z, inf_B, frames))
    return z, jnp.int32(steps), chain.finish_frames(frames, z, last)

  def cond(carry):
    return jnp.any(carry[1] < steps)

  def body(carry):
    z, event_B, last, nfe, frames = carry
    active = event_B < steps
    step_B = jnp.minimum(event_B, steps - 1)
    logits = chain.predict(z, ts[steps - step_B])
    s_B = ts[steps - step_B - 1]
    frames = chain.record(frames, z, s_B, last, active)
    z = _grid_update(chain, z, logits, reveal_step, step_B, steps)
    return z, next_event(z), jnp.where(active, s_B, last), nfe + 1, frames

  z, _, last, nfe, frames = jax.lax.while_loop(
      cond, body, (z, next_event(z), inf_B, jnp.int32(0), frames))
  return z, nfe, chain.finish_frames(frames, z, last)


def _reference_joint_step(chain, key_B, logits, z, p_u):
  """The reference MD4 float32 step: one categorical over [p_u·p_θ, 1 − p_u]."""
  logp = jax.nn.log_softmax(chain.tempered(logits))
  log_mask = jnp.broadcast_to(jnp.log1p(-p_u), logp.shape[:-1] + (1,))
  joint = jnp.concatenate([jnp.log(p_u) + logp, log_mask], axis=-1)
  draw = jax.vmap(lambda k, l: jax.random.categorical(k, l, axis=-1))(key_B, joint)
  return jnp.where(z == chain.mask_id, draw.astype(jnp.int32), z)


def _reference_two_stage_step(chain, key_B, logits, z, p_u):
  """MD4's 'mean' step in float32: x̂ ~ p_θ, then a float32 coin with prob. p_u."""
  logits = chain.tempered(logits)
  def one(key, logits_DxV):
    k_tok, k_coin = jax.random.split(key)
    x_hat = jax.random.categorical(k_tok, logits_DxV, axis=-1).astype(jnp.int32)
    return x_hat, jax.random.uniform(k_coin, logits_DxV.shape[:-1])
  x_hat, u = jax.vmap(one)(key_B, logits)
  return jnp.where((z == chain.mask_id) & (u < p_u), x_hat, z)


def reference_chain(chain: base.Chain, z, frames, step_fn):
  """exact=False: the reference per-step float32 chain (NFE = N)."""
  ts = chain.ts
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  alpha = chain.schedule.alpha(ts)

  def body(i, carry):
    z, last, frames, _ = carry
    logits = chain.predict(z, jnp.full((batch,), ts[steps - i]))
    p_u = (alpha[steps - i - 1] - alpha[steps - i]) / (1.0 - alpha[steps - i])
    s_B = jnp.full((batch,), ts[steps - i - 1])
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    keys = chain.keys(base.REFERENCE, jnp.full((batch,), i))
    return step_fn(chain, keys, logits, z, p_u), s_B, frames, logits

  logits0 = jnp.zeros(z.shape + (chain.model.vocab_size,), jnp.float32)
  z, last, frames, logits = jax.lax.fori_loop(
      0, steps, body, (z, jnp.full((batch,), jnp.inf), frames, logits0))
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = jnp.where(z == chain.mask_id, greedy, z)
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)


@dataclasses.dataclass(frozen=True)
class Ancestral(base.Sampler):
  """The MD4 reverse step: reveal with probability p_u, to a token ~ p_θ."""

  name: ClassVar[str] = "ancestral"
  per_token: ClassVar[bool] = True
  two_stage: ClassVar[bool] = False  # 'mean': x̂ ~ p_θ first, then the reveal coin.

  def run(self, chain, z_BxD, frames):
    if chain.model.per_token_schedule:
      return per_token.run(chain, z_BxD, frames, two_stage=self.two_stage)
    if chain.options.exact:
      return exact_chain(chain, z_BxD, frames)
    step = _reference_two_stage_step if self.two_stage else _reference_joint_step
    return reference_chain(chain, z_BxD, frames, step)


@dataclasses.dataclass(frozen=True)
class TopP(Ancestral):
  """Ancestral with the prediction truncated to its top-p nucleus.

  Attributes:
    top_p: the nucleus mass kept, in (0, 1].
  """

  name: ClassVar[str] = "topp"
  flags: ClassVar[tuple[base.Flag, ...]] = (
      base.Flag("top_p", "float", 0.9, "Nucleus mass of the topp sampler."),)
  top_p: float = 0.9

  def check(self, t_start):
    del t_start
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")

  def token_logits(self, logits):
    return draws.top_p_logits(logits, self.top_p)

  def json_fields(self):
    return {"top_p": self.top_p}


@dataclasses.dataclass(frozen=True)
class Mean(Ancestral):
  """MD4 App. G's two-stage step: x̂ ~ p_θ everywhere, then reveal x̂ with probability p_u."""

  name: ClassVar[str] = "mean"
  two_stage: ClassVar[bool] = True
