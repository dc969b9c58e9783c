r"""What checkpoint integrity costs: checksum time against save and restore time.

Builds a train state of a config's exact shapes (default: MD4-S,
configs/openwebtext.py: params, EMA and two Adam moments) from random numbers
on the host — no model is compiled — and times, on one device, median of
`--repeats`:

* digest: the checksums alone (`checkpoint.digest`: one jitted pass over
  every array, after a warm-up call that compiles it);
* save: `Checkpointer.save` (orbax save + checksums) vs the same orbax save
  without them;
* restore: `Checkpointer.restore` (orbax restore + verification) vs the same
  restore without verification.

  python benchmarks/checkpoint.py                      # MD4-S, ~3.3 GB of state
  python benchmarks/checkpoint.py --config=text8 --repeats=1 --dir=/tmp/ckpt_bench
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
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from md4_jax.configs import openwebtext  # noqa: E402
from md4_jax.configs import text8  # noqa: E402
from md4_jax.run import checkpoint as checkpoint_lib  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.experiment import build  # noqa: E402

CONFIGS = {"md4s": openwebtext.get_config, "text8": text8.get_config,
           "tiny": lambda: text8.get_config("tiny")}
FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "md4s", list(CONFIGS), "Whose state shapes to use.")
flags.DEFINE_integer("repeats", 3, "Timed repeats; medians are reported.")
flags.DEFINE_string("dir", "", "Scratch directory ('' = a fresh temporary one).")


def random_state(config):
  """The config's TrainState shapes filled with host random numbers, on one device."""
  experiment = build.setup(config, parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  rng = np.random.default_rng(0)

  def fill(a):
    if np.issubdtype(a.dtype, np.floating):
      return jax.device_put(rng.standard_normal(a.shape, np.float32).astype(a.dtype), a.sharding)
    return jax.device_put(np.zeros(a.shape, a.dtype), a.sharding)
  return experiment.abstract_state, jax.tree.map(fill, experiment.abstract_state)


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  config = CONFIGS[FLAGS.config]()
  abstract, state = random_state(config)
  nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
  root = FLAGS.dir or tempfile.mkdtemp(prefix="md4_ckpt_bench_")
  checkpoint_lib.digest(state)  # Compiles the checksum pass.
  digest_s = _median_seconds(lambda: checkpoint_lib.digest(state), FLAGS.repeats)

  counter = iter(range(1, 10_000))
  plain = ocp.CheckpointManager(os.path.join(root, "plain"), item_names=("state",),
                                options=ocp.CheckpointManagerOptions(
                                    max_to_keep=1, enable_async_checkpointing=False))
  ours = checkpoint_lib.Checkpointer(os.path.join(root, "ours"), max_to_keep=1)

  def plain_save():
    plain.save(next(counter), args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
               force=True)
    plain.wait_until_finished()

  plain_save_s = _median_seconds(plain_save, FLAGS.repeats)
  ours_save_s = _median_seconds(lambda: ours.save(next(counter), state), FLAGS.repeats)
  plain_restore_s = _median_seconds(lambda: jax.block_until_ready(plain.restore(
      plain.latest_step(),
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]), FLAGS.repeats)
  ours_restore_s = _median_seconds(lambda: jax.block_until_ready(ours.restore(abstract)),
                                   FLAGS.repeats)
  plain.close()
  ours.close()
  if not FLAGS.dir:
    shutil.rmtree(root, ignore_errors=True)

  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; state of "
        f"configs/{'openwebtext.py (MD4-S)' if FLAGS.config == 'md4s' else 'text8.py'}: "
        f"{len(jax.tree.leaves(abstract))} arrays, {nbytes / 2**30:.2f} GiB; median of "
        f"{FLAGS.repeats}.\n")
  print("| operation | without checksums s | with checksums s | overhead |")
  print("|---|---|---|---|")
  print(f"| checksums alone | - | {digest_s:.3g} | - |")
  print(f"| save | {plain_save_s:.3g} | {ours_save_s:.3g} | "
        f"{100 * (ours_save_s / plain_save_s - 1):+.0f}% |")
  print(f"| restore | {plain_restore_s:.3g} | {ours_restore_s:.3g} | "
        f"{100 * (ours_restore_s / plain_restore_s - 1):+.0f}% |")


if __name__ == "__main__":
  app.run(main)
