"""Orbax checkpoints that cannot lie: state, data iterator, config and checksums together.

Layout: <workdir>/checkpoints/<step>/{state, data_iter, config, digest}. Orbax
writes each step to a temporary directory and renames it on commit, so an
interrupted save is never picked up as the latest checkpoint.

Integrity. Every save stores a digest of every array of the state (two 32-bit
position-weighted sums of its bits, computed on the devices in one jitted pass:
order-independent, so the same on any mesh or process count). A restore
recomputes them from what it read and compares; a checkpoint that fails, cannot
be read, or has unreadable metadata raises `CorruptCheckpointError` naming the
step, its directory and the first array or the error. `restore_latest_good`
falls back to the newest checkpoint that verifies and moves the bad ones aside
to <workdir>/checkpoints_corrupt/ (never deleting them).

Identity. The run's config is stored in every checkpoint, so `config.json` is
only a readable copy: deleting or editing it cannot make a run resume under a
different model, data or optimisation.
"""

import os
import time
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from md4_jax import paths

STATE = "state"
DATA_ITER = "data_iter"
CONFIG = "config"
DIGEST = "digest"
CORRUPT_DIR = "checkpoints_corrupt"


class CorruptCheckpointError(ValueError):
  """A checkpoint failed verification or could not be read (a bad input: CLI exit 2)."""

  def __init__(self, step: int, path: str, what: str):
    super().__init__(f"Checkpoint step {step} ({path}) {what}.")
    self.step = step
    self.path = path


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `tree`, for restoring."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _leaf_digest(a: jax.Array) -> jax.Array:
  """uint32 [2]: Σ w_i and Σ (2i + 1)·w_i (mod 2^32) over the array's bits w_i."""
  a = jnp.asarray(a)
  if a.dtype == jnp.bool_:
    a = a.astype(jnp.uint8)
  bits = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[a.dtype.itemsize]
  w = jax.lax.bitcast_convert_type(a, bits).astype(jnp.uint32).reshape(-1)
  odd = 2 * jnp.arange(w.size, dtype=jnp.uint32) + 1
  return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * odd, dtype=jnp.uint32)])


_digests = jax.jit(lambda tree: jax.tree.map(_leaf_digest, tree))


def digest(tree: Any) -> dict[str, list[int]]:
  """{array path: [sum, weighted sum]} of every array in `tree` (global, any sharding)."""
  values = jax.tree_util.tree_flatten_with_path(_digests(tree))[0]
  host = multihost_utils.process_allgather([v for _, v in values], tiled=True)
  return {jax.tree_util.keystr(path): [int(x) for x in np.asarray(h)]
          for (path, _), h in zip(values, host)}


class CheckpointMismatchError(ValueError):
  """A readable checkpoint holds a differently shaped state than the code and config build
  (another network, size or md4_jax version): not corrupt, never moved aside (CLI exit 2)."""

  def __init__(self, step: int, path: str, what: str):
    super().__init__(f"Checkpoint step {step} ({path}) {what}.")
    self.step = step
    self.path = path


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def array_shapes(tree: Any) -> dict[str, tuple]:
  """{'a/b/c': shape} of every array-like leaf, whatever container types hold them
  (a TrainState dataclass and orbax's dict metadata of it give the same keys)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def structure_difference(saved: dict[str, tuple], expected: dict[str, tuple]) -> Optional[str]:
  """A one-line description of how two `array_shapes` maps differ (None if equal)."""
  only_saved = sorted(set(saved) - set(expected))
  only_expected = sorted(set(expected) - set(saved))
  reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  parts = []
  if reshaped:
    k = reshaped[0]
    parts.append(f"{len(reshaped)} arrays have other shapes (first: {k} is {saved[k]} in the "
                 f"checkpoint, {expected[k]} in the model)")
  if only_saved:
    parts.append(f"{len(only_saved)} arrays exist only in the checkpoint (first: {only_saved[0]})")
  if only_expected:
    parts.append(f"{len(only_expected)} only in the model (first: {only_expected[0]})")
  return "; ".join(parts) or None


class Checkpointer:
  """Saves and restores (TrainState, data iterator, config) with checksums in a directory."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3, read_only: bool = False,
               async_save: bool = False):
    """`async_save`: `save` returns once the state is copied off the devices and orbax
    writes it in a background thread (one save in flight; the next save, `wait` and
    `close` wait for it). A step becomes a checkpoint (listed, restorable) only when
    orbax has finalised it, complete with its digest."""
    self._options = dict(max_to_keep=max_to_keep, read_only=read_only,
                         async_save=async_save and not read_only)
    self.directory = directory
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    read_only = self._options["read_only"]
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else self._options["max_to_keep"], create=not read_only,
        read_only=read_only, enable_async_checkpointing=self._options["async_save"],
        cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_names=(STATE, DATA_ITER, CONFIG, DIGEST))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, data_iter: Any = None, config: Any = None) -> None:
    """Saves `state` with its digest (and the data iterator and the config's dict).

    Raises:
      OSError: the save failed (e.g. disk full); the previous checkpoints are intact.
    """
    checksums = digest(state)
    if self._options["async_save"] and jax.devices()[0].platform == "cpu":
      # On CPU orbax's copy off the devices is a view of the same memory, which the next
      # (donating) train step may reuse while the background write still reads it: orbax
      # gets a private copy. On accelerators orbax copies to host memory itself.
      state = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)
    items = {STATE: ocp.args.StandardSave(state), DIGEST: ocp.args.JsonSave(checksums)}
    if data_iter is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items[CONFIG] = ocp.args.JsonSave(config)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      if not self._options["async_save"]:
        self._manager.wait_until_finished()
    except OSError as e:
      raise OSError(e.errno, f"Saving checkpoint step {step} in {self.directory} failed "
                             f"({e.strerror or e}); the previous checkpoints are intact") from None
    logging.info("%s checkpoint at step %d in %s",
                 "Saving (async)" if self._options["async_save"] else "Saved", step,
                 self.directory)

  def wait(self) -> None:
    """Returns when no save is in flight (at once for synchronous saves).

    Raises:
      OSError: a background save failed; the previous checkpoints are intact.
    """
    try:
      self._manager.wait_until_finished()
    except OSError as e:
      raise OSError(e.errno, f"Saving a checkpoint in {self.directory} failed "
                             f"({e.strerror or e}); the previous checkpoints are intact") from None

  def _has(self, step: int, item: str) -> bool:
    return paths.exists(paths.join(self.step_path(step), item))

  def restore(self, state_like: Any, data_iter: Any = None, step: Optional[int] = None) -> Any:
    """Restores into the structure/shardings of `state_like` (arrays or abstract) and verifies.

    The data iterator, when given and saved, is restored in place.

    Raises:
      FileNotFoundError: no checkpoint at all.
      CorruptCheckpointError: the checkpoint cannot be read or fails its checksums.
      CheckpointMismatchError: it is readable but holds another state structure (arrays
        missing, extra or of other shapes than `state_like`).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    path = self.step_path(step)
    abstract = jax.tree.map(
        lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else abstract_like(a), state_like)
    self.check_structure(step, abstract)
    items = {STATE: ocp.args.StandardRestore(abstract)}
    verify = self._has(step, DIGEST)
    if verify:
      items[DIGEST] = ocp.args.JsonRestore()
    if data_iter is not None and self._has(step, DATA_ITER):
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      message = " ".join(str(e).split())[:300]
      raise CorruptCheckpointError(step, path, f"cannot be read ({type(e).__name__}: "
                                               f"{message})") from None
    state = restored[STATE]
    if verify:
      expected, actual = restored[DIGEST], digest(state)
      bad = [k for k in actual if expected.get(k) != actual[k]]
      if bad or set(expected) != set(actual):
        first = bad[0] if bad else sorted(set(expected) ^ set(actual))[0]
        raise CorruptCheckpointError(
            step, path, f"fails verification: {len(bad) or 'the set of'} arrays differ from "
                        f"their saved checksums (first: state{first} under {path}/{STATE})")
    else:
      logging.warning("Checkpoint step %d (%s) has no checksums (written by an older md4_jax); "
                      "restored unverified.", step, path)
    logging.info("Restored checkpoint at step %d from %s", step, self.directory)
    return state

  def saved_shapes(self, step: int) -> Optional[dict[str, tuple]]:
    """`array_shapes` of the state saved at `step` from its metadata (None if unreadable:
    the restore then reports the checkpoint as corrupt)."""
    try:
      metadata = self._manager.item_metadata(step)[STATE]
    except Exception:  # pylint: disable=broad-except
      return None
    tree = getattr(metadata, "tree", metadata)
    if not tree:
      return None
    return array_shapes(tree)

  def check_structure(self, step: int, state_like: Any) -> None:
    """Raises CheckpointMismatchError if step's saved arrays differ from `state_like`'s."""
    saved = self.saved_shapes(step)
    if saved is None:
      return
    what = structure_difference(saved, array_shapes(state_like))
    if what:
      raise CheckpointMismatchError(
          step, self.step_path(step),
          f"holds a different state than this code and config build: {what}. It was written "
          "by another network, size or md4_jax version; it is not corrupt and was left in place")

  def restore_latest_good(self, state_like: Any, data_iter: Any = None) -> Any:
    """The newest checkpoint that verifies; bad ones are logged and moved aside (left in
    place by a read-only Checkpointer, e.g. sampling or evaluation).

    Raises:
      FileNotFoundError: no checkpoint at all.
      CorruptCheckpointError: none of the checkpoints verifies (all moved aside).
    """
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    for step in reversed(steps):
      try:
        state, error = self.restore(state_like, data_iter, step), None
      except CorruptCheckpointError as e:
        state, error = None, e
      if not _all_processes_agree(error is None):
        error = error or CorruptCheckpointError(step, self.step_path(step),
                                                "failed verification on another process")
      if error is None:
        return state
      where = ("left in place (read-only)" if self._options["read_only"] else
               f"moved aside to {self.set_aside(step)}")
      logging.error("%s It was %s; falling back to the previous checkpoint.", error, where)
      print(f"md4_jax: warning: {error} It was {where}; falling back to the previous "
            "checkpoint.", flush=True)
    raise CorruptCheckpointError(steps[0], self.directory,
                                 f"is the oldest of {len(steps)} checkpoints and none of them "
                                 "verifies")

  def _aside_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory.rstrip("/")), CORRUPT_DIR)

  def set_aside(self, step: int) -> str:
    """Moves the step's directory into checkpoints_corrupt/ (process 0) and reloads."""
    target = os.path.join(self._aside_dir(), f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      paths.move_tree(self.step_path(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"md4_jax_set_aside_{step}")
    self._manager.close()
    self._manager = self._open()
    return target

  def saved_config(self) -> Optional[dict]:
    """The config stored in the newest checkpoint that has a readable one (None if none)."""
    for step in reversed(self.all_steps()):
      if not self._has(step, CONFIG):
        continue
      try:
        return self._manager.restore(step, args=ocp.args.Composite(
            **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]
      except Exception:  # pylint: disable=broad-except
        logging.warning("Checkpoint step %d: its stored config cannot be read.", step)
    return None

  def close(self) -> None:
    """Waits for a save in flight, then closes."""
    self.wait()
    self._manager.close()


def _all_processes_agree(ok: bool) -> bool:
  """True iff `ok` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
