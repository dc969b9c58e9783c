"""What every md4_jax command shares: start-up, multi-process flags, logging, exit codes.

`md4_jax.train` (alias `md4_jax.main`), `md4_jax.sample` and `md4_jax.evaluate` each call

  app.run(main, flags_parser=cli.flags_parser("md4_jax"))  # flag errors: one line
  cli.start(argv)                 # flags checked, libraries quiet, JAX set up
  cli.run(lambda: ..., "md4_jax") # one-line errors and exit codes

Exit codes: 0 done (or preempted with a checkpoint), 2 bad input (flags,
config, workdir, data, checkpoint), 3 training stopped on a NaN/Inf.

A config flag (`define_config_flag`) takes a file, `--config=configs/digits.py:tiny`
from a clone, or an installed config's name, `--config=digits:tiny` (an
install without a clone, e.g. Colab).
"""

import logging as pylogging
import os
import re
import sys
import threading
from typing import Callable, Optional, TypeVar

# TensorFlow (TFDS pipelines, summaries) is quiet: no C++ INFO lines, and no
# oneDNN notice on stderr before a command's one-line error. md4_jax computes nothing with
# TensorFlow's CPU kernels, so its oneDNN rewrites gain nothing here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from md4_jax import paths  # noqa: F401  (gs:// through gcsfs, set before any path is used)

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", os.environ.get("MD4_DISTRIBUTED", "0") == "1",
    "Call jax.distributed.initialize() first (multi-process runs). Without the three flags "
    "below JAX auto-detects TPU pods, SLURM and other clusters. Default from $MD4_DISTRIBUTED.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")

# Libraries whose INFO (and, for quiet commands, WARNING) chatter is dropped.
_NOISY = ("/orbax/", "/grain/", "/etils/", "/gcsfs/", "/google/auth/", "/google/cloud/")

T = TypeVar("T")


class _QuietLibraries(pylogging.Filter):
  """Drops records below `min_level` that come from the checkpoint/data libraries."""

  def __init__(self, min_level: int):
    super().__init__()
    self._min_level = min_level

  def filter(self, record):
    return record.levelno >= self._min_level or not any(n in record.pathname for n in _NOISY)


def initialize_distributed() -> None:
  """jax.distributed.initialize from the flags; CPU processes talk through gloo."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def start(argv, quiet: bool = False) -> None:
  """Checks for stray arguments, quietens library logs, sets up JAX (and processes).

  Args:
    argv: what absl passed to main.
    quiet: a command with its own progress output: log at WARNING unless
      --verbosity is given, and drop the libraries' warnings too.
  """
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if quiet and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(
      _QuietLibraries(pylogging.ERROR if quiet else pylogging.WARNING))
  jax.config.update("jax_threefry_partitionable", True)
  # A failed checkpoint read leaves orbax/tensorstore coroutines and callbacks that raise
  # after the error was handled; their tracebacks would bury the one-line report.
  sys.unraisablehook = lambda u: logging.debug("Ignored: %s", u.exc_value)
  threading.excepthook = lambda a: logging.debug("Ignored in a thread: %s", a.exc_value)
  if _DISTRIBUTED.value:
    initialize_distributed()
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())


def one_line(error: BaseException, limit: int = 400) -> str:
  """An exception's message on one line (whitespace folded, at most `limit` characters).

  A message that embeds a traceback (ml_collections' config-file errors) keeps
  its subject and the traceback's last line, e.g. "flag --config=X: ValueError: ...".
  """
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if any("Traceback (most recent call last)" in l for l in lines):
    text = f"{lines[0].split(': ')[0]}: {lines[-1]}"
  else:
    text = " ".join(" ".join(lines).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def configs_dir() -> str:
  """The folder of the configs md4_jax ships (configs/ of a clone, md4_jax/configs/ of an install)."""
  from md4_jax import configs  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.abspath(configs.__file__))


def config_names() -> list[str]:
  """The shipped configs by name: each configs/<name>.py."""
  return sorted(f[:-3] for f in os.listdir(configs_dir())
                if f.endswith(".py") and not f.startswith("_"))


def config_path(spec: str) -> str:
  """A config flag's value as the file ml_collections loads (`:variant` kept).

  A path (`configs/digits.py:tiny`, anything with a '/' or ending in .py, or
  an existing file) stays as it is; a bare name (`digits:tiny`) becomes the
  shipped file (`.../md4_jax/configs/digits.py:tiny`), so an install runs
  configs without a clone.

  Raises:
    ValueError: a bare name that no shipped config has (the message lists them).
  """
  name, colon, variant = spec.partition(":")
  if "/" in name or os.sep in name or name.endswith(".py") or os.path.isfile(name):
    return spec
  names = config_names()
  if name not in names:
    raise ValueError(f"Unknown config {name!r}; valid names: {', '.join(names)} (or a config "
                     "file's path, e.g. configs/digits.py).")
  return os.path.join(configs_dir(), f"{name}.py") + colon + variant


class _ByNameParser(flags.ArgumentParser):
  """A config-file flag's parser that first resolves a bare config name (see config_path)."""

  def __init__(self, parser: flags.ArgumentParser):
    self._parser = parser

  def parse(self, argument):
    return self._parser.parse(config_path(argument))

  def flag_type(self):
    return self._parser.flag_type()


def define_config_flag(name: str, help_string: str,
                       flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file` (locked, `--NAME.key=value` overrides) whose value
  is a config file's path or a shipped config's name (see config_path)."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=True)
  flag_values[name].parser = _ByNameParser(flag_values[name].parser)
  return holder


def flags_parser(prog: str) -> Callable[[list], list]:
  """An absl `flags_parser` turning any flag error (a missing or broken --config file, an
  unknown config variant or key, a bad value) into one line and exit 2, not a traceback."""
  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{prog}: error: {_unknown_key(e, argv) or one_line(e)}", file=sys.stderr, flush=True)
      sys.exit(EXIT_BAD_INPUT)
  return parse


def _unknown_key(error: BaseException, argv) -> Optional[str]:
  """ml_collections reports `--config.nonexistent=1` as a bare "'nonexistent'": say what it is."""
  match = re.fullmatch(r"""["']*([\w.]+)["']*""", str(error).strip())
  if match is None:
    return None
  key = match.group(1).split(".")[-1]
  for arg in argv[1:]:
    name = arg.lstrip("-").split("=", 1)[0]
    if name.startswith("config.") and key in name.split(".")[1:]:
      return (f"--{name}: the config has no field {key!r} (every field is listed, with its "
              "choices, in configs/base.py; nested fields are --config.GROUP.FIELD).")
  return None


_OOM = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "Ran out of memory")


def _silence_abandoned_tasks() -> None:
  """Before exiting on an error: a failed read (a corrupt checkpoint) can leave orbax's other
  asyncio reads failed and never awaited, and Python prints each with its traceback when it
  is collected at exit ('Task exception was never retrieved', 'Exception ignored in'). Their
  failure is the one reported, so they are silenced and the error stays one line."""
  pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
  sys.unraisablehook = lambda unraisable: None


def run(fn: Callable[[], T], prog: str, memory_knobs: str = "the batch size") -> T:
  """Runs `fn`; a bad input or a stop on NaN/Inf becomes one line on stderr and an exit code.

  ValueError and OSError (missing files, permissions, a full disk) ->
  "<prog>: error: ..." and exit 2 (the traceback goes to the debug log);
  running out of memory at compile or run time (XLA's RESOURCE_EXHAUSTED, a
  host MemoryError) -> one line naming `memory_knobs`, exit 2;
  FloatingPointError (the training loop's NaN/Inf stop) -> "<prog>: stopped:
  ..." and exit 3.
  """
  try:
    return fn()
  except (MemoryError, RuntimeError) as e:
    if not isinstance(e, MemoryError) and not any(s in str(e) for s in _OOM):
      raise
    logging.debug("Out of memory", exc_info=True)
    detail = next((l.strip() for l in str(e).splitlines() if any(s in l for s in _OOM)),
                  type(e).__name__)
    _silence_abandoned_tasks()
    print(f"{prog}: error: out of memory ({detail[:300]}); lower {memory_knobs}.",
          file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)
  except FloatingPointError as e:
    logging.error("%s", e)
    print(f"{prog}: stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_NONFINITE)
  except (ValueError, OSError) as e:
    logging.debug("Input error", exc_info=True)
    _silence_abandoned_tasks()
    print(f"{prog}: error: {one_line(e, 2000)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)
