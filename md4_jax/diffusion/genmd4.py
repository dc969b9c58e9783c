"""GenMD4: a learnable masking schedule per token value (MD4 paper, Sec. 5).

Schedule. One exponent per vocabulary entry, w = softplus(w_raw) ∈ R^V
(w_raw initialised so that every w_v = power_init), and

  α_t^v = 1 − (1 − ε)·t^{w_v},      −α'^v_t / (1 − α_t^v) = w_v / t,

with ε the schedule's eps (1e-4): α_0^v = 1 (nothing masked at t = 0, so
there is no ε offset at the clean end; the small t1 below keeps the weight
w_v/t finite) and α_1^v = ε at the noisy end, as for the fixed schedules. A
position holding token x is masked at t with probability 1 − α_t^x.

Objective. t ranges over [t1, 1]: a unit time u ∈ (0, 1] (the project's one
time draw, losses.draw_times_and_noise / stratified_times) maps to
t = t1 + (1 − t1)·u, and the integral's estimate carries the factor (1 − t1).
For a masked position with clean token x and prediction μ = softmax(logits):

  integrand = (1/t)·[ −w_x·log μ_x − w_x + Σ_v w_v·μ_v ]

(the KL rate between the true and the model's reverse jump processes; all
w_v = K gives exactly the polyK MD4 term (K/t)·(−log μ_x)). Reconstruction at
t1 with the decoder p(x | masked at t1) ∝ 1 − α_{t1}^x (the token posterior of
a mask under a uniform prior; copy if unmasked):
L_recon = Σ_n (1 − α_{t1}^{x_n})·[ log Σ_v t1^{w_v} − w_{x_n}·log t1 ]
(= D·(1 − α_{t1})·log V for equal w). Prior at t = 1: D·ε·log V, as for MD4
(losses.prior_loss), so loss_diff + loss_recon + loss_prior bounds −log p(x).

Gradient of the schedule. The masks depend on w, so w gets, besides the
pathwise gradient of the integrand, a score-function term: K ≥ 2 masks z_k per
example at the same t, losses ℓ_k, and the leave-one-out (RLOO) surrogate

  loss_score = (1/K)·Σ_k stop_grad(ℓ_k − mean_{j≠k} ℓ_j)·log q(z_k | x),
  log q(z | x) = Σ_n [masked: log(1 − α_t^{x_n}); kept: log α_t^{x_n}].

The training step minimises loss + loss_score; loss (reported, evaluated)
is the NELBO alone. The network sees the mean loss only (ℓ_k is stopped in
loss_score, and log q does not depend on it). The K masked copies of a batch
go through the network as one call on [B·K, ...] (example-major, so an
example's copies stay on its device).

Sampling (diffusion/sampling/per_token.py): a masked position moves from t to s < t to
token v with probability μ_v·(α_s^v − α_t^v)/(1 − α_t^v) = μ_v·(1 − (s/t)^{w_v})
and stays masked with probability Σ_v μ_v·(s/t)^{w_v}: one (V+1)-way draw.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections

from md4_jax.diffusion import fused_head
from md4_jax.diffusion import losses
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import schedules as schedules_lib

MIN_POWER = 1e-6  # softplus can underflow to 0; t^0 would freeze a token's schedule.


def powers_from_raw(w_raw: jax.Array) -> jax.Array:
  """w = softplus(w_raw), at least MIN_POWER. float32 [V]."""
  return jnp.maximum(jax.nn.softplus(w_raw.astype(jnp.float32)), MIN_POWER)


def raw_from_power(power: float) -> float:
  """The w_raw with softplus(w_raw) = power (> 0)."""
  return math.log(math.expm1(power))


def keep_probability(w_x: jax.Array, t: jax.Array, eps: float) -> jax.Array:
  """α_t^x = 1 − (1 − ε)·t^{w_x} (t broadcast against w_x)."""
  return 1.0 - (1.0 - eps) * jnp.exp(w_x * jnp.log(t))


def log_stay_masked(w_V: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
  """log((1 − α_s^v)/(1 − α_t^v)) = w_v·log(s/t) (−inf at s = 0), float32 [..., V]."""
  return w_V * (jnp.log(s) - jnp.log(t))[..., None]


class GenMD4(model_lib.MaskedDiffusion):
  """MaskedDiffusion with a learnable polynomial schedule per token value (module doc).

  The `t` given to `nelbo` is a unit time u ∈ (0, 1] (t = t1 + (1 − t1)·u), and
  its `noise` may hold K masks per example, [B, K, *data_shape].

  Attributes (besides MaskedDiffusion's; `schedule` must be polynomial and supplies ε):
    power_init: every w_v at initialisation (> 0).
    t1: lower end of the time range (0 <= t1 < 1); the reconstruction term
      is taken there.
    num_masks: K >= 2 masks per example for the RLOO gradient (training).
  """

  power_init: float = 1.0
  t1: float = 1e-3
  num_masks: int = 2

  per_token_schedule = True

  @property
  def masks_per_example(self) -> int:
    return self.num_masks

  def setup(self):
    self.w_raw = self.param("w_raw", jax.nn.initializers.constant(raw_from_power(self.power_init)),
                            (self.vocab_size,), jnp.float32)

  @property
  def eps(self) -> float:
    return self.schedule.eps

  def powers(self) -> jax.Array:
    """w = softplus(w_raw): float32 [V]."""
    return powers_from_raw(self.w_raw)

  def keep_probability(self, x, t):
    """α_t^{x_n} for every position of x [B, *data_shape] at times t [B]."""
    t = jnp.asarray(t, jnp.float32)
    return keep_probability(self.powers()[x], t.reshape(t.shape + (1,) * (x.ndim - 1)), self.eps)

  def times(self, u):
    """Unit draws u ∈ (0, 1] -> t = t1 + (1 − t1)·u ∈ (t1, 1]."""
    return self.t1 + (1.0 - self.t1) * u

  def _nelbo(self, x, cond, train, u, noise):
    """(nelbo's per-example terms: loss_diff (mean over the K masks), loss_recon,
    loss_prior, loss, and with K > 1 loss_score, the RLOO surrogate (zero value
    in the gradient's sense: add it to the objective, never to the reported
    loss); step statistics: power_min / power_mean / power_max of w)."""
    # u ~ U(0, 1] (antithetic) and K masks' uniforms, unless given; t = t1 + (1 − t1)·u.
    u, noise = self._checked_draw(x, u, noise)
    noise_BxK = noise if noise.ndim == x.ndim + 1 else noise[:, None]
    batch, num_masks = noise_BxK.shape[:2]
    t = self.times(jnp.asarray(u, jnp.float32))
    t_B1 = t.reshape((batch, 1) + (1,) * (x.ndim - 1))
    # z_t ~ q(z_t | x), K times: position n kept with probability α_t^{x_n}, else the mask.
    w = self.powers()
    x_BxK = jnp.broadcast_to(x[:, None], noise_BxK.shape)
    w_x = w[x_BxK]
    alpha_x = keep_probability(w_x, t_B1, self.eps)
    z_t, masked = losses.forward_mask(x_BxK, alpha_x, noise_BxK, self.mask_id)
    # (1 − t1)/t · Σ_{n masked} [−w_x·log μ_x − w_x + Σ_v w_v·μ_v], μ = p_θ(· | z_t).
    nll, expected_w = self._predicted_terms(z_t, t, cond, train, x_BxK, w)
    integrand = w_x * nll - w_x + expected_w
    masked_sum = losses.masked_sum(integrand, masked, nll, batch * num_masks)
    loss_k = (1.0 - self.t1) * masked_sum.reshape(batch, num_masks) / t[:, None]  # [B, K]
    loss_diff = jnp.mean(loss_k, axis=1)
    loss_recon = self.recon_terms(x)
    loss_prior = jnp.full((batch,), losses.prior_loss(self.schedule, self.num_positions,
                                                      self.vocab_size))
    terms = {"loss_diff": loss_diff, "loss_recon": loss_recon, "loss_prior": loss_prior,
             "loss": loss_diff + loss_recon + loss_prior}
    if num_masks > 1:
      terms["loss_score"] = self._score_surrogate(loss_k, masked, w_x, t_B1, alpha_x)
    return terms, {"power_min": jnp.min(w), "power_mean": jnp.mean(w), "power_max": jnp.max(w)}

  def _predicted_terms(self, z_BxK, t_B, cond, train, x_BxK, w_V):
    """−log μ_x and Σ_v w_v·μ_v at every position of the K masked copies (one
    network call on [B·K, ...], example-major): float32 [B, K, *data_shape] each."""
    batch, num_masks = z_BxK.shape[:2]

    def terms(logits, targets):
      expected_w = jnp.einsum("...v,v->...", jax.nn.softmax(logits.astype(jnp.float32), -1), w_V)
      return losses.token_nll(logits, targets), expected_w

    flat = lambda a: a.reshape((batch * num_masks,) + a.shape[2:])
    cond_flat = None if cond is None else jnp.repeat(cond, num_masks, axis=0)
    out = fused_head.token_terms(self.network, flat(z_BxK), jnp.repeat(t_B, num_masks),
                                 cond_flat, train, flat(x_BxK), terms, self.loss_chunk_size)
    return jax.tree.map(lambda a: a.reshape(z_BxK.shape), out)

  def _score_surrogate(self, loss_BxK, masked, w_x, t_B1, alpha_x):
    """(1/K)·Σ_k stop_grad(ℓ_k − mean_{j≠k} ℓ_j)·log q(z_k | x): float32 [B]."""
    batch, num_masks = loss_BxK.shape
    log_mask = math.log1p(-self.eps) + w_x * jnp.log(t_B1)
    log_q = jnp.sum(jnp.where(masked, log_mask, jnp.log(alpha_x)).reshape(batch, num_masks, -1),
                    axis=-1)  # [B, K]
    others = (jnp.sum(loss_BxK, axis=1, keepdims=True) - loss_BxK) / (num_masks - 1)
    advantage = jax.lax.stop_gradient(loss_BxK - others)
    return jnp.mean(advantage * log_q, axis=1)

  def recon_terms(self, x):
    """L_recon per example (float32 [B]): masked at t1 -> decoder ∝ 1 − α_{t1}^v."""
    batch = x.shape[0]
    if self.t1 == 0:  # α_0 = 1: nothing is masked at t = 0.
      return jnp.zeros((batch,), jnp.float32)
    w = self.powers()
    log_t1 = math.log(self.t1)
    w_x = w[x]
    masked_prob = (1.0 - self.eps) * jnp.exp(w_x * log_t1)
    nll = jax.nn.logsumexp(w * log_t1) - w_x * log_t1
    return jnp.sum((masked_prob * nll).reshape(batch, -1), axis=-1)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line) for a config GenMD4 cannot run with."""
  if config.model != "genmd4":
    return
  if not config.cont_time:
    raise ValueError("config.model='genmd4' needs config.cont_time=True: GenMD4's objective is "
                     "the continuous-time NELBO (there is no discrete-time GenMD4 loss).")
  schedule = schedules_lib.get_schedule(config.noise_schedule)
  power = {schedules_lib.LinearSchedule: 1.0}.get(type(schedule), getattr(schedule, "power", None))
  if power is None:
    raise ValueError(f"config.model='genmd4' learns a polynomial schedule per token; "
                     f"config.noise_schedule={config.noise_schedule!r} is not polynomial: use "
                     f"'linear' (= poly1) or 'polyK'.")
  if not config.power_init > 0:
    raise ValueError(f"config.power_init={config.power_init!r} is out of range: it must be > 0.")
  if abs(power - config.power_init) > 1e-12:
    raise ValueError(f"config.noise_schedule={config.noise_schedule!r} (poly{power:g}) and "
                     f"config.power_init={config.power_init:g} disagree: GenMD4 starts every "
                     f"token at α = 1 − (1 − ε)·t^power_init; set noise_schedule="
                     f"'poly{config.power_init:g}'.")
  if not 0 <= config.genmd4_t1 < 1:
    raise ValueError(f"config.genmd4_t1={config.genmd4_t1!r} is out of range: it must be in "
                     "[0, 1).")
  if int(config.genmd4_num_masks) < 2:
    raise ValueError(f"config.genmd4_num_masks={config.genmd4_num_masks!r} is out of range: "
                     "the leave-one-out gradient needs >= 2 masks per example.")


def build_model(config: ml_collections.ConfigDict, network) -> GenMD4:
  """The GenMD4 module described by `config` around `network`."""
  check_config(config)
  fused_head.check_network(config, network)
  return GenMD4(**model_lib.shared_fields(config, network), power_init=float(config.power_init),
                t1=float(config.genmd4_t1), num_masks=int(config.genmd4_num_masks))
