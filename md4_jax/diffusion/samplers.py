"""Reverse-chain samplers for MD4: from all-mask (or a partially masked z) to data.

One driver, `sample(model, variables, rng, ...)`, runs every sampler; it is
jit-compatible (`lax.fori_loop` / `lax.while_loop`). Nothing here knows about
devices: `train.build.Experiment.sampler` jits it batch-sharded over a mesh. Shapes: B batch, D positions of one example
(the flattened data_shape), V vocabulary, N grid steps; the mask id is V.

Samplers (registry `SAMPLERS`, name → `Sampler`):
  ancestral      the MD4 reverse step on a time grid: from t to s < t every
                 masked position unmasks with probability
                 p_u = (α_s − α_t)/(1 − α_t), to a token ~ softmax(μ_θ(z_t, t)/τ).
  topp           ancestral with the prediction truncated to its top-p nucleus.
  mean           the two-stage step of MD4 App. G: draw x̂ ~ p_θ for every
                 position, then reveal x̂_n with probability p_u.
  first_hitting  per example, draw the time s at which the next of the n masked
                 positions is revealed, (1 − α_s) = (1 − α_t)·u^(1/n), reveal one
                 uniformly chosen masked position with a token ~ p_θ(·|z, s):
                 exactly one network call per revealed token, no grid.
  remdm          ReMDM (Wang et al. 2025): the ancestral step plus remasking —
                 a revealed token is masked again with probability σ_t and a
                 masked one is revealed with probability
                 (α_s − (1 − σ_t)α_t)/(1 − α_t), so the marginals of the chain
                 stay those of the schedule; σ by `SamplerOptions.remask`
                 ('cap', 'rescale', 'loop') and `eta`; η = 0 is ancestral.
  (any)          `SamplerOptions.guidance` = w: classifier-free guidance for
                 class-conditional models, (1 + w)·log p(x|c) − w·log p(x|∅),
                 both halves in one batched network call.
  ordered        confidence-ordered unmasking (MaskGIT-style): each step reveals
                 the schedule's expected count of positions, those with the
                 highest `SamplerOptions.order` score ('confidence', 'margin',
                 'entropy'); tokens from the prediction (argmax at temperature 0).
                 remdm and ordered call the network at every step (NFE = N) and
                 are refused for GenMD4.

Exact draws (`SamplerOptions.exact`, on by default). A float32 Gumbel
−log(−log u) built from a 23-bit uniform caps near 16 and under-samples rare
outcomes (Zheng et al. 2024, arXiv 2409.02908). Scoped `jax.enable_x64` does
not work inside a jitted function in current JAX (dtypes are canonicalised again
at lowering), so the exact path builds its noise from 48-bit uniforms
(`fine_uniform`, `exact_gumbel`): both Gumbel tails are right to probabilities
~1e-14, the precision of a float64 draw. The exact grid samplers also split
every step into its two independent parts — whether a position is revealed
(it does not depend on the network) and which token — and draw each exactly:
the reveal step of every position is drawn once up front by inverse CDF,
P(still masked after grid time t_j) = (1 − α(t_j))/(1 − α(t_start)) (the
product of the per-step (1 − p_u) telescopes), and the token by Gumbel-max.
`exact=False` runs the reference MD4 float32 step instead, for comparison:
one `jax.random.categorical` over the V + 1 outcomes [p_u·p_θ, 1 − p_u] per step
('mean': a float32 categorical and a float32 coin). A token of probability
1e-5 then comes out at ~1.8e-6 over 1000 linear steps (see
tests/samplers_test.py and benchmarks/RESULTS.md).

Skipping idle steps (`SamplerOptions.cache`, on by default). A grid step at
which an example reveals nothing never uses that example's logits, and its
z does not change. So with `cache=True` each example jumps from one step at
which it reveals something to the next, and the network is called on the
batch once per such event, at each example's own time t (the networks take
t per example). Same rng → identical samples to `cache=False`, for any network
(time-dependent or not). The number of network calls (NFE) is the largest
number of distinct reveal steps of an example in the batch: at most D + 1
(the +1 decodes leftovers) whatever N is. `cache=False` calls the network at
every step (NFE = N). A time-independent network (`time_features='none'`)
gains nothing more: z changes at every event, so no logits can be reused.

GenMD4 (a schedule per token value, `model.per_token_schedule`): whether a
position is revealed depends on the token it would become, so the reveal and
the token are one (V+1)-way draw per masked position and step (tokens
μ_v·(1 − (s/t)^{w_v}), mask Σ_v μ_v·(s/t)^{w_v}, after temperature and top-p
act on μ; 'mean' draws x̂ ~ μ first, then reveals it with probability
1 − (s/t)^{w_x̂}, the same law). The network is called at every step (no
idle-step skipping: `cache` does not apply and NFE = N); the last step (s = 0)
reveals everything. first_hitting is refused: its reveal time would depend on
predictions at times between network calls.

Randomness: every draw of example b comes from fold_in(rng, b) (then a stream
id and the step or call index), so results do not depend on the batch size,
the position of the example in the batch, the device mesh, or on whether a
step called the network.
"""

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from md4_jax.diffusion import genmd4
from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib

# Random stream ids folded into each example's key.
_REVEAL, _TOKEN, _TIME, _POSITION, _REFERENCE, _REMASK, _EXTRA_REVEAL, _CLOCK = range(8)
REMASK_STRATEGIES = ("cap", "rescale", "loop")
ORDERS = ("confidence", "margin", "entropy")


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """Options shared by the samplers (hashable: pass it as a static argument).

  Attributes:
    temperature: logits are divided by this (> 0) before a token is drawn.
    top_p: nucleus mass kept by the 'topp' sampler, in (0, 1].
    exact: 48-bit exact reveal coins and Gumbel noise (see the module doc);
      False: the reference MD4 float32 step (biased against rare tokens;
      every step calls the network, `cache` does not apply).
    cache: grid samplers call the network only at steps where an example
      reveals a token (same samples as False for the same rng; fewer calls).
      Not applicable to 'remdm' and 'ordered' (pass False).
    guidance: classifier-free guidance weight w for class-conditional
      models trained with label dropout: the prediction becomes
      (1 + w)·log p(x | c) − w·log p(x | null label), both from one batched
      network call (`guided_logits`); 0 = the conditional model.
    eta: 'remdm': the remasking strength η (η = 0: the ancestral chain).
    remask: 'remdm': the σ strategy, 'cap' σ = min(η, σ_max), 'rescale'
      σ = η·σ_max, or 'loop' (see `remdm_path`).
    loop: 'remdm' with remask='loop': (t_on, t_off, α_on).
    order: 'ordered': the score that picks the positions to reveal,
      'confidence' (probability of the drawn token), 'margin' (top-1 − top-2
      probability) or 'entropy' (−entropy of the prediction).
  """

  temperature: float = 1.0
  top_p: float = 0.9
  exact: bool = True
  cache: bool = True
  guidance: float = 0.0
  eta: float = 0.0
  remask: str = "cap"
  loop: tuple[float, float, float] = (0.55, 0.05, 0.9)
  order: str = "confidence"


# ------------------------------------------------------------ exact draws ---


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


def time_grid(name: str, steps: int) -> jax.Array:
  """t_i for i = 0..steps (t_0 = 0, t_steps = 1); the chain walks it backwards."""
  i = jnp.arange(steps + 1, dtype=jnp.float32) / steps
  if name == "uniform":
    return i
  if name == "cosine":  # Clipped: float32 cos(π/2) is −4e-8, and polyK needs t ≥ 0.
    return jnp.clip(jnp.cos(math.pi / 2 * (1.0 - i)), 0.0, 1.0)
  raise ValueError(f"Unknown time grid {name!r}; valid: 'uniform', 'cosine'.")


GRIDS = ("uniform", "cosine")


# ------------------------------------------------------------ the context ---


def _example_keys(rng: jax.Array, batch: int) -> jax.Array:
  """Key of example b = fold_in(rng, b): [B] keys."""
  return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch, dtype=jnp.uint32))


def _stream_keys(keys_B: jax.Array, stream: int, index_B: jax.Array) -> jax.Array:
  """fold_in(fold_in(key_b, stream), index_b) for every example."""
  return jax.vmap(lambda k, i: jax.random.fold_in(jax.random.fold_in(k, stream), i))(
      keys_B, index_B.astype(jnp.uint32))


@dataclasses.dataclass(frozen=True)
class _Chain:
  """What a chain needs besides z: the network, the schedule, keys, options."""

  predict: Callable[[jax.Array, jax.Array], jax.Array]  # (z_BxD, t_B) -> logits_BxDxV
  schedule: Any
  keys_B: jax.Array
  mask_id: int
  options: SamplerOptions
  token_logits: Callable[[jax.Array, SamplerOptions], jax.Array]
  frame_times_K: Optional[jax.Array]  # τ_k of the recorded frames, or None.

  def draw_tokens(self, logits, stream: int, index_B) -> jax.Array:
    """Per-example draws from the (tempered, truncated) logits [B, ..., V]."""
    logits = self.token_logits(logits.astype(jnp.float32) / self.options.temperature, self.options)
    keys = _stream_keys(self.keys_B, stream, index_B)
    return jax.vmap(lambda k, l: categorical(k, l, self.options.exact))(keys, logits)

  def uniforms(self, stream: int, index_B, shape) -> jax.Array:
    """Per-example U[0, 1) [B, *shape] (48-bit if exact)."""
    keys = _stream_keys(self.keys_B, stream, index_B)
    draw = fine_uniform if self.options.exact else (lambda k, s: jax.random.uniform(k, s))
    return jax.vmap(lambda k: draw(k, shape))(keys)

  def record(self, frames, z_BxD, lo_B, hi_B, active_B):
    """Writes z into the frames whose time τ lies in (lo_b, hi_b] (active examples).

    Frame k holds the state at τ_k: every reveal at a time ≥ τ_k has happened.
    Callers pass, before a reveal at time lo, the time hi of the previous one.
    """
    if frames is None:
      return None
    tau = self.frame_times_K[:, None]
    inside_KxB = (tau > lo_B[None]) & (tau <= hi_B[None]) & active_B[None]
    return jnp.where(inside_KxB[..., None], z_BxD[None], frames)

  def finish_frames(self, frames, z_BxD, last_B):
    """Frames at or after the last reveal (τ ≤ last_b) show the final tokens."""
    if frames is None:
      return None
    inside_KxB = self.frame_times_K[:, None] <= last_B[None]
    return jnp.where(inside_KxB[..., None], z_BxD[None], frames)


# ------------------------------------------------------------ grid chains ---


def _still_masked_fraction(alpha: jax.Array) -> jax.Array:
  """r_j = (1 − α_j)/(1 − α_N) on a grid t_0 < ... < t_N: the probability that a
  position masked at t_N is still masked at t_j. [N + 1], r_N = 1, non-decreasing
  (cummax: float rounding must not reverse the order)."""
  return jax.lax.cummax((1.0 - alpha) / (1.0 - alpha[-1]))


def _reveal_steps(chain: _Chain, ts: jax.Array, masked_BxD: jax.Array) -> jax.Array:
  """Grid step (0..N−1, chain order) at which each position is revealed; N: never.

  Step i moves from t_{N−i} to t_{N−i−1}. A position masked at t_N = t_start is
  still masked after step i with probability r_{N−i−1}, r_j =
  (1 − α(t_j))/(1 − α(t_start)), so its reveal step is #{j < N : u < r_j} for
  one uniform u: the same law as drawing a p_u coin at every step.
  """
  steps = ts.shape[0] - 1
  alpha = chain.schedule.alpha(ts)
  r_N = _still_masked_fraction(alpha)[:steps]  # Increasing.
  u = chain.uniforms(_REVEAL, jnp.zeros(masked_BxD.shape[0], jnp.int32), masked_BxD.shape[1:])
  count = steps - jnp.searchsorted(r_N, u, side="right").astype(jnp.int32)
  return jnp.where(masked_BxD, count, steps)


def _grid_update(chain, z, logits, reveal_step, step_B, steps):
  """z after step i_b (per example): reveal positions whose reveal step is i_b.

  At the last step (i = N−1) positions never revealed (reveal step N, probability
  ~eps) take the argmax of the prediction.
  """
  tokens = chain.draw_tokens(logits, _TOKEN, step_B)
  masked = z == chain.mask_id
  now = masked & (reveal_step == step_B[:, None])
  leftover = masked & (reveal_step == steps) & (step_B == steps - 1)[:, None]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jnp.where(now, tokens, jnp.where(leftover, greedy, z))


def _grid_chain(chain: _Chain, z, ts, frames):
  """ancestral / topp / mean with exact draws; cache or call at every step."""
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  reveal_step = _reveal_steps(chain, ts, z == chain.mask_id)
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
  logp = jax.nn.log_softmax(
      chain.token_logits(logits.astype(jnp.float32) / chain.options.temperature, chain.options))
  log_mask = jnp.broadcast_to(jnp.log1p(-p_u), logp.shape[:-1] + (1,))
  joint = jnp.concatenate([jnp.log(p_u) + logp, log_mask], axis=-1)
  draw = jax.vmap(lambda k, l: jax.random.categorical(k, l, axis=-1))(key_B, joint)
  return jnp.where(z == chain.mask_id, draw.astype(jnp.int32), z)


def _reference_two_stage_step(chain, key_B, logits, z, p_u):
  """MD4's 'mean' step in float32: x̂ ~ p_θ, then a float32 coin with prob. p_u."""
  logits = chain.token_logits(logits.astype(jnp.float32) / chain.options.temperature,
                              chain.options)
  def one(key, logits_DxV):
    k_tok, k_coin = jax.random.split(key)
    x_hat = jax.random.categorical(k_tok, logits_DxV, axis=-1).astype(jnp.int32)
    return x_hat, jax.random.uniform(k_coin, logits_DxV.shape[:-1])
  x_hat, u = jax.vmap(one)(key_B, logits)
  return jnp.where((z == chain.mask_id) & (u < p_u), x_hat, z)


def _reference_chain(chain: _Chain, z, ts, frames, step_fn, vocab_size: int):
  """exact=False: the reference per-step float32 chain (NFE = N)."""
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  alpha = chain.schedule.alpha(ts)

  def body(i, carry):
    z, last, frames, _ = carry
    logits = chain.predict(z, jnp.full((batch,), ts[steps - i]))
    p_u = (alpha[steps - i - 1] - alpha[steps - i]) / (1.0 - alpha[steps - i])
    s_B = jnp.full((batch,), ts[steps - i - 1])
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    keys = _stream_keys(chain.keys_B, _REFERENCE, jnp.full((batch,), i))
    return step_fn(chain, keys, logits, z, p_u), s_B, frames, logits

  logits0 = jnp.zeros(z.shape + (vocab_size,), jnp.float32)
  z, last, frames, logits = jax.lax.fori_loop(
      0, steps, body, (z, jnp.full((batch,), jnp.inf), frames, logits0))
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  z = jnp.where(z == chain.mask_id, greedy, z)
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)


# ------------------------------------------------------ per-token (GenMD4) ---


def _per_token_chain(chain: _Chain, z, ts, frames, powers_V, two_stage: bool):
  """GenMD4's reverse chain: the network at every grid step, one exact draw per step.

  Step i (t = t_{N−i} -> s = t_{N−i−1}) for a masked position: token v with
  probability μ_v·(1 − (s/t)^{w_v}), stay masked with Σ_v μ_v·(s/t)^{w_v}
  (`two_stage`: x̂ ~ μ, then reveal x̂ with probability 1 − (s/t)^{w_x̂}).
  """
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  options = chain.options

  def body(i, carry):
    z, last, frames = carry
    t, s = ts[steps - i], ts[steps - i - 1]
    step_B = jnp.full((batch,), i, jnp.int32)
    logits = chain.predict(z, jnp.full((batch,), t))
    logits = chain.token_logits(logits.astype(jnp.float32) / options.temperature, options)
    log_mu = jax.nn.log_softmax(logits, axis=-1)
    log_stay_V = genmd4.log_stay_masked(powers_V, s, t)  # w_v·log(s/t), −inf at s = 0.
    log_stay_11V = log_stay_V.reshape((1, 1, -1))
    keys = _stream_keys(chain.keys_B, _TOKEN, step_B)
    if two_stage:
      x_hat = jax.vmap(lambda k, l: categorical(k, l, options.exact))(keys, logits)
      reveal_p = -jnp.expm1(log_stay_V[x_hat])
      u = chain.uniforms(_REVEAL, step_B, z.shape[1:])
      draw = jnp.where(u < reveal_p, x_hat, chain.mask_id)
    else:
      log_reveal = log_mu + jnp.log(-jnp.expm1(log_stay_11V))
      log_stay = jax.nn.logsumexp(log_mu + log_stay_11V, axis=-1, keepdims=True)
      joint = jnp.concatenate([log_reveal, log_stay], axis=-1)  # Index V = the mask id.
      draw = jax.vmap(lambda k, l: categorical(k, l, options.exact))(keys, joint)
    s_B = jnp.full((batch,), s)
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    masked = z == chain.mask_id
    # The last step (s = 0) decodes everything: its stay log-probability is −inf.
    return jnp.where(masked, draw, z), s_B, frames

  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, last, frames = jax.lax.fori_loop(0, steps, body, (z, inf_B, frames))
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)


# ---------------------------------------------------------- first hitting ---


def _first_hitting_chain(chain: _Chain, z, t_start, frames):
  """One masked position per network call and example, at its first-hitting time."""
  batch, num_positions = z.shape
  schedule = chain.schedule

  def cond(carry):
    return jnp.any(carry[1] > 0)

  def body(carry):
    z, n_B, t_B, last, nfe, frames = carry
    active = n_B > 0
    call_B = jnp.full((batch,), nfe)
    u_B = chain.uniforms(_TIME, call_B, ())
    # (1 − α_s) = (1 − α_t)·u^(1/n): the first of n reveal times below t.
    one_minus_alpha_s = (1.0 - schedule.alpha(t_B)) * jnp.exp(
        jnp.log(u_B) / jnp.maximum(n_B, 1).astype(jnp.float32))
    s_B = jnp.minimum(schedule.inverse(1.0 - one_minus_alpha_s), t_B)
    masked = z == chain.mask_id
    scores = jnp.where(masked, chain.uniforms(_POSITION, call_B, (num_positions,)), -1.0)
    pos_B = jnp.argmax(scores, axis=-1)
    logits = chain.predict(z, s_B)
    row_BxV = jnp.take_along_axis(logits, pos_B[:, None, None], axis=1)[:, 0]
    token_B = chain.draw_tokens(row_BxV, _TOKEN, call_B)
    frames = chain.record(frames, z, s_B, last, active)
    new = jnp.where(active, token_B, z[jnp.arange(batch), pos_B])
    z = z.at[jnp.arange(batch), pos_B].set(new)
    return (z, n_B - active.astype(jnp.int32), jnp.where(active, s_B, t_B),
            jnp.where(active, s_B, last), nfe + 1, frames)

  n_B = jnp.sum(z == chain.mask_id, axis=-1).astype(jnp.int32)
  t_B = jnp.full((batch,), t_start, jnp.float32)
  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, _, _, last, nfe, frames = jax.lax.while_loop(
      cond, body, (z, n_B, t_B, inf_B, jnp.int32(0), frames))
  return z, nfe, chain.finish_frames(frames, z, last)


# ---------------------------------------------------- classifier-free guidance ---


def guided_logits(cond_logits: jax.Array, uncond_logits: jax.Array, weight: float) -> jax.Array:
  """(1 + w)·log p(x | c) − w·log p(x): log-probabilities sharpened towards the class.

  The draws then follow p(x | c)^{1+w} / p(x)^w, renormalised; w = 0 is the
  conditional model.
  """
  cond_logp = jax.nn.log_softmax(cond_logits.astype(jnp.float32), axis=-1)
  uncond_logp = jax.nn.log_softmax(uncond_logits.astype(jnp.float32), axis=-1)
  return (1.0 + weight) * cond_logp - weight * uncond_logp


# --------------------------------------------------------------- remasking ---


def remdm_path(schedule, ts: jax.Array, options: SamplerOptions):
  """The path of a ReMDM chain: network times, α's and the remasking σ per step.

  Args:
    schedule: the model's schedule.
    ts: the sampler's grid τ_0 = 0 < … < τ_N (the chain walks it backwards).
    options: eta, remask, loop.

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
  if options.remask == "loop":
    t_on, t_off, alpha_on = options.loop
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
  if options.remask == "cap":
    sigma = jnp.minimum(options.eta, sigma_max)
  elif options.remask == "rescale":
    sigma = options.eta * sigma_max
  else:
    tau_t, tau_s = ts[::-1][:-1], ts[::-1][1:]
    in_loop = (tau_s >= options.loop[1]) & (tau_t <= options.loop[0])
    sigma = jnp.where(in_loop, jnp.minimum(options.eta, sigma_max), 0.0)
  sigma = sigma.at[steps - 1].set(0.0)
  return t_net, alpha, sigma


def _remdm_chain(chain: _Chain, z, ts, frames, t_net, alpha, sigma):
  """ReMDM (Wang et al. 2025): from t to s, a masked position becomes x̂ ~ p_θ with
  probability (α_s − (1 − σ)·α_t)/(1 − α_t); a position the chain revealed is
  re-masked with probability σ (prompt positions never change).

  The reveal is drawn as the ancestral chain draws it — one uniform u per
  position, revealed from t to s iff u ≥ r_s, r_j = (1 − α_j)/(1 − α_N) —
  plus a second coin of probability σ·α_t/(1 − α_s) for the extra mass σ adds
  (together: the ReMDM probability); a re-masked position restarts its clock
  with u ~ U[0, r_s). So σ = 0 reproduces the ancestral chain's samples for
  the same key (the same u, the same token draws).
  """
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  free = z == chain.mask_id  # Generated positions; the others are the prompt.
  r = _still_masked_fraction(alpha)
  u0 = chain.uniforms(_REVEAL, jnp.zeros((batch,), jnp.int32), z.shape[1:])

  def body(i, carry):
    z, u, last, frames = carry
    step_B = jnp.full((batch,), i, jnp.int32)
    a_t, a_s, r_s = alpha[steps - i], alpha[steps - i - 1], r[steps - i - 1]
    logits = chain.predict(z, jnp.full((batch,), t_net[steps - i]))
    tokens = chain.draw_tokens(logits, _TOKEN, step_B)
    masked = z == chain.mask_id
    extra = chain.uniforms(_EXTRA_REVEAL, step_B, z.shape[1:]) < sigma[i] * a_t / (1.0 - a_s)
    reveal = masked & ((u >= r_s) | extra)
    leftover = masked & ~reveal & (i == steps - 1)  # Probability ~eps: take the argmax.
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    remask = free & ~masked & (chain.uniforms(_REMASK, step_B, z.shape[1:]) < sigma[i])
    s_B = jnp.full((batch,), ts[steps - i - 1])
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    z = jnp.where(reveal, tokens, jnp.where(leftover, greedy,
                                            jnp.where(remask, chain.mask_id, z)))
    u = jnp.where(remask, chain.uniforms(_CLOCK, step_B, z.shape[1:]) * r_s, u)
    return z, u, s_B, frames

  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, _, last, frames = jax.lax.fori_loop(0, steps, body, (z, u0, inf_B, frames))
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)


# ------------------------------------------------------ ordered unmasking ---


def reveal_counts(alpha: jax.Array, masked_B: jax.Array) -> jax.Array:
  """int32 [N+1, B]: how many positions stay masked at each grid time.

  m_b·(1 − α_j)/(1 − α_N), rounded (m_b masked at the start; 0 at j = 0), so a
  step from j + 1 to j reveals the schedule's expected count, the same grids apply
  and the counts add up to m_b exactly.
  """
  steps = alpha.shape[0] - 1
  r = _still_masked_fraction(alpha).at[0].set(0.0)
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


def _ordered_chain(chain: _Chain, z, ts, frames, alpha):
  """Confidence-ordered unmasking (MaskGIT-style): at each step reveal the k masked
  positions the prediction is surest of, k from the schedule (`reveal_counts`); the
  tokens are drawn from the prediction (argmax at temperature 0). Revealed tokens
  never change; ties go to the lower position."""
  steps = ts.shape[0] - 1
  batch = z.shape[0]
  options = chain.options
  keep_masked = reveal_counts(alpha, jnp.sum(z == chain.mask_id, axis=-1))

  def body(i, carry):
    z, last, frames = carry
    step_B = jnp.full((batch,), i, jnp.int32)
    logits = chain.predict(z, jnp.full((batch,), ts[steps - i])).astype(jnp.float32)
    if options.temperature == 0:
      logits = chain.token_logits(logits, options)
      tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      logits = chain.token_logits(logits / options.temperature, options)
      keys = _stream_keys(chain.keys_B, _TOKEN, step_B)
      tokens = jax.vmap(lambda k, l: categorical(k, l, options.exact))(keys, logits)
    masked = z == chain.mask_id
    score = jnp.where(masked, order_scores(jax.nn.softmax(logits, -1), tokens, options.order),
                      -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1)
    count_B = jnp.sum(masked, axis=-1) - keep_masked[steps - i - 1]
    reveal = masked & (rank < count_B[:, None])
    s_B = jnp.full((batch,), ts[steps - i - 1])
    frames = chain.record(frames, z, s_B, last, jnp.ones((batch,), bool))
    return jnp.where(reveal, tokens, z), s_B, frames

  inf_B = jnp.full((batch,), jnp.inf, jnp.float32)
  z, last, frames = jax.lax.fori_loop(0, steps, body, (z, inf_B, frames))
  return z, jnp.int32(steps), chain.finish_frames(frames, z, last)


# ---------------------------------------------------------- the registry ---


def _identity(logits, options):
  del options
  return logits


def _nucleus(logits, options):
  return top_p_logits(logits, options.top_p)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registry entry.

  Attributes:
    token_logits: (tempered logits, options) -> the logits tokens are drawn from.
    grid: True for the time-grid chains (steps, grid, cache apply).
    reference_step: the float32 per-step update used when exact=False
      (grid samplers), `(chain, keys_B, logits, z, p_u) -> z`.
    chain: None (the shared grid chains) or 'remdm' / 'ordered' (their own
      chains: network at every step, no idle-step caching).
    per_token: runs on GenMD4's per-token schedules.
  """

  token_logits: Callable[[jax.Array, SamplerOptions], jax.Array]
  grid: bool = True
  reference_step: Optional[Callable] = None
  chain: Optional[str] = None
  per_token: bool = True


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(_identity, reference_step=_reference_joint_step),
    "topp": Sampler(_nucleus, reference_step=_reference_joint_step),
    "mean": Sampler(_identity, reference_step=_reference_two_stage_step),
    "first_hitting": Sampler(_identity, grid=False, per_token=False),
    "remdm": Sampler(_identity, chain="remdm", per_token=False),
    "ordered": Sampler(_identity, chain="ordered", per_token=False),
}


def get_sampler(name: str) -> Sampler:
  if name not in SAMPLERS:
    raise ValueError(f"Unknown sampler {name!r}; valid: {sorted(SAMPLERS)}.")
  return SAMPLERS[name]


def check_arguments(sampler: str, steps: Optional[int], grid: str, options: SamplerOptions,
                    t_start: float = 1.0, frames: int = 0) -> None:
  """Raises ValueError for arguments `sample` cannot run with (before any tracing)."""
  name, sampler = sampler, get_sampler(sampler)
  if sampler.grid:
    if steps is None or int(steps) < 1:
      raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if grid not in GRIDS:
      raise ValueError(f"Unknown time grid {grid!r}; valid: {GRIDS}.")
  if sampler.chain is not None and options.cache:
    raise ValueError(f"Idle-step caching does not apply to {name!r} (the network runs at every "
                     "step): pass SamplerOptions(cache=False) (CLI: leave --cache unset).")
  if name == "ordered" and options.order not in ORDERS:
    raise ValueError(f"Unknown order {options.order!r}; valid: {', '.join(ORDERS)}.")
  if name == "remdm":
    if options.remask not in REMASK_STRATEGIES:
      raise ValueError(f"Unknown remasking strategy {options.remask!r}; valid: "
                       f"{', '.join(REMASK_STRATEGIES)}.")
    if not 0 <= options.eta <= 1:
      raise ValueError(f"eta must lie in [0, 1], got {options.eta}.")
    t_on, t_off, alpha_on = options.loop
    if options.remask == "loop" and not (0 < t_off < t_on < 1 and 0 < alpha_on < 1
                                         and t_start == 1):
      raise ValueError(f"The loop strategy needs 0 < t_off < t_on < 1, 0 < α_on < 1 and "
                       f"t_start = 1; got loop={options.loop}, t_start={t_start}.")
  if options.temperature == 0 and name != "ordered":
    raise ValueError("temperature 0 (argmax tokens) is for the 'ordered' sampler; others need "
                     "temperature > 0.")
  if not options.temperature >= 0:
    raise ValueError(f"temperature must be > 0 (or 0 for 'ordered'), got {options.temperature}.")
  if not options.guidance >= 0:
    raise ValueError(f"guidance must be >= 0, got {options.guidance}.")
  if not 0 < options.top_p <= 1:
    raise ValueError(f"top_p must lie in (0, 1], got {options.top_p}.")
  if not 0 < t_start <= 1:
    raise ValueError(f"t_start must lie in (0, 1], got {t_start}.")
  if frames < 0 or frames == 1:
    raise ValueError(f"frames must be 0 (none) or >= 2, got {frames}.")


def check_model(model: model_lib.MD4, sampler: str) -> None:
  """Raises ValueError for a sampler the model's schedule does not support."""
  if model.per_token_schedule and not get_sampler(sampler).per_token:
    working = sorted(name for name, spec in SAMPLERS.items() if spec.per_token)
    raise ValueError(f"Sampler {sampler!r} is not exact for GenMD4 (a schedule per token: the "
                     f"time of the next reveal depends on the predictions); use one of "
                     f"{working}.")


def masked_input(tokens: jax.Array, fixed: jax.Array, mask_id: int) -> jax.Array:
  """tokens where `fixed` is True, the mask id elsewhere (positions to generate)."""
  return jnp.where(jnp.asarray(fixed, bool), jnp.asarray(tokens, jnp.int32), mask_id)


def all_masked(model: model_lib.MD4, batch_size: int) -> jax.Array:
  """int32 [B, *data_shape] filled with the mask id."""
  return jnp.full((batch_size,) + tuple(model.data_shape), model.mask_id, jnp.int32)


def class_labels(num_classes: int, batch_size: int, label: Optional[int] = None,
                 offset: int = 0) -> Optional[jax.Array]:
  """Labels to sample a class-conditional model with; None if unconditional.

  Args:
    num_classes: the model's classes (0 = unconditional).
    batch_size: B.
    label: one label for every sample, or None for offset, offset + 1, ...
      (mod num_classes), i.e. the classes in turn.
    offset: index of the first sample (for labels that continue across batches).

  Returns:
    int32 [B] or None.

  Raises:
    ValueError: a label given for an unconditional model, or out of range.
  """
  if label is None:
    if num_classes <= 0:
      return None
    return (offset + jnp.arange(batch_size, dtype=jnp.int32)) % num_classes
  if not 0 <= label < max(num_classes, 0):
    raise ValueError(f"label {label} needs a class-conditional model with label < classes "
                     f"(this one has classes={num_classes}).")
  return jnp.full((batch_size,), label, jnp.int32)


def sample(
    model: model_lib.MD4, variables, rng: jax.Array, *, batch_size: Optional[int] = None,
    z_init: Optional[jax.Array] = None, fixed: Optional[jax.Array] = None,
    cond: Optional[jax.Array] = None, steps: Optional[int], sampler: str = "ancestral",
    grid: str = "uniform", options: SamplerOptions = SamplerOptions(), t_start: float = 1.0,
    frames: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs the reverse chain. Jit-compatible (every argument after rng is static
  except z_init, fixed and cond).

  Args:
    model: the MD4 module (network, schedule, V, data_shape).
    variables: its variables, e.g. {'params': state.ema_params}.
    rng: key; example b draws from fold_in(rng, b).
    batch_size: B when starting from all-mask.
    z_init: int [B, *data_shape] start: positions equal to the mask id are
      generated, the others are kept fixed (prefix, infilling, inpainting).
    fixed: optional bool [B, *data_shape]: with it, z_init's values where it is
      False are ignored and generated.
    cond: optional int [B] class labels.
    steps: grid steps N (ancestral, topp, mean); ignored by first_hitting,
      which makes one call per masked position (pass None).
    sampler: a SAMPLERS name.
    grid: 'uniform' (t_i = i/N) or 'cosine' (t_i = cos(π/2·(1 − i/N))).
    options: temperature, top-p, exact draws, idle-step skipping.
    t_start: the time z_init is at (1 = all-mask prior; < 1 to reconstruct an
      input masked to level t_start, see `reconstruct`); the grid is scaled
      to [0, t_start].
    frames: K ≥ 2 records the trajectory: K states at τ_k = t_start·(1 − k/(K−1)),
      from z_init (k = 0) to the final tokens (k = K−1).

  Returns:
    tokens: int32 [B, *data_shape], no mask left, fixed positions unchanged.
    stats: 'nfe': int32 scalar, network calls on the batch; every call
      evaluates all B examples once, so it is also the NFE per sample
      (N for GenMD4, which calls the network at every step).
      'frames': int32 [K, B, *data_shape] when frames > 0.
  """
  check_arguments(sampler, steps, grid, options, t_start, frames)
  check_model(model, sampler)
  null_label = getattr(model.network, "num_classes", 0)
  if options.guidance and (cond is None or null_label == 0):
    raise ValueError("guidance needs a class-conditional model (trained with "
                     "config.label_dropout > 0) and class labels (cond).")
  spec = get_sampler(sampler)
  if z_init is None:
    if batch_size is None:
      raise ValueError("Pass batch_size or z_init.")
    z_init = all_masked(model, batch_size)
  z_init = jnp.asarray(z_init, jnp.int32)
  if fixed is not None:
    z_init = masked_input(z_init, fixed, model.mask_id)
  data_shape = tuple(model.data_shape)
  if z_init.shape[1:] != data_shape:
    raise ValueError(f"z_init has example shape {z_init.shape[1:]}, the model expects "
                     f"{data_shape}.")
  batch = z_init.shape[0]
  z = z_init.reshape(batch, -1)

  def predict(z_BxD, t_B):
    z_in = z_BxD.reshape((batch,) + data_shape)
    if options.guidance:  # Conditional and unconditional halves in one call.
      both = model.apply(variables, jnp.concatenate([z_in, z_in]), jnp.concatenate([t_B, t_B]),
                         jnp.concatenate([cond, jnp.full_like(cond, null_label)]),
                         method="predict")
      logits = guided_logits(both[:batch], both[batch:], options.guidance)
    else:
      logits = model.apply(variables, z_in, t_B, cond, method="predict")
    return logits.reshape(batch, z_BxD.shape[1], -1)

  frame_times = None
  trajectory = None
  if frames:
    frame_times = t_start * (1.0 - jnp.arange(frames, dtype=jnp.float32) / (frames - 1))
    trajectory = jnp.broadcast_to(z[None], (frames,) + z.shape)
  chain = _Chain(predict=predict, schedule=model.schedule,
                 keys_B=_example_keys(rng, batch), mask_id=model.mask_id, options=options,
                 token_logits=spec.token_logits, frame_times_K=frame_times)
  if not spec.grid:
    z, nfe, trajectory = _first_hitting_chain(chain, z, t_start, trajectory)
  else:
    ts = time_grid(grid, int(steps)) * t_start
    if spec.chain == "remdm":
      t_net, alpha, sigma = remdm_path(model.schedule, ts, options)
      z, nfe, trajectory = _remdm_chain(chain, z, ts, trajectory, t_net, alpha, sigma)
    elif spec.chain == "ordered":
      z, nfe, trajectory = _ordered_chain(chain, z, ts, trajectory, model.schedule.alpha(ts))
    elif model.per_token_schedule:
      powers = model.apply(variables, method="powers")
      z, nfe, trajectory = _per_token_chain(chain, z, ts, trajectory, powers,
                                            two_stage=sampler == "mean")
    elif options.exact:
      z, nfe, trajectory = _grid_chain(chain, z, ts, trajectory)
    else:
      z, nfe, trajectory = _reference_chain(chain, z, ts, trajectory, spec.reference_step,
                                            model.vocab_size)
  stats = {"nfe": nfe}
  if frames:
    stats["frames"] = trajectory.reshape((frames, batch) + data_shape)
  return z.reshape((batch,) + data_shape), stats


def reconstruct(
    model: model_lib.MD4, variables, rng: jax.Array, x: jax.Array, t: float, *,
    steps: Optional[int], cond: Optional[jax.Array] = None, sampler: str = "ancestral",
    grid: str = "uniform", options: SamplerOptions = SamplerOptions(), frames: int = 0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Masks clean x to level t (q(z_t | x)) and runs the reverse chain from t.

  Args:
    x: int [B, *data_shape] clean tokens.
    t: the masking level in (0, 1]: each position is masked w.p. 1 − α(t)
      (1 − α_t^{x_n} for GenMD4).
    (the rest as in `sample`; the grid covers [0, t]).

  Returns:
    (z_t, tokens, stats): the masked input, the reconstruction, sample's stats.
  """
  k_mask, k_chain = jax.random.split(rng)
  x = jnp.asarray(x, jnp.int32)
  keep = model.apply(variables, x, jnp.full((x.shape[0],), t, jnp.float32),
                     method="keep_probability")  # Per token for GenMD4.
  z_t, _ = losses.forward_mask(x, keep, jax.random.uniform(k_mask, x.shape), model.mask_id)
  tokens, stats = sample(model, variables, k_chain, z_init=z_t, cond=cond, steps=steps,
                         sampler=sampler, grid=grid, options=options, t_start=t, frames=frames)
  return z_t, tokens, stats
