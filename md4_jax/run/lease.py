"""One run per workdir: a lease that a training run holds on its workdir while it lives.

The lease is `<workdir>/lease.json`: who holds it (host, pid, start time, a run
id, the number of processes) and a heartbeat that the holder refreshes every
`heartbeat_seconds`. A second start on the same workdir is refused with
`WorkdirInUseError` (one line, exit 2) before it touches anything:

  md4_jax: error: workdir /runs/a is in use by host-3:41805 since 2026-12-05 04:10:11 UTC
  (heartbeat 12 s ago); ...

A lease is stale, and is taken over with a warning, when its heartbeat is older
than `stale_seconds`, or when its holder ran on this host and its pid is gone
(a killed run). The processes of one multi-host run share one lease: process 0
takes it and tells the others (`acquire_for_run`); every process gets the same
answer.

The lease is kept in a `LeaseStore`, which offers the two atomic operations
the protocol needs: create-if-absent, and replace/delete only if the file is
still the version that was read (compare-and-swap). `LocalStore` implements
them for a local or shared POSIX filesystem (creation by link(), which is
atomic and fails on an existing name; the swap under an flock); an object store implements them with generation preconditions
(GCS: `if_generation_match`), behind the same interface.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional, Protocol

from absl import logging

LEASE_FILE = "lease.json"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # Ten missed heartbeats.


class WorkdirInUseError(ValueError):
  """Another live run holds the workdir (a ValueError: the CLIs report it in one line, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lease, and when it last said it was alive (seconds since the epoch)."""

  host: str
  pid: int
  started: float
  heartbeat: float
  run_id: str
  process_count: int = 1

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str) -> "Holder":
    fields = json.loads(text)
    return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})

  def describe(self, now: float) -> str:
    started = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
    return (f"{self.host}:{self.pid} since {started:%Y-%m-%d %H:%M:%S} UTC (heartbeat "
            f"{max(0.0, now - self.heartbeat):.0f} s ago)")


class LeaseStore(Protocol):
  """Where a lease lives. `version` is an opaque token of the file as read."""

  def create(self, text: str) -> bool:
    """Writes `text` if no lease exists; False if one does."""

  def read(self) -> tuple[Optional[str], object]:
    """(text, version), or (None, None) if there is no lease."""

  def replace(self, version: object, text: str) -> bool:
    """Writes `text` if the lease is still `version`; False otherwise."""

  def delete(self, version: object) -> bool:
    """Removes the lease if it is still `version`; False otherwise."""


class LocalStore:
  """A lease file on a POSIX filesystem: creation by link(), compare-and-swap under flock."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LEASE_FILE)
    self._lock_path = os.path.join(workdir, ".lease.lock")

  @contextlib.contextmanager
  def _locked(self):
    fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)  # Releases the flock.

  def _version(self):
    st = os.stat(self.path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)

  def _written(self, text: str) -> str:
    """A temporary file beside the lease holding `text`, flushed to disk."""
    tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    return tmp

  def create(self, text: str) -> bool:
    # link() creates the name atomically, complete, and only if it does not exist.
    tmp = self._written(text)
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.unlink(tmp)

  def read(self):
    try:
      with self._locked():
        with open(self.path) as f:
          return f.read(), self._version()
    except FileNotFoundError:
      return None, None

  def replace(self, version, text: str) -> bool:
    with self._locked():
      try:
        if self._version() != version:
          return False
      except FileNotFoundError:
        return False
      os.replace(self._written(text), self.path)
      return True

  def delete(self, version) -> bool:
    with self._locked():
      try:
        if self._version() != version:
          return False
        os.unlink(self.path)
        return True
      except FileNotFoundError:
        return False


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  return True


def stale_reason(holder: Holder, now: float, stale_seconds: float,
                 host: Optional[str] = None) -> Optional[str]:
  """Why `holder` no longer holds its lease, or None while it does."""
  host = host or socket.gethostname()
  if holder.host == host and not _pid_alive(holder.pid):
    return f"its process {holder.pid} on this host is gone"
  if now - holder.heartbeat > stale_seconds:
    return f"no heartbeat for {now - holder.heartbeat:.0f} s (> {stale_seconds:.0f} s)"
  return None


class Lease:
  """The lease of one run on one workdir: `acquire`, a heartbeat thread, `release`.

  Args:
    store: where the lease lives (`LocalStore(workdir)`).
    where: the workdir, for messages.
    process_count: processes of the run that share this lease.
    heartbeat_seconds / stale_seconds: see the module docstring.
    clock: seconds since the epoch (injected by tests).
  """

  def __init__(self, store: LeaseStore, where: str, process_count: int = 1,
               heartbeat_seconds: float = HEARTBEAT_SECONDS,
               stale_seconds: float = STALE_SECONDS,
               clock: Callable[[], float] = time.time):
    self._store, self._where = store, where
    self._heartbeat_seconds, self._stale_seconds, self._clock = (
        heartbeat_seconds, stale_seconds, clock)
    now = clock()
    self.holder = Holder(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                         run_id=uuid.uuid4().hex, process_count=process_count)
    self._version = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.lost = False

  def acquire(self) -> None:
    """Takes the lease (or a stale one over); WorkdirInUseError if a live run holds it."""
    for _ in range(10):  # Retries only when the lease changed between two reads.
      if self._store.create(self.holder.to_json()):
        self._version = self._store.read()[1]
        return self._start()
      text, version = self._store.read()
      if text is None:
        continue  # Released in between.
      try:
        other = Holder.from_json(text)
      except (ValueError, TypeError, KeyError):
        other, reason = None, "it is unreadable"
      else:
        reason = stale_reason(other, self._clock(), self._stale_seconds)
      if reason is None:
        raise WorkdirInUseError(
            f"workdir {self._where} is in use by {other.describe(self._clock())}: one run per "
            "workdir. Wait for it to finish, stop it, or use another --workdir (a lease whose "
            f"holder died is taken over after {self._stale_seconds:.0f} s, at once on the same "
            "host).")
      if self._store.replace(version, self.holder.to_json()):
        logging.warning("Taking over the lease of %s: %s.", self._where,
                        f"{other.host}:{other.pid}'s {reason}" if other else reason)
        self._version = self._store.read()[1]
        return self._start()
    raise WorkdirInUseError(f"workdir {self._where}: the lease keeps changing; another run is "
                            "starting on it.")

  def _start(self) -> None:
    self._thread = threading.Thread(target=self._beat, name="md4_jax-lease", daemon=True)
    self._thread.start()

  def beat(self) -> bool:
    """Refreshes the heartbeat; False (and `lost`) if another run has taken the lease."""
    text, version = self._store.read()
    if text is None or Holder.from_json(text).run_id != self.holder.run_id:
      if not self.lost:
        logging.error("Lost the lease of %s to another run; this run stops writing there.",
                      self._where)
      self.lost = True
      return False
    self.holder = dataclasses.replace(self.holder, heartbeat=self._clock())
    if self._store.replace(version, self.holder.to_json()):
      self._version = self._store.read()[1]
    return True

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_seconds):
      try:
        self.beat()
      except OSError as e:  # A transient filesystem error: try again next time.
        logging.warning("Lease heartbeat of %s failed: %s", self._where, e)

  def check(self) -> None:
    """Raises WorkdirInUseError if the lease was lost (call before writing checkpoints)."""
    if self.lost or not self.beat():
      raise WorkdirInUseError(f"workdir {self._where} was taken over by another run; stopped "
                              "without writing to it.")

  def release(self) -> None:
    """Stops the heartbeat and removes the lease if it is still this run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    text, version = self._store.read()
    if text is not None and Holder.from_json(text).run_id == self.holder.run_id:
      self._store.delete(version)


def acquire_for_run(workdir: str, process_index: int, process_count: int,
                    broadcast: Callable[[int], int], **kwargs) -> Optional[Lease]:
  """Process 0 takes the workdir's lease for the whole run; every process learns the outcome.

  Args:
    workdir: a local (or shared POSIX) directory; created if missing.
    process_index / process_count: this process and the run's process count.
    broadcast: process 0's int to every process (identity for one process).
    **kwargs: for `Lease`.

  Returns:
    The lease on process 0, None on the others.

  Raises:
    WorkdirInUseError: on every process, if the workdir is held by another run.
  """
  lease, error = None, ""
  if process_index == 0:
    os.makedirs(workdir, exist_ok=True)
    lease = Lease(LocalStore(workdir), workdir, process_count=process_count, **kwargs)
    try:
      lease.acquire()
    except WorkdirInUseError as e:
      error = str(e)
  if broadcast(1 if error else 0):
    raise WorkdirInUseError(error or f"workdir {workdir} is in use by another run (see process "
                            "0's log).")
  return lease
