r"""Draws samples from a trained run's checkpoint into <workdir>/samples/.

  python -m md4_jax.sample --workdir=/tmp/md4_digits --num_samples=64 --steps=256
  python -m md4_jax.sample --workdir=/tmp/md4_digits_c --label=3 --trajectory
  python -m md4_jax.sample --workdir=/tmp/t8 --sampler=first_hitting \
      --prompt="the history of the "          # continue a prompt
  python -m md4_jax.sample --workdir=/tmp/t8 --prompt="in the ______ of paris"  # fill the '_'s
  python -m md4_jax.sample --workdir=/tmp/t8 --sampler=remdm --eta=0.02 --remask=cap
  python -m md4_jax.sample --workdir=/tmp/t8 --sampler=ordered --order=margin --temperature=0

Loads the config saved in the workdir and the latest checkpoint (or --step),
samples with the EMA parameters (--params=raw for the raw ones), and writes a
PNG grid (images, the first 256) or a text file (text), all tokens as .npy,
the trajectory (PNG grid + GIF, or text) with --trajectory, and a JSON file
with the settings, NFE and timings (and, with --judge=MODEL, the samples'
generative perplexity under that autoregressive judge; see judge.py). Many
samples are drawn in batches of --batch_size (batch i uses fold_in(key(seed),
i)), with a progress line each.
"""

import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from md4_jax import cli  # noqa: E402
from md4_jax import paths  # noqa: E402
from md4_jax import data as data_lib  # noqa: E402
from md4_jax.metrics import judge as judge_lib  # noqa: E402
from md4_jax.experiment import memory  # noqa: E402
from md4_jax.experiment import parallel  # noqa: E402
from md4_jax.metrics import sample_stats  # noqa: E402
from md4_jax.metrics import pictures  # noqa: E402
from md4_jax.run import workdir as workdir_lib  # noqa: E402
from md4_jax.diffusion import sampling  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Number of samples.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Samples per jitted call (rounded up to "
                                   "a multiple of the devices); more samples take several calls.")
_STEPS = flags.DEFINE_integer("steps", None, "Grid steps (default: the config's sampling_steps; "
                              "first_hitting makes one call per token instead).")
_GRID = flags.DEFINE_enum("grid", None, list(sampling.GRIDS),
                          "Time grid (default: the config's sampling_grid).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Logits are divided by this.")
_EXACT = flags.DEFINE_bool("exact", True, "Exact draws (False: the reference float32 step).")
_CACHE = flags.DEFINE_bool("cache", None, "Call the network only at steps that reveal tokens "
                           "(default: on for the samplers it applies to; see docs/sampling.md).")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight w (class-"
                                "conditional runs trained with config.label_dropout > 0).")
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
_JUDGE = flags.DEFINE_string(
    "judge", None, "Text runs: score the decoded samples' generative perplexity under this "
    "autoregressive model (a Hugging Face name such as openai-community/gpt2-large, or a local "
    "directory; needs the `judge` extra). See md4_jax/judge.py for the protocol.")
_JUDGE_BATCH_SIZE = flags.DEFINE_integer("judge_batch_size", 8, "Rows per judge call.")
flags.mark_flags_as_required(["workdir"])
sampling.command.define_flags()  # --sampler, and each registered sampler's own flags.


def encode_prompt(codec, prompt: str, length: int, mask_id: int) -> np.ndarray:
  """int32 [L]: the prompt's tokens first (the mask id where the codec marks a
  position to generate), the mask id after them.

  Raises:
    ValueError: an image run (no codec), or a prompt longer than L.
  """
  if codec is None:
    raise ValueError("--prompt is for text runs; this run models images.")
  ids, fixed = codec.encode_prompt(prompt)
  if len(ids) > length:
    raise ValueError(f"The prompt has {len(ids)} tokens; the sequences have {length}.")
  out = np.full((length,), mask_id, np.int32)
  out[:len(ids)] = np.where(fixed, ids, mask_id)
  return out


def run(workdir: str) -> dict:
  """Samples as the flags say; returns what it wrote into the JSON file."""
  steps = _STEPS.value
  num = _NUM_SAMPLES.value
  if num < 1 or _BATCH_SIZE.value < 1:
    raise ValueError(f"--num_samples and --batch_size must be >= 1, got {num} and "
                     f"{_BATCH_SIZE.value}.")
  if steps is not None and steps < 1:
    raise ValueError(f"--steps must be >= 1 (or unset for the run's sampling_steps), got {steps}.")
  if jax.process_count() > 1:
    raise ValueError("md4_jax.sample runs in one process (over all its local devices); drop "
                     "--distributed.")
  paths.check_served(workdir, "--workdir")
  if _OUT_DIR.value:
    paths.check_reachable(_OUT_DIR.value, "--out_dir")
  mesh = parallel.make_mesh({"data": -1})
  config, experiment, state = workdir_lib.restore_run(workdir, step=_STEP.value, mesh=mesh)
  model = experiment.model
  info_record = data_lib.get_info(config.dataset)
  codec = info_record.text_codec(config.data_dir)
  judge = None
  if _JUDGE.value is not None:  # Loaded before sampling: a bad judge fails in seconds.
    if codec is None:
      raise ValueError("--judge scores text; this run models images.")
    judge = judge_lib.Judge(_JUDGE.value, batch_size=_JUDGE_BATCH_SIZE.value)
  step = int(jax.device_get(state.step))
  params = state.ema_params if _PARAMS.value == "ema" else state.params
  sampler = sampling.command.sampler_from_flags()
  steps = steps or config.sampling_steps
  shards = parallel.batch_size_per_shard(mesh)
  batch = -(-min(num, _BATCH_SIZE.value) // shards) * shards  # Padded to the mesh.
  num_batches = -(-num // batch)
  # Refused before compiling: one batch's float32 logits on a device, all tokens on the host.
  memory.check_fits(4.0 * batch // shards * model.num_positions * model.vocab_size,
                    f"a sampling batch of {batch} ({model.num_positions} positions x "
                    f"{model.vocab_size} logits each)", "--batch_size")
  memory.check_fits(4.0 * num_batches * batch * model.num_positions,
                    f"--num_samples={num} samples' tokens", "--num_samples", device=jax.devices("cpu")[0])
  z_init = sampling.all_masked(model, batch)
  if _PROMPT.value is not None:
    prompt = encode_prompt(codec, _PROMPT.value, model.num_positions, model.mask_id)
    z_init = jnp.broadcast_to(jnp.asarray(prompt), z_init.shape)
  cache = sampler.caches if _CACHE.value is None else _CACHE.value
  options = sampling.SamplerOptions(temperature=_TEMPERATURE.value, exact=_EXACT.value,
                                    cache=cache, guidance=_GUIDANCE.value)
  frames = _FRAMES.value if _TRAJECTORY.value else 0
  grid = _GRID.value or config.sampling_grid
  fn = experiment.sampler(steps=steps, sampler=sampler, grid=grid, options=options,
                          frames=frames)
  labels = lambda offset: sampling.class_labels(config.classes, batch, _LABEL.value, offset)
  rng = jax.random.key(_SEED.value)
  start = time.time()
  compiled = fn.jitted.lower({"params": params}, rng, z_init, labels(0)).compile()
  compile_seconds = time.time() - start
  outputs, nfes, trajectory = [], [], None
  start = time.time()
  for i in range(num_batches):
    tokens, stats = jax.block_until_ready(
        compiled({"params": params}, jax.random.fold_in(rng, i), z_init, labels(i * batch)))
    outputs.append(parallel.gather(tokens))
    nfes.append(int(parallel.fetch(stats["nfe"])))
    if frames and trajectory is None:
      trajectory = parallel.gather(stats["frames"])[:, :num]
    if num_batches > 1:
      # Progress on stderr whatever the log level (the command starts quiet).
      print(f"Batch {i + 1}/{num_batches}: {batch} samples, NFE {nfes[-1]}, "
            f"{time.time() - start:.1f} s elapsed.", file=sys.stderr, flush=True)
  sample_seconds = time.time() - start
  tokens = np.concatenate(outputs)[:num]
  entropy = sample_stats.unigram_entropy(tokens)
  # A synthetic source scores samples exactly: mean −log p_source(x) per token vs its entropy.
  exact = ({} if info_record.exact_source is None
           else info_record.exact_source(config).score(tokens))

  out_dir = _OUT_DIR.value or paths.join(workdir, "samples")
  name = sampling.command.output_stem(step, sampler, steps, _SEED.value, _LABEL.value)
  base = paths.join(out_dir, name)
  files = [pictures.save_samples(tokens, base, model.vocab_size, codec)[0]]
  with paths.open(base + ".npy", "wb") as f:
    np.save(f, tokens)
  files.append(base + ".npy")
  if frames:
    files += pictures.save_trajectory(trajectory, base, model.vocab_size, model.mask_id, codec)
  info = {
      "workdir": workdir, "checkpoint_step": step, "params": _PARAMS.value,
      **sampling.command.sampler_info(sampler, steps, grid, options,
                                      model.per_token_schedule),
      "seed": _SEED.value, "num_samples": num, "batch": batch,
      "num_batches": num_batches, "label": _LABEL.value, "prompt": _PROMPT.value,
      # Network calls on a batch = network evaluations per sample; mean over batches.
      "nfe": float(np.mean(nfes)), "nfe_per_batch": nfes,
      # Per-sample unigram entropy (nats), mean and std over samples (diversity).
      "unigram_entropy": float(entropy.mean()), "unigram_entropy_std": float(entropy.std()),
      "compile_seconds": compile_seconds, "sample_seconds": sample_seconds,
      "samples_per_second": num_batches * batch / sample_seconds,
      "devices": [str(d) for d in jax.devices()], "files": files, **exact,
  }
  if judge is not None:
    start = time.time()
    info.update(judge.score([codec.decode(t) for t in tokens]))
    info["judge_seconds"] = time.time() - start
  paths.write_text(base + ".json", json.dumps(info, indent=2))
  return info


def main(argv):
  cli.start(argv, quiet=True)
  info = cli.run(lambda: run(_WORKDIR.value), "md4_jax.sample", memory_knobs="--batch_size (samples per call)")
  if "source_nll_bits_per_token" in info:
    print(f"Exact sample NLL under the source: {info['source_nll_bits_per_token']:.4f} ± "
          f"{info['source_nll_per_token_stderr'] / math.log(2):.4f} bits/token (source entropy "
          f"{info['source_entropy_bits_per_token']:.4f} bits/token).", flush=True)
  if "gen_ppl" in info:
    print(f"Generative perplexity under {info['judge']}: {info['gen_ppl']:.2f} ± "
          f"{info['gen_ppl_stderr']:.2f} ({info['judge_tokens']} judge tokens); unigram entropy "
          f"{info['unigram_entropy']:.3f} nats per sample.", flush=True)
  print(f"Wrote {info['num_samples']} samples ({info['sampler']}, NFE {info['nfe']:.1f}, "
        f"unigram entropy {info['unigram_entropy']:.3f} nats, "
        f"{info['sample_seconds']:.2f} s + {info['compile_seconds']:.1f} s compile): "
        f"{', '.join(info['files'])}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("md4_jax.sample"))
