"""Reading a run back from its workdir: the saved config and the latest state.

Used by the sampling and evaluation CLIs and by notebooks:

  config, model, state = workdir.restore_run("/tmp/md4_digits")
"""

from typing import Optional

import ml_collections
from jax.sharding import Mesh

from md4_jax import checkpoint as checkpoint_lib
from md4_jax import optim
from md4_jax import parallel
from md4_jax import run_config
from md4_jax.diffusion import model as model_lib
from md4_jax.train import build
from md4_jax.train import state as state_lib

load_config = run_config.load_config


def restore_run(
    workdir: str, step: Optional[int] = None, mesh: Optional[Mesh] = None,
) -> tuple[ml_collections.ConfigDict, model_lib.MD4, state_lib.TrainState]:
  """Config, model and TrainState of the latest (or `step`) checkpoint.

  The state is restored onto `mesh` (default: all local devices, data axis),
  whatever mesh it was saved from.
  """
  config = load_config(workdir)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(workdir), read_only=True)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(
        f"No checkpoint under {checkpoint_lib.checkpoint_dir(workdir)!r}; train first or check "
        "--workdir.")
  mesh = mesh or parallel.make_mesh({"data": -1})
  model = build.build_model(config)
  optimizer, _ = optim.build_optimizer(config)
  abstract = build.abstract_train_state(config, model, optimizer, mesh)
  state = ckpt.restore(abstract, step=step)
  ckpt.close()
  return config, model, state
