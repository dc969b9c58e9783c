"""Noticing preemption: SIGTERM (single process) or JAX's preemption sync point.

On a multi-process run started with `jax.distributed.initialize()`, JAX's
coordination service listens for the preemption notice (SIGTERM on TPU VMs and
SLURM) and `reached_preemption_sync_point(step)` turns True on every process at
the same step. A single process handles SIGTERM itself.
"""

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


def _distributed_client_ready() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None


class PreemptionWatcher:
  """`reached(step)` is True once the run should checkpoint and stop."""

  def __init__(self):
    self._multi = jax.process_count() > 1 and _distributed_client_ready()
    self._event = threading.Event()
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("Received signal %d: will checkpoint and stop after this step.", signum)
    self._event.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
