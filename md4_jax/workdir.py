"""Reading a run back from its workdir: the saved config and the latest state.

Used by the sampling and evaluation CLIs and by notebooks:

  config, experiment, state = workdir.restore_run("/tmp/md4_digits")
  experiment.model, state.ema_params, experiment.sampler(steps=64), ...
"""

from typing import Optional

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from md4_jax import checkpoint as checkpoint_lib
from md4_jax import parallel
from md4_jax import run_config
from md4_jax.train import build
from md4_jax.train import state as state_lib

load_config = run_config.load_config


def checkpoint_step(workdir: str, step: Optional[int] = None) -> int:
  """The latest checkpointed step, or `step` after checking that it was saved.

  Raises:
    FileNotFoundError: No checkpoint in the workdir.
    ValueError: `step` was not saved.
  """
  directory = checkpoint_lib.checkpoint_dir(workdir)
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  steps = sorted(ckpt.all_steps())
  ckpt.close()
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {directory!r}: train first (python -m "
                            f"md4_jax.main --config=... --workdir={workdir}) or check --workdir.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise ValueError(f"No checkpoint at step {step} in {directory!r}; saved steps: "
                     f"{', '.join(map(str, steps))}.")
  return step


def run_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The run's mesh if it fits the devices here, else all devices on 'data'."""
  try:
    return parallel.make_mesh(config.mesh)
  except ValueError as e:
    logging.warning("The run's mesh %s does not fit here (%s); using all %d devices on the data "
                    "axis.", config.mesh.to_dict(), e, jax.device_count())
    return parallel.make_mesh({"data": -1})


def restore_run(
    workdir: str, step: Optional[int] = None, mesh: Optional[Mesh] = None,
) -> tuple[ml_collections.ConfigDict, build.Experiment, state_lib.TrainState]:
  """Config, experiment (`build.setup`) and TrainState of the latest (or `step`) checkpoint.

  The state is restored onto `mesh` (default: the run's mesh if it fits the
  devices here, else all devices on the data axis), whatever mesh it was
  saved from.
  """
  config = load_config(workdir)
  step = checkpoint_step(workdir, step)
  experiment = build.setup(config, mesh or run_mesh(config))
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir), read_only=True)
  state = experiment.restore(ckpt, step=step)
  ckpt.close()
  return config, experiment, state
