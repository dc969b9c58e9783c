"""remdm: ReMDM (Wang et al. 2025), the ancestral step plus remasking.

A revealed token is masked again with probability σ_t and a masked one is
revealed with probability (α_s − (1 − σ_t)α_t)/(1 − α_t), so the marginals of
the chain stay those of the schedule; σ by `remask` ('cap', 'rescale', 'loop')
and `eta`; η = 0 is the ancestral chain (same key, same samples). The network
runs at every step (NFE = N, no idle-step caching); refused for GenMD4.
"""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from md4_jax.diffusion.sampling import base

REMASK_STRATEGIES = ("cap", "rescale", "loop")


def remdm_path(schedule, ts: jax.Array, sampler: "ReMDM"):
  """The path of a ReMDM chain: network times, α's and the remasking σ per step.

  Args:
    schedule: the model's schedule.
    ts: the sampler's grid τ_0 = 0 < … < τ_N (the chain walks it backwards).
    sampler: its eta, remask and loop.

  Returns:
    (t_net [N+1], alpha [N+1], sigma [N]): step i (chain order) goes from
    index N − i to N − i − 1 of the first two, with σ = sigma[i]. With
    σ_max = min(1, (1 − α_s)/α_t): 'cap' σ = min(η, σ_max), 'rescale'
    σ = η·σ_max, on the schedule's own α(τ). 'loop' (t_on, t_off, α_on):
    α rises linearly in τ from α(1) to α_on over τ ∈ [t_on, 1], stays at α_on
    over [t_off, t_on] — the loop, where σ = min(η, σ_max) remasks while
    nothing else changes — and rises to α(0) over [0, t_off]; σ = 0 outside
    the loop; the network sees t = α⁻¹(α). The last step never remasks.
  """
  steps = ts.shape[0] - 1
  if sampler.remask == "loop":
    t_on, t_off, alpha_on = sampler.loop
    a1, a0 = schedule.alpha(jnp.float32(1.0)), schedule.alpha(jnp.float32(0.0))
    alpha = jnp.where(ts > t_on, alpha_on + (a1 - alpha_on) * (ts - t_on) / (1.0 - t_on),
                      jnp.where(ts < t_off, alpha_on + (a0 - alpha_on) * (t_off - ts) / t_off,
                                alpha_on))
    t_net = schedule.inverse(alpha)
  else:
    alpha = schedule.alpha(ts)
    t_net = ts
  a_t, a_s = alpha[::-1][:-1], alpha[::-1][1:]  # Step i: α_t = α[N−i], α_s = α[N−i−1].
  sigma_max = jnp.minimum(1.0, (1.0 - a_s) / a_t)
  if sampler.remask == "cap":
    sigma = jnp.minimum(sampler.eta, sigma_max)
  elif sampler.remask == "rescale":
    sigma = sampler.eta * sigma_max
  else:
    tau_t, tau_s = ts[::-1][:-1], ts[::-1][1:]
    in_loop = (tau_s >= sampler.loop[1]) & (tau_t <= sampler.loop[0])
    sigma = jnp.where(in_loop, jnp.minimum(sampler.eta, sigma_max), 0.0)
  sigma = sigma.at[steps - 1].set(0.0)
  return t_net, alpha, sigma


def _remdm_chain(chain: base.Chain, z, frames, t_net, alpha, sigma):
  """ReMDM: from t to s, a masked position becomes x̂ ~ p_θ with probability
  (α_s − (1 − σ)·α_t)/(1 − α_t); a position the chain revealed is re-masked with
  probability σ (prompt positions never change).

  The reveal is drawn as the ancestral chain draws it — one uniform u per
  position, revealed from t to s iff u ≥ r_s, r_j = (1 − α_j)/(1 − α_N) —
  plus a second coin of probability σ·α_t/(1 − α_s) for the extra mass σ adds
  (together: the ReMDM probability); a re-masked position restarts its clock
  with u ~ U[0, r_s). So σ = 0 reproduces the ancestral chain's samples for
  the same key (the same u, the same token draws).
  """
  ts = chain.ts
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  free = z == chain.mask_id  # Generated positions; the others are the prompt.
  r = base.still_masked_fraction(alpha)
  u0 = chain.uniforms(base.REVEAL, jnp.zeros((batch,), jnp.int32), z.shape[1:])

  def body(i, carry):
    z, u, last, frames = carry
    step_B = jnp.full((batch,), i, jnp.int32)
    a_t, a_s, r_s = alpha[steps - i], alpha[steps - i - 1], r[steps - i - 1]
    logits = chain.predict(z, jnp.full((batch,), t_net[steps - i]))
    tokens = chain.draw_tokens(logits, base.TOKEN, step_B)
    masked = z == chain.mask_id
    extra = chain.uniforms(base.EXTRA_REVEAL, step_B, z.shape[1:]) < sigma[i] * a_t / (1.0 - a_s)
    reveal = masked & ((u >= r_s) | extra)
    leftover = masked & ~reveal & (i == steps - 1)  # Probability ~eps: take the argmax.
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    remask = free & ~masked & (chain.uniforms(base.REMASK, step_B, z.shape[1:]) < sigma[i])
    s_B = jnp.full((batch,), ts[steps - i - 1])
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    z = jnp.where(reveal, tokens, jnp.where(leftover, greedy,
                                            jnp.where(remask, chain.mask_id, z)))
    u = jnp.where(remask, chain.uniforms(base.CLOCK, step_B, z.shape[1:]) * r_s, u)
    return z, u, s_B, frames

  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, _, last, frames = jax.lax.fori_loop(0, steps, body, (z, u0, inf_B, frames))
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)


@dataclasses.dataclass(frozen=True)
class ReMDM(base.Sampler):
  """The ancestral step plus remasking.

  Attributes:
    eta: the remasking strength η in [0, 1] (η = 0: the ancestral chain).
    remask: the σ strategy: 'cap' σ = min(η, σ_max), 'rescale' σ = η·σ_max,
      or 'loop' (see `remdm_path`).
    loop: remask='loop': (t_on, t_off, α_on).
  """

  name: ClassVar[str] = "remdm"
  caches: ClassVar[bool] = False
  flags: ClassVar[tuple[base.Flag, ...]] = (
      base.Flag("eta", "float", 0.0, "remdm: remasking strength η (0 = the ancestral chain)."),
      base.Flag("remask", "enum", "cap", "remdm: σ strategy (cap, rescale, loop).",
                choices=REMASK_STRATEGIES),
      base.Flag("loop", "list", ["0.55", "0.05", "0.9"],
                "remdm --remask=loop: t_on,t_off,alpha_on.",
                parse=lambda values: tuple(float(v) for v in values)),
  )
  eta: float = 0.0
  remask: str = "cap"
  loop: tuple[float, float, float] = (0.55, 0.05, 0.9)

  def check(self, t_start):
    if self.remask not in REMASK_STRATEGIES:
      raise ValueError(f"Unknown remasking strategy {self.remask!r}; valid: "
                       f"{', '.join(REMASK_STRATEGIES)}.")
    if not 0 <= self.eta <= 1:
      raise ValueError(f"eta must lie in [0, 1], got {self.eta}.")
    if len(self.loop) != 3:
      raise ValueError(f"loop (--loop) takes three numbers t_on,t_off,alpha_on, e.g. "
                       f"0.55,0.05,0.9; got {','.join(str(v) for v in self.loop)}.")
    t_on, t_off, alpha_on = self.loop
    if self.remask == "loop" and not (0 < t_off < t_on < 1 and 0 < alpha_on < 1
                                      and t_start == 1):
      raise ValueError(f"The loop strategy needs 0 < t_off < t_on < 1, 0 < α_on < 1 and "
                       f"t_start = 1; got loop={self.loop}, t_start={t_start}.")

  def file_tag(self):
    return f"{self.remask}{self.eta:g}_"

  def json_fields(self):
    fields = {"eta": self.eta, "remask": self.remask}
    if self.remask == "loop":
      fields["loop"] = list(self.loop)
    return fields

  def run(self, chain, z_BxD, frames):
    t_net, alpha, sigma = remdm_path(chain.schedule, chain.ts, self)
    return _remdm_chain(chain, z_BxD, frames, t_net, alpha, sigma)
