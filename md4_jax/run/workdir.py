"""Reading a run back from its workdir: the saved config and the latest state.

Used by the sampling and evaluation CLIs and by notebooks:

  config, experiment, state = workdir.restore_run("/tmp/md4_digits")
  experiment.model, state.ema_params, experiment.sampler(steps=64), ...
"""

from typing import Optional

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from md4_jax import paths
from md4_jax.run import checkpoint as checkpoint_lib
from md4_jax.experiment import parallel
from md4_jax.run import saved_config
from md4_jax.experiment import build
from md4_jax.experiment import state as state_lib


def check_reachable(path: str, flag: str = "--workdir") -> None:
  """Raises OSError (one line) if a remote path (gs://...) cannot be read: no network, no
  credentials, no such bucket; ValueError if no installed client serves its scheme (the
  message names the extra to install). Local paths pass; nothing is created."""
  paths.check_reachable(path, flag)


def stored_config(workdir: str) -> Optional[ml_collections.ConfigDict]:
  """The config the run in `workdir` was started with, or None if there is no run.

  The newest checkpoint that stores one is the truth; config.json (its readable
  copy) counts only for a run without checkpoints.
  """
  check_reachable(workdir)
  directory = checkpoint_lib.checkpoint_dir(workdir)
  if epath.Path(directory).is_dir():
    ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
    stored = ckpt.saved_config()
    ckpt.close()
    if stored is not None:
      return saved_config.config_from_dict(stored)
  if (epath.Path(workdir) / saved_config.CONFIG_FILE).exists():
    return saved_config.load_config(workdir)
  return None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """`stored_config`, or FileNotFoundError for a directory that holds no run."""
  config = stored_config(workdir)
  if config is None:
    return saved_config.load_config(workdir)  # Raises the not-a-workdir error.
  return config


def checkpoint_steps(workdir: str) -> list[int]:
  """The saved steps of the run in `workdir`, oldest first ([] if none)."""
  directory = checkpoint_lib.checkpoint_dir(workdir)
  if not epath.Path(directory).is_dir():
    return []
  ckpt = checkpoint_lib.Checkpointer(directory, read_only=True)
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


def checkpoint_step(workdir: str, step: Optional[int] = None) -> int:
  """The latest checkpointed step, or `step` after checking that it was saved.

  Raises:
    FileNotFoundError: No checkpoint in the workdir.
    ValueError: `step` was not saved.
  """
  directory = checkpoint_lib.checkpoint_dir(workdir)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"No checkpoint under {directory!r}: train first (python -m "
                            f"md4_jax.train --config=... --workdir={workdir}) or check --workdir.")
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
  """Config, experiment (`build.setup`) and TrainState of a verified checkpoint.

  The state is restored onto `mesh` (default: the run's mesh if it fits the
  devices here, else all devices on the data axis), whatever mesh it was
  saved from. Without `step`, the newest checkpoint that verifies (a corrupt
  newer one is reported and skipped); with `step`, exactly that one.

  Raises:
    FileNotFoundError: no run or no checkpoint.
    ValueError: `step` was not saved; checkpoint.CorruptCheckpointError.
  """
  config = load_config(workdir)
  if step is not None:
    step = checkpoint_step(workdir, step)
  else:
    checkpoint_step(workdir)  # A clear error when there is no checkpoint at all.
  experiment = build.setup(config, mesh or run_mesh(config))
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir), read_only=True)
  try:
    state = experiment.restore(ckpt, step=step)
  finally:
    ckpt.close()
  return config, experiment, state
