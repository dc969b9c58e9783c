r"""The training loop's stall per checkpoint, synchronous vs async (orbax) saves.

Builds a train state of a config's exact shapes (default MD4-S, configs/openwebtext.py) from
host random numbers (nothing compiled but the checksum pass; see benchmarks/checkpoint.py)
and times `Checkpointer.save` on a local disk and on gs:// (a GCS emulator on 127.0.0.1,
tests/gcs_emulator.py; in-memory, so it measures the client side, not a network):

* stall: how long `save` blocks the loop (sync: the whole write; async: checksums, the copy
  off the devices, the data iterator and config, then orbax writes in a background thread);
* durable: until the checkpoint is complete and listed (`save` + `wait`).

  python benchmarks/async_checkpoint.py --repeats=1 --targets=local              # MD4-S
  python benchmarks/async_checkpoint.py --repeats=1 --targets=emulator --warmup=0
  python benchmarks/async_checkpoint.py --config=tiny --targets=local --repeats=1
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(_ROOT, "tests"))

import checkpoint as checkpoint_bench  # noqa: E402  (benchmarks/checkpoint.py)
from md4_jax.run import checkpoint as checkpoint_lib  # noqa: E402

FLAGS = flags.FLAGS
# --config and --repeats are benchmarks/checkpoint.py's flags (timed saves per row, after an
# untimed first one).
flags.DEFINE_list("targets", ["local", "emulator"], "local and/or emulator.")
flags.DEFINE_integer("warmup", 1, "Untimed saves first (0 keeps the in-memory emulator to one "
                     "state's worth of objects).")


def _time_saves(directory: str, state, async_save: bool, repeats: int,
                warmup: int) -> tuple[float, float]:
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=1, async_save=async_save)
  stalls, durable = [], []
  for step in range(warmup + repeats):
    start = time.perf_counter()
    ckpt.save(step, state)
    stall = time.perf_counter() - start
    ckpt.wait()
    if step >= warmup:  # The first save also creates the directories.
      stalls.append(stall)
      durable.append(time.perf_counter() - start)
  assert ckpt.all_steps() == [warmup + repeats - 1]
  ckpt.close()
  return statistics.median(stalls), statistics.median(durable)


def main(argv):
  del argv
  config = checkpoint_bench.CONFIGS[FLAGS.config]()
  abstract, state = checkpoint_bench.random_state(config)
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
  checkpoint_lib.digest(state)  # Compiles the checksum pass.
  rows = []
  for target in FLAGS.targets:
    for async_save in (False, True):
      # A fresh emulator (or directory) per row: the in-memory emulator holds every object.
      emulator = None
      if target == "emulator":
        import gcs_emulator  # pylint: disable=g-import-not-at-top
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        emulator = gcs_emulator.Emulator().start()
        emulator.apply()
        root = f"gs://{gcs_emulator.BUCKET}/bench"
      else:
        root = tempfile.mkdtemp(prefix="md4_async_bench_")
      name = "async" if async_save else "sync"
      try:
        stall, durable = _time_saves(f"{root}/{name}", state, async_save, FLAGS.repeats,
                                      FLAGS.warmup)
      finally:
        if emulator is not None:
          emulator.stop()
        else:
          shutil.rmtree(root, ignore_errors=True)
      rows.append((target, name, stall, durable))
      print(f"{target} {name}: stall {stall:.2f} s, durable after {durable:.2f} s", flush=True)
  print(f"\nJAX {jax.__version__} on {jax.devices()[0].device_kind}; state of "
        f"{FLAGS.config}: {len(jax.tree.leaves(abstract))} arrays, {nbytes / 2**30:.2f} GiB; "
        f"median of {FLAGS.repeats}.\n")
  print("| target | save | loop stall per save s | durable after s |")
  print("|---|---|---|---|")
  for target, name, stall, durable in rows:
    print(f"| {target} | {name} | {stall:.2f} | {durable:.2f} |")


if __name__ == "__main__":
  app.run(main)
