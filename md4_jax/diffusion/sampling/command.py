"""What the `md4_jax.sample` command takes from the registry: the samplers' flags, the
configured sampler, the output file stem and the JSON fields. No sampler is named here;
no flag is defined at import (md4_jax/sample.py calls `define_flags` once).
"""

from typing import Optional

from absl import flags

from md4_jax.diffusion.sampling import base
from md4_jax.diffusion.sampling import registry


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--sampler, and the flags every registered sampler declares (`Sampler.flags`)."""
  flags.DEFINE_enum("sampler", "ancestral", sorted(registry.SAMPLERS), "Sampler.",
                    flag_values=flag_values)
  for entry in registry.SAMPLERS.values():
    for flag in entry.flags:
      define = getattr(flags, f"DEFINE_{flag.kind}")
      extra = {"enum_values": list(flag.choices)} if flag.kind == "enum" else {}
      define(name=flag.name, default=flag.default, help=flag.help, flag_values=flag_values,
             **extra)


def sampler_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> base.Sampler:
  """The --sampler entry with the fields its own flags set."""
  entry = registry.get(flag_values["sampler"].value)
  return entry.from_flags({f.name: flag_values[f.name].value for f in entry.flags})


def output_stem(step: int, sampler: base.Sampler, steps: int, seed: int,
                label: Optional[int]) -> str:
  """The output files' name without extension, e.g. ckpt00001000_remdm_cap0.02_256steps_seed0."""
  name = (f"ckpt{step:08d}_{sampler.name}_" + sampler.file_tag()
          + (f"{steps}steps_" if sampler.on_grid else ""))
  return name + f"seed{seed}" + (f"_label{label}" if label is not None else "")


def sampler_info(sampler: base.Sampler, steps: int, grid: str, options: base.SamplerOptions,
                 per_token_schedule: bool) -> dict:
  """The JSON fields that describe the sampler and its options."""
  return {
      "sampler": sampler.name, "grid": grid, "steps": steps if sampler.on_grid else None,
      "temperature": options.temperature, "exact": options.exact, **sampler.json_fields(),
      "guidance": options.guidance,
      # GenMD4 calls the network at every step: idle-step skipping does not apply.
      "cache": options.cache and not per_token_schedule,
  }
