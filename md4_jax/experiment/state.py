"""The training state: one pytree that is jitted, sharded and checkpointed."""

from typing import Any

import flax.struct
import jax


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs besides the data iterator.

  Attributes:
    step: int32 scalar, optimisation steps taken.
    params: network parameters.
    ema_params: exponential moving average of params (used for eval/sampling).
    opt_state: optax state.
    rng: uint32 raw key data of the run's base key; step keys are
      fold_in(base, step), so resuming reproduces the same random streams.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array

  def step_key(self) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
