r"""Start-up cost of data that must be local: text8 on gs:// through the local cache.

text8 is read as a memory map, so a gs:// data_dir is copied once into $MD4_JAX_CACHE
(`md4_jax.paths.local_copy`, with a progress line) and every later start reads the copy. This
times both starts for a file of text8's size (100,000,000 bytes, random letters) uploaded to a
GCS emulator on 127.0.0.1 (tests/gcs_emulator.py; in memory, so it measures the client side:
gcsfs's download and the disk write, not a network link):

* first start: the copy into the cache;
* later start: the size check against the bucket (one metadata request) and the local hit.

  python benchmarks/gcs_cache.py                 # text8's size, 3 repeats
  python benchmarks/gcs_cache.py --megabytes=10 --repeats=1
"""

import os
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))

import gcs_emulator  # noqa: E402  (tests/gcs_emulator.py)

_MEGABYTES = flags.DEFINE_integer("megabytes", 100, "File size in 10^6 bytes (text8: 100).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed first starts (each into an empty cache).")


def main(argv):
  del argv
  emulator = gcs_emulator.Emulator().start()
  try:
    emulator.apply()
    from md4_jax import paths  # pylint: disable=g-import-not-at-top  (after the emulator env)
    remote = f"gs://{gcs_emulator.BUCKET}/data/text8/text8"
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ", np.uint8)
    data = letters[np.random.default_rng(0).integers(0, 27, _MEGABYTES.value * 10**6)]
    paths.write_bytes(remote, data.tobytes())
    first, later = [], []
    for _ in range(_REPEATS.value):
      cache = tempfile.mkdtemp(prefix="md4_cache_")
      os.environ["MD4_JAX_CACHE"] = cache
      start = time.perf_counter()
      local = paths.local_copy(remote, "text8")
      first.append(time.perf_counter() - start)
      start = time.perf_counter()
      assert paths.local_copy(remote, "text8") == local
      later.append(time.perf_counter() - start)
      assert os.path.getsize(local) == data.size
      shutil.rmtree(cache)
    mb = data.size / 1e6
    print(f"| {mb:.0f} MB | first start (copy) {statistics.median(first):.2f} s "
          f"({mb / statistics.median(first):.0f} MB/s) | later start {statistics.median(later):.3f} s "
          f"| medians of {_REPEATS.value} |")
  finally:
    emulator.stop()


if __name__ == "__main__":
  app.run(main)
