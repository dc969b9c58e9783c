"""Shared test fixtures: toy networks, the tiny digits config, running the CLIs.

Toy networks follow the networks' contract `(z, t, cond=None, train=False) ->
logits [B, *data_shape, V]` and are small enough to reason about exactly.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from md4_jax.configs import base
from md4_jax.configs import digits
from md4_jax.experiment import parallel
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import schedules
from md4_jax.experiment import build
from md4_jax.experiment import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIGITS = "--config=configs/digits.py:tiny"


# LLVM's optimisation off, as in the test process (tests/conftest.py): compiling dominates the
# suite's tiny programs.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
  """XLA_FLAGS for a test subprocess with `devices` CPU devices; fast_compile=False for a run
  of hundreds of steps on a model beyond the tiny ones, whose unoptimised steps would cost more
  than the compile saves."""
  return f"--xla_force_host_platform_device_count={devices}" + (
      f" {FAST_COMPILE}" if fast_compile else "")


def digits_tiny(variant: str = "tiny", **overrides):
  """configs/digits.py:tiny (or 'tiny_cond') with top-level overrides."""
  config = digits.get_config(variant)
  config.update(overrides)
  return config


def one_device():
  """A mesh over the first of the suite's 8 CPU devices. In-process trainings that test no
  sharding run on it: the tiny models cost about 40% more CPU split over 8 devices on 2 cores."""
  import jax  # pylint: disable=g-import-not-at-top
  from md4_jax.experiment import parallel  # pylint: disable=g-import-not-at-top
  return parallel.make_mesh({"data": -1}, devices=jax.devices()[:1])


def saved_workdir(workdir, config, step: int = 5, mesh=None, batches=()) -> str:
  """A run directory written in-process: config.json and one checkpoint (at `step`) of a
  freshly initialised state, after one train step per batch of `batches` (dicts with 'x') —
  what the CLIs read, without a training subprocess. On one device unless `mesh` is given."""
  from md4_jax.run import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from md4_jax.run import saved_config  # pylint: disable=g-import-not-at-top
  from md4_jax.experiment import build  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  saved_config.save_config(config, str(workdir))
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(str(workdir)))
  experiment = build.setup(config, one_device() if mesh is None else mesh)
  state = experiment.init_state()
  for batch in batches:
    state, _ = experiment.train_step(state, {k: jnp.asarray(v) for k, v in batch.items()})
  checkpointer.save(step, state.replace(step=step))
  checkpointer.close()
  return str(workdir)


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the complete checkpoints in a workdir (sorted; [] before the first)."""
  ckpt = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def chi_square_pvalue(counts_LxV, probs_LxV) -> float:
  """Pooled chi-square p-value over rows; cells with zero probability must be empty.

  counts_LxV, probs_LxV: [L, V] (or [V] for one row) draws and their law.
  """
  counts_LxV, probs_LxV = np.atleast_2d(counts_LxV), np.atleast_2d(probs_LxV)
  n = counts_LxV.sum(axis=1, keepdims=True)
  support = probs_LxV > 0
  assert np.all(counts_LxV[~support] == 0), "a token outside the support was drawn"
  expected = n * probs_LxV
  stat = float(np.sum((counts_LxV[support] - expected[support]) ** 2 / expected[support]))
  dof = int(support.sum() - support.shape[0])
  return scipy_stats.chi2.sf(stat, dof)


def run_module(module: str, *args, devices: int = 1, timeout: int = 600, fast_compile: bool = True,
               **popen_kwargs) -> subprocess.CompletedProcess:
  """`python -m module args` in the repository with `devices` forced CPU devices (xla_flags)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices, fast_compile),
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **popen_kwargs)


def md4(network: nn.Module, schedule: str, vocab_size: int, data_shape, **kwargs):
  """An MD4 model around a toy network."""
  return model_lib.MD4(network, schedules.get_schedule(schedule), vocab_size, tuple(data_shape),
                       **kwargs)


class FixedLogits(nn.Module):
  """Ignores z and t: logits [L, V] are a parameter, the same for every example."""

  num_positions: int
  vocab_size: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del t, cond, train
    logits = self.param("logits", nn.initializers.zeros, (self.num_positions, self.vocab_size))
    return jnp.broadcast_to(logits, z.shape + (self.vocab_size,))


def fixed_logits_model(logits_LxV, schedule: str = "linear", **kwargs):
  """(MD4 around FixedLogits, its variables holding `logits_LxV`): an input-ignoring model."""
  num_positions, vocab = logits_LxV.shape
  model = md4(FixedLogits(num_positions, vocab), schedule, vocab, (num_positions,), **kwargs)
  return model, {"params": {"network": {"logits": jnp.asarray(logits_LxV, jnp.float32)}}}


class CopyLeft(nn.Module):
  """Time-independent, uses z: prefers the visible left neighbour's token.

  With `time_weight` > 0 the logits also tilt with t (a time-dependent network).
  """

  vocab_size: int
  time_weight: float = 0.0

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del cond, train
    scale = self.param("scale", nn.initializers.constant(3.0), ())
    left = jnp.roll(z, 1, axis=-1)
    visible = left < self.vocab_size
    bonus = scale * jax.nn.one_hot(jnp.where(visible, left, 0), self.vocab_size)
    logits = jnp.where(visible[..., None], bonus, 0.0)
    tilt = (self.time_weight * t[:, None, None]
            * jnp.arange(self.vocab_size, dtype=jnp.float32)[None, None])
    return logits + tilt


def grads_on(mesh_shape, config, batch, check_lowered=None):
  """The loss gradients of `config`'s model on a (data, fsdp, tensor) mesh of the first
  devices: (state, gradients on the host, loss). check_lowered(text, mesh), if given,
  inspects the lowered computation first."""
  data, fsdp, tensor = mesh_shape
  mesh = parallel.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor},
                            devices=jax.devices()[: data * fsdp * tensor])
  experiment = build.setup(config, mesh)
  state = experiment.init_state()
  shardings = jax.tree.map(lambda a: a.sharding, state.params)
  jitted = experiment.jit(
      lambda p, b: step_lib.compute_grads(experiment.model, p, b, jax.random.key(5)),
      in_shardings=(shardings, parallel.batch_sharding(mesh)),
      out_shardings=(shardings, parallel.replicated(mesh)))
  global_batch = parallel.to_global(batch, mesh)
  if check_lowered is not None:
    check_lowered(jitted.lower(state.params, global_batch).as_text(), mesh)
  grads, metrics = jitted(state.params, global_batch)
  return state, jax.device_get(grads), float(metrics["loss"])


def transformer_config(length: int, vocab_size: int, width: int, depth: int, num_heads: int,
                       **overrides):
  """A small transformer MD4 config (linear schedule, the plain XLA attention: 'auto'
  may pick cuDNN on a GPU), then `overrides` (top-level keys)."""
  config = base.get_config()
  config.attention_impl = "xla"
  config.network = "transformer"
  config.data_shape = (length,)
  config.vocab_size = vocab_size
  config.noise_schedule = "linear"
  config.transformer.width = width
  config.transformer.depth = depth
  config.transformer.num_heads = num_heads
  config.update(overrides)
  return config


def tiny_bpe(docs: list[str], vocab_size: int):
  """A byte-level BPE tokenizer (GPT-2's kind, `<|endoftext|>` special) trained here on
  `docs`, and its batch encoder texts -> [ids] (no special tokens added)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(docs, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.decoder = tokenizers.decoders.ByteLevel()
  encode = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
  return tok, encode
