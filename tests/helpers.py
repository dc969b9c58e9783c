"""Shared test fixtures: toy networks, the tiny digits config, running the CLIs.

Toy networks follow the networks' contract `(z, t, cond=None, train=False) ->
logits [B, *data_shape, V]` and are small enough to reason about exactly.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import digits
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import schedules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIGITS = "--config=configs/digits.py:tiny"


def digits_tiny(variant: str = "tiny", **overrides):
  """configs/digits.py:tiny (or 'tiny_cond') with top-level overrides."""
  config = digits.get_config(variant)
  config.update(overrides)
  return config


def run_module(module: str, *args, devices: int = 1, timeout: int = 600,
               **popen_kwargs) -> subprocess.CompletedProcess:
  """`python -m module args` in the repository with `devices` forced CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **popen_kwargs)


def md4(network: nn.Module, schedule: str, vocab_size: int, data_shape, **kwargs):
  """An MD4 model around a toy network."""
  return model_lib.MD4(network, schedules.get_schedule(schedule), vocab_size, tuple(data_shape),
                       **kwargs)


class FixedLogits(nn.Module):
  """Ignores z and t: logits [L, V] are a parameter, the same for every example."""

  num_positions: int
  vocab_size: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, cond, train
    logits = self.param("logits", nn.initializers.zeros, (self.num_positions, self.vocab_size))
    return jnp.broadcast_to(logits, z.shape + (self.vocab_size,))


def fixed_logits_model(logits_LxV, schedule: str = "linear", **kwargs):
  """(MD4 around FixedLogits, its variables holding `logits_LxV`): an input-ignoring model."""
  num_positions, vocab = logits_LxV.shape
  model = md4(FixedLogits(num_positions, vocab), schedule, vocab, (num_positions,), **kwargs)
  return model, {"params": {"network": {"logits": jnp.asarray(logits_LxV, jnp.float32)}}}


class CopyLeft(nn.Module):
  """Time-independent, uses z: prefers the visible left neighbour's token.

  With `time_weight` > 0 the logits also tilt with t (a time-dependent network).
  """

  vocab_size: int
  time_weight: float = 0.0

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del cond, train
    scale = self.param("scale", nn.initializers.constant(3.0), ())
    left = jnp.roll(z, 1, axis=-1)
    visible = left < self.vocab_size
    bonus = scale * jax.nn.one_hot(jnp.where(visible, left, 0), self.vocab_size)
    logits = jnp.where(visible[..., None], bonus, 0.0)
    tilt = (self.time_weight * t[:, None, None]
            * jnp.arange(self.vocab_size, dtype=jnp.float32)[None, None])
    return logits + tilt
