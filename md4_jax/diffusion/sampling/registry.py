"""The samplers by name: one `register` line per sampler.

An entry is the sampler's default instance (`base.Sampler`); its fields are its
own options, set by `dataclasses.replace` or by its CLI flags (`from_flags`).
"""

from typing import Union

from md4_jax.diffusion.sampling import base
from md4_jax.diffusion.sampling import first_hitting
from md4_jax.diffusion.sampling import grid
from md4_jax.diffusion.sampling import ordered
from md4_jax.diffusion.sampling import remdm

SAMPLERS: dict[str, base.Sampler] = {}


def register(sampler: base.Sampler) -> base.Sampler:
  """Adds a sampler's default instance under its name; returns it.

  Raises:
    ValueError: no name, a name already taken, or a flag another sampler declares.
  """
  if not sampler.name:
    raise ValueError(f"{type(sampler).__name__} has no name: set the class attribute `name`.")
  if sampler.name in SAMPLERS:
    raise ValueError(f"A sampler named {sampler.name!r} is already registered.")
  taken = {f.name: other.name for other in SAMPLERS.values() for f in other.flags}
  for flag in sampler.flags:
    if flag.name in taken:
      raise ValueError(f"Sampler {sampler.name!r} declares --{flag.name}, which "
                       f"{taken[flag.name]!r} declares already; pick another flag name.")
  SAMPLERS[sampler.name] = sampler
  return sampler


def get(sampler: Union[str, base.Sampler]) -> base.Sampler:
  """The registered default instance of a name; a `Sampler` is returned as it is."""
  if isinstance(sampler, base.Sampler):
    return sampler
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}.")
  return SAMPLERS[sampler]


register(grid.Ancestral())
register(grid.TopP())
register(grid.Mean())
register(first_hitting.FirstHitting())
register(remdm.ReMDM())
register(ordered.Ordered())
