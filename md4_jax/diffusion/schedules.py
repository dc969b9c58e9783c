"""Masking schedules α(t): the probability that a token is still unmasked at t.

Base forms α₀(t) (linear 1−t, cosine 1−cos(π/2·(1−t)), polyK 1−t^K) are squeezed
into [eps, 1−eps] so that α(0) ≈ 1 and α(1) ≈ 0 without touching either:

  α(t) = (1 − 2·eps)·α₀(t) + eps,     α'(t) = (1 − 2·eps)·α₀'(t).

The loss weight is w(t) = −α'(t) / (1 − α(t)) ≥ 0 and the log-SNR is
γ(t) = log(α / (1 − α)). `get_schedule(name)` parses a name into a `Schedule`.
"""

import dataclasses
import math
import re
from typing import Callable

import jax.numpy as jnp

EPS = 1e-4

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A masking schedule. All methods are elementwise and jit-friendly.

  Attributes:
    name: the parsed name, e.g. 'cosine' or 'poly3'.
    base_alpha: α₀(t), decreasing from 1 to 0 on [0, 1].
    base_dalpha: dα₀/dt.
    base_inverse: t such that α₀(t) = a, for a in [0, 1].
    eps: the squeeze margin.
  """

  name: str
  base_alpha: Callable[[Array], Array]
  base_dalpha: Callable[[Array], Array]
  base_inverse: Callable[[Array], Array]
  eps: float = EPS

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


def _linear() -> Schedule:
  return Schedule(
      name="linear",
      base_alpha=lambda t: 1.0 - t,
      base_dalpha=lambda t: -jnp.ones_like(t),
      base_inverse=lambda a: 1.0 - a,
  )


def _cosine() -> Schedule:
  half_pi = math.pi / 2
  return Schedule(
      name="cosine",
      base_alpha=lambda t: 1.0 - jnp.cos(half_pi * (1.0 - t)),
      base_dalpha=lambda t: -half_pi * jnp.sin(half_pi * (1.0 - t)),
      base_inverse=lambda a: 1.0 - jnp.arccos(1.0 - a) / half_pi,
  )


def _poly(power: float, name: str) -> Schedule:
  return Schedule(
      name=name,
      base_alpha=lambda t: 1.0 - t**power,
      base_dalpha=lambda t: -power * t ** (power - 1.0),
      base_inverse=lambda a: (1.0 - a) ** (1.0 / power),
  )


_FIXED = {"linear": _linear, "cosine": _cosine}
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
      return _poly(power, name)
  raise ValueError(f"Unknown noise schedule {name!r}; valid: {VALID_FORMS}.")
