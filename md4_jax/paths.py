"""One path layer: every file md4_jax reads or writes, on a local disk or on gs://.

  paths.write_bytes(paths.join(workdir, "samples", "x.png"), data)   # local or gs://
  paths.glob(data_dir, "train-*-of-*.array_record")                 # a sorted list of str
  local = paths.local_copy("gs://bucket/data/text8/text8", "text8")  # once, into the cache

Built on etils.epath, which orbax (checkpoints) already uses, so one client serves the
checkpoints and every other file. gs:// goes through epath's fsspec backend (gcsfs), not
TensorFlow's gfile: gcsfs and the google-cloud-storage client orbax lists steps with both
follow $STORAGE_EMULATOR_HOST, so a local emulator serves them in tests, while gfile's fixed
endpoints cannot be redirected. The clients come with the `gcs` extra: pip install -e ".[gcs]".

Libraries that write files themselves go through here too: TensorBoard events and profiler
traces of a gs:// workdir are written to a local mirror and uploaded (`Mirror`); data that
must be local to be fast (text8's memory map, archives to unpack) is copied once into a local
cache (`local_copy`, $MD4_JAX_CACHE, default ~/.cache/md4_jax).
"""

import builtins
import glob as globlib
import os
import sys
import time
from typing import Optional, Union

# Before any gs:// path is touched (epath reads it once): gcsfs rather than TensorFlow's gfile.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402
import fsspec.config  # noqa: E402

# gcsfs's listing cache would hide what orbax, another worker or another client instance
# wrote or moved since (a checkpoint moved aside would still be listed): off.
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

PathLike = Union[str, os.PathLike]
EXTRA = 'pip install -e ".[gcs]"'
# Scheme -> the modules that must import for it (epath's fsspec backend and orbax's lister).
_CLIENTS = {"gs": ("gcsfs", "google.cloud.storage")}
_COPY_CHUNK = 8 << 20


def scheme(path: PathLike) -> Optional[str]:
  """'gs' for gs://bucket/..., None for a local path."""
  text = os.fspath(path)
  return text.split("://", 1)[0].lower() if "://" in text else None


def is_remote(path: PathLike) -> bool:
  return scheme(path) is not None


def _missing(modules) -> list[str]:
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = []
  for name in modules:
    try:
      found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
      found = False
    if not found:
      missing.append(name)
  return missing


def check_served(path: PathLike, flag: str = "path") -> None:
  """Raises ValueError (one line, naming what to install) if no installed client serves
  `path`'s scheme. Local paths pass. Nothing is created."""
  kind = scheme(path)
  if kind is None:
    return
  if kind not in _CLIENTS:
    raise ValueError(f"{flag}={os.fspath(path)}: md4_jax reads and writes local paths and "
                     f"gs:// only, not {kind}://.")
  missing = _missing(_CLIENTS[kind])
  if missing:
    raise ValueError(f"{flag}={os.fspath(path)}: {kind}:// paths need the Cloud Storage "
                     f"clients ({', '.join(missing)} missing): {EXTRA}")


def bucket_of(path: PathLike) -> str:
  return os.fspath(path).split("://", 1)[1].split("/", 1)[0]


def check_reachable(path: PathLike, flag: str = "path") -> None:
  """Raises OSError (one line) if a gs:// path's bucket cannot be reached: no network, no
  credentials, no such bucket, no permission; ValueError if no client serves its scheme
  (`check_served`). Local paths pass. Nothing is created."""
  check_served(path, flag)
  if not is_remote(path):
    return
  bucket = bucket_of(path)
  try:
    # One request, no retries (gcsfs would back off for half a minute on a network that is
    # down): missing credentials, no network, no such bucket or no permission raise here,
    # where epath's exists() would say False.
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    storage.Client().get_bucket(bucket, timeout=30, retry=None)
  except Exception as e:  # pylint: disable=broad-except  (each client has its own errors)
    reason = " ".join(str(e).split())[:300] or type(e).__name__  # The client's, on one line.
    raise OSError(f"{flag}={os.fspath(path)} cannot be reached: bucket {bucket!r}: "
                  f"{reason}; check the network, the bucket name and the "
                  "credentials (gcloud auth application-default login).") from None


def path(p: PathLike) -> epath.Path:
  """An epath.Path (~ expanded for local paths)."""
  text = os.fspath(p)
  return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def join(*parts: PathLike) -> str:
  return os.path.join(*(os.fspath(p) for p in parts))


def basename(p: PathLike) -> str:
  return os.path.basename(os.fspath(p).rstrip("/"))


def dirname(p: PathLike) -> str:
  return os.path.dirname(os.fspath(p).rstrip("/"))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  return sorted(c.name for c in path(p).iterdir())


def glob(directory: PathLike, pattern: str) -> list[str]:
  """Sorted paths (as str, with their scheme) in `directory` matching `pattern` (no '**')."""
  if not is_remote(directory):
    return sorted(globlib.glob(os.path.join(globlib.escape(os.path.expanduser(
        os.fspath(directory))), pattern)))
  return sorted(os.fspath(p) for p in path(directory).glob(pattern))


def open(p: PathLike, mode: str = "r"):  # pylint: disable=redefined-builtin
  """A file object; the parent folder is created for writing."""
  if "w" in mode or "a" in mode:
    makedirs(dirname(p) or ".")
  return path(p).open(mode)


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def write_text(p: PathLike, text: str) -> str:
  with open(p, "w") as f:
    f.write(text)
  return os.fspath(p)


def write_bytes(p: PathLike, data: bytes) -> str:
  with open(p, "wb") as f:
    f.write(data)
  return os.fspath(p)


def remove(p: PathLike) -> None:
  path(p).unlink()


def replace(src: PathLike, dst: PathLike) -> None:
  """Renames `src` to `dst`, replacing it (atomic on a local disk; copy + delete on gs://)."""
  if not is_remote(src) and not is_remote(dst):
    os.replace(src, dst)
  else:
    path(src).replace(dst)


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Moves a folder (gs:// has no folders: every object under `src` is copied, then deleted)."""
  if not is_remote(src) and not is_remote(dst):
    makedirs(dirname(dst))
    os.rename(src, dst)
    return
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.filesystem(scheme(src)).mv(os.fspath(src), os.fspath(dst), recursive=True)


def size(p: PathLike) -> int:
  return path(p).stat().length


def copy(src: PathLike, dst: PathLike, what: str = "", progress: bool = True) -> None:
  """Copies a file in chunks (any mix of local and gs://), with a progress line on stderr."""
  total = size(src)
  label = what or basename(src)
  start, done, shown = time.time(), 0, 0.0
  tmp = f"{os.fspath(dst)}.part"
  with open(src, "rb") as fin, open(tmp, "wb") as fout:
    while chunk := fin.read(_COPY_CHUNK):
      fout.write(chunk)
      done += len(chunk)
      if progress and (time.time() - shown > 2 or done == total):
        shown = time.time()
        print(f"\rCopying {label}: {done / 1e6:.1f}/{total / 1e6:.1f} MB "
              f"({time.time() - start:.1f} s)", end="\n" if done == total else "",
              file=sys.stderr, flush=True)
  replace(tmp, dst)


def cache_root() -> str:
  return os.path.expanduser(os.environ.get("MD4_JAX_CACHE", "~/.cache/md4_jax"))


def cache_path(p: PathLike) -> str:
  """Where the local cache keeps a copy of remote `p` (<cache>/gs/<bucket>/<key>)."""
  text = os.fspath(p)
  kind, rest = text.split("://", 1)
  return os.path.join(cache_root(), kind, rest)


def local_copy(p: PathLike, what: str = "") -> str:
  """A local path with `p`'s bytes: `p` itself when local, else a copy in the cache made
  once (re-copied when the remote size differs), with a progress line."""
  if not is_remote(p):
    return os.path.expanduser(os.fspath(p))
  local = cache_path(p)
  remote_size = size(p)
  if os.path.exists(local) and os.path.getsize(local) == remote_size:
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  print(f"md4_jax: {os.fspath(p)} is read from a local copy: {local}", file=sys.stderr,
        flush=True)
  copy(p, local, what)
  return local


class Mirror:
  """A local folder for a library that writes files itself (TensorBoard's writer, the
  profiler), uploaded by `sync()` to a remote folder; for a local target, the folder itself.

    mirror = paths.Mirror(workdir)          # mirror.local: where the library writes
    ...; mirror.sync()                      # new or grown files go up
  """

  def __init__(self, target: PathLike):
    self.target = os.fspath(target)
    self.remote = is_remote(self.target)
    self.local = cache_path(self.target) if self.remote else os.path.expanduser(self.target)
    self._sent: dict[str, tuple[int, int]] = {}
    self._since = time.time_ns() - 2_000_000_000  # Files of earlier runs stay where they are.

  def sync(self) -> list[str]:
    """Uploads the files written or changed since the last sync (and since this mirror was
    made: an earlier run's files in the cache are not sent again); returns their remote paths."""
    if not self.remote or not os.path.isdir(self.local):
      return []
    sent = []
    for root, _, files in os.walk(self.local):
      for name in files:
        local = os.path.join(root, name)
        st = os.stat(local)
        key = (st.st_size, st.st_mtime_ns)
        if self._sent.get(local) == key or st.st_mtime_ns < self._since:
          continue
        remote = join(self.target, os.path.relpath(local, self.local))
        with builtins.open(local, "rb") as f:
          write_bytes(remote, f.read())
        self._sent[local] = key
        sent.append(remote)
    return sent
