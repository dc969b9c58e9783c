"""One setup: from a config and a mesh to everything a run steps, evaluates and samples.

  experiment = build.setup(config, mesh)
  state = experiment.init_state()                    # or experiment.restore(checkpointer)
  state, metrics = experiment.train_step(state, batch)
  terms = experiment.eval_step(num_t_samples=4)(params, batch, rng)
  tokens, stats = experiment.sampler(steps=256)(variables, rng, z_init, cond)

`setup` is the only place that turns a config into the mesh's sharding rules,
the model, the optimiser, the abstract (sharded) train state and the jitted
functions; the training loop, the sampling and evaluation CLIs, the benchmarks
and the tests all call it. Every jitted function is traced inside
`parallel.logical_context(rules, mesh)`, so the networks' activation
constraints apply over the mesh. No data pipeline, checkpoint format or metric
writer is imported here (so no TensorFlow, TFDS, grain or clu): the benchmark
scripts run on accelerator images that lack those packages.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from md4_jax import networks
from md4_jax.networks import backend
from md4_jax.experiment import optimizer as optimizer_lib
from md4_jax.experiment import parallel
from md4_jax.diffusion import genmd4
from md4_jax.diffusion import model as model_lib
from md4_jax.diffusion import sampling
from md4_jax.experiment import state as state_lib
from md4_jax.experiment import step as step_lib


def sharding_rules(config: ml_collections.ConfigDict) -> parallel.Rules:
  """config.sharding_rules as hashable (logical name, mesh axes) pairs."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.sharding_rules)


# config.model -> (config, network) -> the diffusion model.
MODELS = {"md4": model_lib.build_model, "genmd4": genmd4.build_model}


def check_model(config: ml_collections.ConfigDict) -> None:
  """config.model is a known model and its settings are valid (one-line errors, no compile)."""
  if config.model not in MODELS:
    raise ValueError(f"Unknown model {config.model!r}; valid: {', '.join(sorted(MODELS))}.")
  if config.masked_head and config.model != "md4":
    raise ValueError(f"config.masked_head=True packs MD4's masked positions; model="
                     f"{config.model!r} scores per-token schedules and K masks, which it does "
                     "not implement: set it to False.")
  genmd4.check_config(config)


def build_model(config: ml_collections.ConfigDict) -> model_lib.MD4:
  """The diffusion model (MD4 or GenMD4, network from the registry) of the config."""
  check_model(config)
  return MODELS[config.model](config, networks.build_network(config))


@dataclasses.dataclass(eq=False)  # Hashed by identity (eval_step caches per K).
class Experiment:
  """What one config builds over one mesh.

  Attributes:
    config: the run config.
    mesh: the device mesh.
    rules: logical-axis -> mesh-axis rules (parameters and activations).
    model: the MD4 module.
    optimizer: the optax transformation; lr_schedule its learning rate.
    abstract_state: ShapeDtypeStructs (with shardings) of the TrainState.
  """

  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: parallel.Rules
  model: model_lib.MD4
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule
  abstract_state: state_lib.TrainState

  @property
  def state_shardings(self) -> Any:
    return jax.tree.map(lambda a: a.sharding, self.abstract_state)

  @property
  def num_params(self) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(self.abstract_state.params))

  def jit(self, fn: Callable, **jit_kwargs) -> Callable:
    """jax.jit(fn) traced inside the logical rules and the abstract mesh."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with parallel.logical_context(self.rules, self.mesh):
        return fn(*args, **kwargs)
    return jax.jit(traced, **jit_kwargs)

  def init_state(self) -> state_lib.TrainState:
    """A fresh TrainState, initialised directly in its shardings."""
    init = _init_fn(self.config, self.model, self.optimizer, self.mesh)
    with nn.logical_axis_rules(self.rules), backend.target(parallel.platform(self.mesh)):
      return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=self.state_shardings)(
          jax.random.key(self.config.seed))

  def restore(self, checkpointer, step: Optional[int] = None,
              data_iter: Any = None) -> state_lib.TrainState:
    """A verified checkpointed state in this mesh's shardings.

    checkpointer: a `checkpoint.Checkpointer`. step: exactly that checkpoint;
    None: the newest one that verifies (`restore_latest_good`). The data
    iterator, if given, is restored in place.
    """
    if step is None:
      return checkpointer.restore_latest_good(self.abstract_state, data_iter)
    return checkpointer.restore(self.abstract_state, data_iter, step=step)

  @functools.cached_property
  def train_step(self) -> Callable[[state_lib.TrainState, Any],
                                   tuple[state_lib.TrainState, dict[str, jax.Array]]]:
    """`(state, global batch) -> (state, metrics)`: jitted, the state donated."""
    config = self.config
    fn = functools.partial(step_lib.train_step, model=self.model, optimizer=self.optimizer,
                           lr_schedule=self.lr_schedule, ema_rate=config.ema_rate,
                           accum_steps=config.grad_accum_steps, skip_nonfinite=config.check_nans,
                           debug_nan_at_step=config.debug_nan_at_step,
                           label_dropout=config.label_dropout,
                           ema_warmup=config.ema_warmup)
    shardings = self.state_shardings
    return self.jit(fn, in_shardings=(shardings, parallel.batch_sharding(self.mesh)),
                    out_shardings=(shardings, parallel.replicated(self.mesh)), donate_argnums=0)

  @functools.cache  # pylint: disable=method-cache-max-size-none
  def eval_step(self, num_t_samples: int = 1) -> Callable[..., dict[str, jax.Array]]:
    """Jitted `(params, batch, rng) -> per-example NELBO terms` (see step.eval_step).

    Outputs are replicated float32 [B] arrays; K = num_t_samples time draws
    are averaged per example.
    """
    if num_t_samples < 1:
      raise ValueError(f"num_t_samples must be >= 1, got {num_t_samples}.")
    fn = functools.partial(step_lib.eval_step, model=self.model,
                           num_t_samples=int(num_t_samples))
    return self.jit(fn, in_shardings=(None, parallel.batch_sharding(self.mesh),
                                      parallel.replicated(self.mesh)),
                    out_shardings=parallel.replicated(self.mesh))

  def sampler(
      self, *, steps: Optional[int], sampler: sampling.SamplerLike = "ancestral",
      grid: str = "uniform", options: sampling.SamplerOptions = sampling.SamplerOptions(),
      t_start: float = 1.0, frames: int = 0,
  ) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """`sampling.sample` jitted over the mesh with the batch split across its batch axes.

    Returns:
      fn(variables, rng, z_init, cond=None) -> (tokens, stats): z_init
      [B, ...] (B divisible by the batch shards; see `sampling.all_masked` /
      `masked_input`) and cond [B] are batch-sharded, tokens come back
      batch-sharded, stats['nfe'] replicated, stats['frames'] sharded on its
      batch axis. variables keep the sharding they have (e.g. restored) or
      are placed by jit. `fn.jitted` allows ahead-of-time lowering.
    """
    sampling.check_arguments(sampler, steps, grid, options, t_start, frames)
    sampling.check_model(self.model, sampler)
    if options.guidance > 0 and self.config.label_dropout <= 0:
      raise ValueError(
          f"guidance={options.guidance} needs a class-conditional model trained with label "
          f"dropout (config.label_dropout > 0): this run has classes={self.config.classes}, "
          f"label_dropout={self.config.label_dropout}, so its null label was never trained.")
    mesh = self.mesh
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    stats_sharding = {"nfe": replicated}
    if frames:
      stats_sharding["frames"] = NamedSharding(mesh, P(None, parallel.BATCH_AXES))

    def fn(variables, rng, z_init, cond):
      return sampling.sample(self.model, variables, rng, z_init=z_init, cond=cond, steps=steps,
                             sampler=sampler, grid=grid, options=options, t_start=t_start,
                             frames=frames)

    jitted = self.jit(fn, in_shardings=(None, replicated, batch_sharding, batch_sharding),
                      out_shardings=(batch_sharding, stats_sharding))

    def call(variables, rng, z_init, cond=None):
      parallel.check_batch_size(int(z_init.shape[0]), mesh, "the sampling batch")
      return jitted(variables, rng, z_init, cond)

    call.jitted = jitted
    return call


def _init_fn(config, model, optimizer, mesh):
  return functools.partial(step_lib.init_state, model=model, optimizer=optimizer,
                           batch_size=parallel.batch_size_per_shard(mesh),
                           with_labels=config.classes > 0)


def setup(config: ml_collections.ConfigDict, mesh: Optional[Mesh] = None) -> Experiment:
  """Builds the experiment of `config` over `mesh` (default: the config's mesh).

  Shapes first, then shardings: the abstract state comes from `jax.eval_shape`
  and the logical rules, so nothing is allocated until `init_state` or
  `restore`.

  With config.masked_head the model packs one group of examples per batch
  shard of the mesh (MD4.head_groups).

  Raises:
    ValueError: a bad mesh, schedule, network or optimiser setting.
  """
  mesh = parallel.make_mesh(config.mesh) if mesh is None else mesh
  rules = sharding_rules(config)
  model = build_model(config)
  if config.masked_head:  # One packed group per batch shard: the gather stays on its device.
    groups = parallel.batch_size_per_shard(mesh)
    if config.batch_size % (groups * config.grad_accum_steps):
      raise ValueError(f"config.masked_head packs each of the {groups} batch shards' examples "
                       f"per microbatch: batch_size={config.batch_size} must be divisible by "
                       f"{groups} x grad_accum_steps={config.grad_accum_steps}.")
    model = model.clone(head_groups=groups)
  optimizer, lr_schedule = optimizer_lib.build_optimizer(config)
  with backend.target(parallel.platform(mesh)):  # Traced for the mesh's devices, as in init_state.
    boxed = jax.eval_shape(_init_fn(config, model, optimizer, mesh),
                           jax.random.key(config.seed))
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(boxed), shardings)
  return Experiment(config=config, mesh=mesh, rules=rules, model=model, optimizer=optimizer,
                    lr_schedule=lr_schedule, abstract_state=abstract_state)
