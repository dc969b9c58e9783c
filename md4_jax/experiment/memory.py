"""Does an array fit? Checked before compiling, so a knob set far too high is one clear line.

XLA reports running out of memory only at compile or run time, after a long wait and in a
long message (`cli.run` turns those into one line too). Where a command knows up front the
size of an array it will build (an evaluation's time grid, a sampling batch's logits), it
asks `check_fits` first.
"""

import os
from typing import Optional

import jax


def available_bytes(device: Optional[jax.Device] = None) -> Optional[int]:
  """The memory one device may use: its allocator's limit (GPU/TPU), or the host's available
  memory (CPU devices share it); None when unknown."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except (AttributeError, NotImplementedError, RuntimeError):
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def check_fits(nbytes: float, what: str, knob: str, device: Optional[jax.Device] = None) -> None:
  """Raises ValueError if an array of `nbytes` cannot fit on `device`.

  Args:
    nbytes: the array's size on one device.
    what: the array, for the message (e.g. "the time grid of 300 examples x K").
    knob: the flag to lower.
  """
  limit = available_bytes(device)
  if limit is not None and nbytes > limit:
    raise ValueError(f"{what} needs {nbytes / 2**30:.3g} GiB on one device, which has "
                     f"{limit / 2**30:.3g} GiB: lower {knob}.")
