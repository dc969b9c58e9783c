"""Masking schedules α(t): the probability that a token is still unmasked at t.

Base forms α₀(t) (linear 1−t, cosine 1−cos(π/2·(1−t)), polyK 1−t^K) are squeezed
into [eps, 1−eps] so that α(0) ≈ 1 and α(1) ≈ 0 without touching either:

  α(t) = (1 − 2·eps)·α₀(t) + eps,     α'(t) = (1 − 2·eps)·α₀'(t).

The loss weight is w(t) = −α'(t) / (1 − α(t)) ≥ 0 and the log-SNR is
γ(t) = log(α / (1 − α)). A schedule is a frozen dataclass, equal and hashable by
value (`get_schedule("poly3") == PolySchedule(3.0)`), so the model holds the
object itself; `get_schedule(name)` parses a config name into one.
"""

import dataclasses
import math
import re

import jax.numpy as jnp

EPS = 1e-4

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A masking schedule: subclasses define α₀, its derivative and its inverse.

  Every method is elementwise and jit-friendly.

  Attributes:
    eps: the squeeze margin.
  """

  eps: float = EPS

  @property
  def name(self) -> str:
    raise NotImplementedError

  def base_alpha(self, t: Array) -> Array:
    """α₀(t), decreasing from 1 to 0 on [0, 1]."""
    raise NotImplementedError

  def base_dalpha(self, t: Array) -> Array:
    """dα₀/dt."""
    raise NotImplementedError

  def base_inverse(self, a: Array) -> Array:
    """t such that α₀(t) = a, for a in [0, 1]."""
    raise NotImplementedError

  def alpha(self, t: Array) -> Array:
    """α(t) in [eps, 1 − eps]."""
    return (1.0 - 2.0 * self.eps) * self.base_alpha(t) + self.eps

  def dalpha(self, t: Array) -> Array:
    """α'(t) ≤ 0."""
    return (1.0 - 2.0 * self.eps) * self.base_dalpha(t)

  def weight(self, t: Array) -> Array:
    """Loss weight w(t) = −α'(t) / (1 − α(t)) ≥ 0."""
    return -self.dalpha(t) / (1.0 - self.alpha(t))

  def log_snr(self, t: Array) -> Array:
    """γ(t) = log(α / (1 − α))."""
    a = self.alpha(t)
    return jnp.log(a) - jnp.log1p(-a)

  def inverse(self, alpha: Array) -> Array:
    """The time t with α(t) = alpha (alpha clipped to [eps, 1 − eps])."""
    a0 = (alpha - self.eps) / (1.0 - 2.0 * self.eps)
    return self.base_inverse(jnp.clip(a0, 0.0, 1.0))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
  """α₀(t) = 1 − t."""

  name = "linear"

  def base_alpha(self, t):
    return 1.0 - t

  def base_dalpha(self, t):
    return -jnp.ones_like(t)

  def base_inverse(self, a):
    return 1.0 - a


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """α₀(t) = 1 − cos(π/2·(1 − t))."""

  name = "cosine"

  def base_alpha(self, t):
    return 1.0 - jnp.cos(math.pi / 2 * (1.0 - t))

  def base_dalpha(self, t):
    return -math.pi / 2 * jnp.sin(math.pi / 2 * (1.0 - t))

  def base_inverse(self, a):
    return 1.0 - jnp.arccos(1.0 - a) / (math.pi / 2)


@dataclasses.dataclass(frozen=True)
class PolySchedule(Schedule):
  """α₀(t) = 1 − t^K. For K < 1 the weight K·t^(K−1)/(1 − α) diverges at t = 0
  (integrably): the loss draws t in (0, 1], never 0 (losses.sample_times).

  Attributes:
    power: K > 0.
  """

  power: float = 1.0

  @property
  def name(self) -> str:
    return f"poly{self.power:g}"

  def base_alpha(self, t):
    return 1.0 - t**self.power

  def base_dalpha(self, t):
    return -self.power * t ** (self.power - 1.0)

  def base_inverse(self, a):
    return (1.0 - a) ** (1.0 / self.power)


_FIXED = {"linear": LinearSchedule, "cosine": CosineSchedule}
_POLY = re.compile(r"^poly(\d+(?:\.\d*)?|\.\d+)$")
VALID_FORMS = "'linear', 'cosine', or 'polyK' with K a positive number (e.g. 'poly3', 'poly0.5')"


def get_schedule(name: str) -> Schedule:
  """Parses a schedule name; raises ValueError listing the valid forms."""
  if name in _FIXED:
    return _FIXED[name]()
  match = _POLY.match(name)
  if match:
    power = float(match.group(1))
    if power > 0:
      return PolySchedule(power=power)
  raise ValueError(f"Unknown noise schedule {name!r}; valid: {VALID_FORMS}.")
