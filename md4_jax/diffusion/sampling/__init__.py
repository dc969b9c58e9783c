"""Reverse-chain samplers for MD4, one file per chain; see docs/sampling.md.

  draws.py          exact 48-bit uniforms and Gumbel noise, categorical, top-p, guidance
  base.py           SamplerOptions (shared), Sampler (a registry entry), Flag, Chain, grids
  grid.py           ancestral, topp, mean: the MD4 grid step with idle-step caching,
                    and the reference float32 step (exact=False)
  per_token.py      GenMD4's chain (a schedule per token value), run by the grid samplers
  first_hitting.py  one network call per revealed token, no grid
  remdm.py          ReMDM remasking
  ordered.py        confidence-ordered (MaskGIT-style) unmasking
  registry.py       name -> Sampler: one `register` line per sampler
  driver.py         sample / reconstruct / checks, for any registered sampler
  command.py        what md4_jax.sample takes from the registry: flags, file stem, JSON fields
"""

from md4_jax.diffusion.sampling import command
from md4_jax.diffusion.sampling.base import GRIDS
from md4_jax.diffusion.sampling.base import Flag
from md4_jax.diffusion.sampling.base import Sampler
from md4_jax.diffusion.sampling.base import SamplerOptions
from md4_jax.diffusion.sampling.base import time_grid
from md4_jax.diffusion.sampling.driver import SamplerLike
from md4_jax.diffusion.sampling.driver import all_masked
from md4_jax.diffusion.sampling.driver import check_arguments
from md4_jax.diffusion.sampling.driver import check_model
from md4_jax.diffusion.sampling.driver import class_labels
from md4_jax.diffusion.sampling.driver import configure
from md4_jax.diffusion.sampling.driver import masked_input
from md4_jax.diffusion.sampling.driver import reconstruct
from md4_jax.diffusion.sampling.driver import sample
from md4_jax.diffusion.sampling.registry import SAMPLERS
from md4_jax.diffusion.sampling.registry import get
from md4_jax.diffusion.sampling.registry import register
