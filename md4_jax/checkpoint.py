"""Orbax checkpoints of the train state and the grain data iterator together.

Layout: <workdir>/checkpoints/<step>/{state, data_iter}. Orbax writes each step
to a temporary directory and renames it on commit, so an interrupted save is
never picked up as the latest checkpoint.
"""

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
DATA_ITER = "data_iter"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `tree`, for restoring."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class Checkpointer:
  """Saves and restores (TrainState, data iterator) pairs in a directory."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory, options=options, item_names=(STATE, DATA_ITER))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None) -> None:
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()
    logging.info("Saved checkpoint at step %d in %s", step, self.directory)

  def restore(self, state_like: Any, data_iter: Any = None, step: Optional[int] = None) -> Any:
    """Restores into the structure/shardings of `state_like` (arrays or abstract).

    The data iterator, when given and saved, is restored in place.

    Returns:
      The restored state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    abstract = jax.tree.map(
        lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else abstract_like(a), state_like)
    items = {STATE: ocp.args.StandardRestore(abstract)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint at step %d from %s", step, self.directory)
    return restored[STATE]

  def close(self) -> None:
    self._manager.close()
