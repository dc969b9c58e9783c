r"""Draws samples from a trained run's checkpoint into <workdir>/samples/.

  python -m md4_jax.sample --workdir=/tmp/md4_digits --num_samples=64 --steps=256
  python -m md4_jax.sample --workdir=/tmp/md4_digits_c --label=3 --trajectory
  python -m md4_jax.sample --workdir=/tmp/t8 --sampler=first_hitting \
      --prompt="the history of the "          # continue a prompt
  python -m md4_jax.sample --workdir=/tmp/t8 --prompt="in the ______ of paris"  # fill the '_'s

Loads the config saved in the workdir and the latest checkpoint (or --step),
samples with the EMA parameters (--params=raw for the raw ones), and writes a
PNG grid (images, the first 256) or a text file (text), all tokens as .npy,
the trajectory (PNG grid + GIF, or text) with --trajectory, and a JSON file
with the settings, NFE and timings. Many samples are drawn in batches of
--batch_size (batch i uses fold_in(key(seed), i)), with a progress line each.
"""

import json
import logging as pylogging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from md4_jax import parallel  # noqa: E402
from md4_jax import sample_metrics  # noqa: E402
from md4_jax import visualize  # noqa: E402
from md4_jax import workdir as workdir_lib  # noqa: E402
from md4_jax.data import text8  # noqa: E402
from md4_jax.data import tokenized  # noqa: E402
from md4_jax.diffusion import samplers  # noqa: E402
from md4_jax.train import build  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Number of samples.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Samples per jitted call (rounded up to "
                                   "a multiple of the devices); more samples take several calls.")
_STEPS = flags.DEFINE_integer("steps", None, "Grid steps (default: the config's sampling_steps; "
                              "first_hitting makes one call per token instead).")
_SAMPLER = flags.DEFINE_enum("sampler", "ancestral", sorted(samplers.SAMPLERS), "Sampler.")
_GRID = flags.DEFINE_enum("grid", "uniform", list(samplers.GRIDS), "Time grid.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Logits are divided by this.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus mass of the topp sampler.")
_EXACT = flags.DEFINE_bool("exact", True, "Exact draws (False: the reference float32 step).")
_CACHE = flags.DEFINE_bool("cache", True, "Call the network only at steps that reveal tokens.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text: tokens to keep fixed at the start; for text8, "
                              "'_' marks characters to generate (infilling).")
_LABEL = flags.DEFINE_integer("label", None, "Class label for every sample (class-conditional "
                              "runs; default: labels 0, 1, 2, ... in turn).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"], "Which parameters to sample with.")
_TRAJECTORY = flags.DEFINE_bool("trajectory", False, "Also save the trajectory of the samples.")
_FRAMES = flags.DEFINE_integer("frames", 11, "Trajectory frames (all-mask → clean).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (default: <workdir>/samples).")
flags.mark_flags_as_required(["workdir"])

EXIT_BAD_INPUT = 2
MAX_GRID_IMAGES = 256


class _QuietLibraries(pylogging.Filter):
  """Drops INFO chatter of the checkpoint library (warnings still pass)."""

  def filter(self, record):
    return record.levelno > pylogging.INFO or "/orbax/" not in record.pathname


def text_decoder(config):
  """Token ids [L] → str for text datasets (no data files needed for text8); None for images."""
  if len(config.data_shape) != 1:
    return None
  if config.dataset == text8.NAME:
    return text8.decode
  if config.dataset in tokenized.DATASETS:
    data_dir = os.path.expanduser(config.data_dir or tokenized.DATASETS[config.dataset].default_data_dir)
    return tokenized.Decoder(os.path.join(data_dir, tokenized.TOKENIZER_FILE))
  return lambda ids: " ".join(map(str, np.asarray(ids).tolist()))


def encode_prompt(config, prompt: str) -> np.ndarray:
  """int32 [L]: the prompt's tokens, the mask id at positions to generate.

  text8: one token per character, '_' = generate this character. Tokenized
  corpora: the prompt's tokens as a prefix (needs the tokenizer saved by
  prepare). The rest of the sequence is generated.
  """
  if len(config.data_shape) != 1:
    raise ValueError("--prompt is for text runs; this run models images.")
  (length,) = config.data_shape
  mask_id = config.vocab_size
  if config.dataset == text8.NAME:
    fixed = np.array([c != "_" for c in prompt], bool)
    ids = np.where(fixed, text8.encode(prompt.replace("_", " ")), mask_id)
  elif config.dataset in tokenized.DATASETS:
    import tokenizers  # pylint: disable=g-import-not-at-top
    data_dir = os.path.expanduser(config.data_dir or tokenized.DATASETS[config.dataset].default_data_dir)
    path = os.path.join(data_dir, tokenized.TOKENIZER_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"--prompt needs the tokenizer {path}; run md4_jax.data.prepare.")
    ids = np.asarray(tokenizers.Tokenizer.from_file(path).encode(prompt).ids, np.int32)
  else:
    raise ValueError(f"--prompt does not know how to encode text for dataset {config.dataset!r}.")
  if len(ids) > length:
    raise ValueError(f"The prompt has {len(ids)} tokens; the sequences have {length}.")
  out = np.full((length,), mask_id, np.int32)
  out[:len(ids)] = ids
  return out


def labels(config, label, batch: int, offset: int = 0):
  """[batch] class labels: `label` for all, or offset, offset + 1, ... mod classes."""
  if label is None:
    if config.classes <= 0:
      return None
    return (offset + jnp.arange(batch, dtype=jnp.int32)) % config.classes
  if not 0 <= label < max(config.classes, 0):
    raise ValueError(f"--label={label} needs a class-conditional run with label < classes "
                     f"(this run has classes={config.classes}).")
  return jnp.full((batch,), label, jnp.int32)


def run(workdir: str) -> dict:
  """Samples as the flags say; returns what it wrote into the JSON file."""
  mesh = parallel.make_mesh({"data": -1})
  config, model, state = workdir_lib.restore_run(workdir, step=_STEP.value, mesh=mesh)
  step = int(jax.device_get(state.step))
  params = state.ema_params if _PARAMS.value == "ema" else state.params
  sampler = _SAMPLER.value
  steps = _STEPS.value or config.sampling_steps
  num = _NUM_SAMPLES.value
  if num < 1 or _BATCH_SIZE.value < 1:
    raise ValueError(f"--num_samples and --batch_size must be >= 1, got {num} and "
                     f"{_BATCH_SIZE.value}.")
  shards = parallel.batch_size_per_shard(mesh)
  batch = -(-min(num, _BATCH_SIZE.value) // shards) * shards  # Padded to the mesh.
  num_batches = -(-num // batch)
  z_init = samplers.all_masked(model, batch)
  if _PROMPT.value is not None:
    z_init = jnp.broadcast_to(jnp.asarray(encode_prompt(config, _PROMPT.value)), z_init.shape)
  options = samplers.SamplerOptions(temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                                    exact=_EXACT.value, cache=_CACHE.value)
  frames = _FRAMES.value if _TRAJECTORY.value else 0
  fn = samplers.make_sampler(model, mesh, steps=steps, sampler=sampler, grid=_GRID.value,
                             options=options, frames=frames, rules=build.sharding_rules(config))
  rng = jax.random.key(_SEED.value)
  start = time.time()
  compiled = fn.jitted.lower({"params": params}, rng, z_init, labels(config, _LABEL.value, batch)
                             ).compile()
  compile_seconds = time.time() - start
  outputs, nfes, trajectory = [], [], None
  start = time.time()
  for i in range(num_batches):
    cond = labels(config, _LABEL.value, batch, offset=i * batch)
    tokens, stats = jax.block_until_ready(
        compiled({"params": params}, jax.random.fold_in(rng, i), z_init, cond))
    outputs.append(np.asarray(jax.device_get(tokens)))
    nfes.append(int(jax.device_get(stats["nfe"])))
    if frames and trajectory is None:
      trajectory = np.asarray(jax.device_get(stats["frames"]))[:, :num]
    if num_batches > 1:
      logging.info("Batch %d/%d: %d samples, NFE %d, %.1f s elapsed.", i + 1, num_batches, batch,
                   nfes[-1], time.time() - start)
  sample_seconds = time.time() - start
  tokens = np.concatenate(outputs)[:num]
  entropy = sample_metrics.unigram_entropy(tokens)

  out_dir = _OUT_DIR.value or os.path.join(workdir, "samples")
  name = f"ckpt{step:08d}_{sampler}_" + ("" if sampler == "first_hitting" else f"{steps}steps_")
  name += f"seed{_SEED.value}" + (f"_label{_LABEL.value}" if _LABEL.value is not None else "")
  base = os.path.join(out_dir, name)
  decode = text_decoder(config)
  files = []
  if decode is None:
    files.append(visualize.save_png(
        visualize.image_grid(tokens[:MAX_GRID_IMAGES], model.vocab_size), base + ".png", scale=4))
  else:
    files.append(visualize.save_texts(visualize.decode_all(tokens, decode), base + ".txt"))
  np.save(base + ".npy", tokens)
  files.append(base + ".npy")
  if frames:
    if decode is None:
      grid = visualize.trajectory_grid(trajectory, model.vocab_size, model.mask_id)
      files.append(visualize.save_png(grid, base + "_trajectory.png", scale=4))
      files.append(visualize.save_gif(trajectory, base + "_trajectory.gif", model.vocab_size,
                                      model.mask_id))
    else:
      files.append(visualize.save_texts(visualize.text_trajectory(trajectory, decode),
                                        base + "_trajectory.txt"))
  info = {
      "workdir": workdir, "checkpoint_step": step, "params": _PARAMS.value, "sampler": sampler,
      "grid": _GRID.value, "steps": None if sampler == "first_hitting" else steps,
      "temperature": options.temperature, "top_p": options.top_p, "exact": options.exact,
      "cache": options.cache, "seed": _SEED.value, "num_samples": num, "batch": batch,
      "num_batches": num_batches, "label": _LABEL.value, "prompt": _PROMPT.value,
      # Network calls on a batch = network evaluations per sample; mean over batches.
      "nfe": float(np.mean(nfes)), "nfe_per_batch": nfes,
      # Per-sample unigram entropy (nats), mean and std over samples (diversity).
      "unigram_entropy": float(entropy.mean()), "unigram_entropy_std": float(entropy.std()),
      "compile_seconds": compile_seconds, "sample_seconds": sample_seconds,
      "samples_per_second": num_batches * batch / sample_seconds,
      "devices": [str(d) for d in jax.devices()], "files": files,
  }
  with open(base + ".json", "w") as f:
    json.dump(info, f, indent=2)
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  jax.config.update("jax_threefry_partitionable", True)
  try:
    info = run(_WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    logging.debug("Input error", exc_info=True)
    print(f"md4_jax.sample: error: {e}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)
  print(f"Wrote {info['num_samples']} samples ({info['sampler']}, NFE {info['nfe']:.1f}, "
        f"unigram entropy {info['unigram_entropy']:.3f} nats, "
        f"{info['sample_seconds']:.2f} s + {info['compile_seconds']:.1f} s compile): "
        f"{', '.join(info['files'])}", flush=True)


if __name__ == "__main__":
  app.run(main)
