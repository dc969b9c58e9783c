"""Model, sharded train state and jitted steps from a config, over a mesh.

Everything a training or benchmark run needs to build and step the model,
with no data pipeline, checkpointing or metric writers (so no TensorFlow,
TFDS, grain or clu imports): `loop.run` uses these, and so do the benchmark
scripts, which then run on accelerator images that lack those packages.
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from md4_jax import networks
from md4_jax import parallel
from md4_jax.diffusion import model as model_lib
from md4_jax.train import state as state_lib
from md4_jax.train import step as step_lib


def build_model(config: ml_collections.ConfigDict) -> model_lib.MD4:
  """The MD4 model (network from the registry) described by the config."""
  return model_lib.build_model(config, networks.build_network(config))


def _init_fn(config, model, optimizer, mesh):
  return functools.partial(step_lib.init_state, model=model, optimizer=optimizer,
                           batch_size=parallel.batch_size_per_shard(mesh),
                           with_labels=config.classes > 0)


def sharding_rules(config) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.sharding_rules)


def abstract_train_state(config, model, optimizer, mesh) -> state_lib.TrainState:
  """Shapes, dtypes and shardings (from the logical rules) of the TrainState."""
  boxed = jax.eval_shape(_init_fn(config, model, optimizer, mesh), jax.random.key(config.seed))
  shardings = parallel.logical_shardings(boxed, mesh, sharding_rules(config))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def create_train_state(config, model, optimizer, mesh) -> state_lib.TrainState:
  """Initialises the state directly in its shardings (shapes → shardings → init)."""
  abstract = abstract_train_state(config, model, optimizer, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  init = _init_fn(config, model, optimizer, mesh)
  with nn.logical_axis_rules(sharding_rules(config)):
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(
        jax.random.key(config.seed))


def with_rules(fn, config, mesh: Optional[Mesh] = None):
  """Traces `fn` inside `parallel.logical_context(sharding_rules(config), mesh)`."""
  rules = sharding_rules(config)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with parallel.logical_context(rules, mesh):
      return fn(*args, **kwargs)
  return wrapped


def make_train_step(config, model, optimizer, lr_schedule, mesh, state):
  """The jitted, donated train step over `mesh`."""
  fn = functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                         lr_schedule=lr_schedule, ema_rate=config.ema_rate,
                         accum_steps=config.grad_accum_steps, skip_nonfinite=config.check_nans,
                         debug_nan_at_step=config.debug_nan_at_step)
  state_shardings = jax.tree.map(lambda a: a.sharding, state)
  return jax.jit(with_rules(fn, config, mesh), in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)


def make_eval_step(config, model, mesh, num_t_samples: int = 1):
  """Jitted `(params, batch, rng) -> per-example NELBO estimates` over `mesh`.

  See `step.eval_step`; outputs are replicated float32 [B] arrays.
  """
  if num_t_samples < 1:
    raise ValueError(f"num_t_samples must be >= 1, got {num_t_samples}.")
  fn = functools.partial(step_lib.eval_step, model=model, num_t_samples=int(num_t_samples))
  return jax.jit(with_rules(fn, config, mesh),
                 in_shardings=(None, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh))
