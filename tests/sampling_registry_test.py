"""The sampler registry: every entry is complete and self-consistent, and a sampler
defined here (one file's worth of code) runs through `sample` and the CLI's plumbing
(flags, file name, JSON fields) with no other change.

Nothing here lists the registered samplers: a legitimate addition must pass.
"""

import dataclasses
import types
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import helpers
from md4_jax.diffusion import sampling
from md4_jax.diffusion.sampling import base
from md4_jax.diffusion.sampling import command
from md4_jax.diffusion.sampling import registry

V, L = 5, 6
_SHARED_JSON = set(command.sampler_info(base.Sampler(), 8, "uniform", sampling.SamplerOptions(),
                                        False))


@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_every_entry_is_complete_and_self_consistent(name):
  entry = sampling.SAMPLERS[name]
  cli_flags = flags.FlagValues()
  command.define_flags(cli_flags)  # As md4_jax.sample does.
  assert entry.name == name and sampling.get(name) is entry
  hash(entry)  # A static jit argument.
  fields = {f.name for f in dataclasses.fields(entry)}
  for flag in entry.flags:
    # Declared flags set fields, are defined by the CLI with their declared default,
    # and the defaults agree with the entry's.
    assert flag.name in fields, (name, flag.name)
    assert cli_flags[flag.name].default == flag.default, (name, flag.name)
  assert entry.from_flags({f.name: f.default for f in entry.flags}) == entry
  # The entry runs with its defaults, and records its own options beside the shared ones.
  sampling.check_arguments(entry, 4, "uniform", sampling.SamplerOptions(cache=entry.caches))
  assert not set(entry.json_fields()) & _SHARED_JSON, entry.json_fields()
  assert entry.file_tag() == "" or entry.file_tag().endswith("_")
  # Its checks refuse a bad option: a value outside an enum flag's choices,
  for flag in entry.flags:
    if flag.choices:
      with pytest.raises(ValueError, match="Unknown"):
        sampling.check_arguments(dataclasses.replace(entry, **{flag.name: "nonsense"}), 4,
                                 "uniform", sampling.SamplerOptions(cache=entry.caches))
  # caching where the chain runs every step, argmax where it draws,
  if not entry.caches:
    with pytest.raises(ValueError, match="caching does not apply"):
      sampling.check_arguments(entry, 4, "uniform", sampling.SamplerOptions(cache=True))
  if not entry.argmax_at_zero_temperature:
    with pytest.raises(ValueError, match="temperature 0"):
      sampling.check_arguments(entry, 4, "uniform",
                               sampling.SamplerOptions(cache=entry.caches, temperature=0.0))
  # no steps on a grid, and GenMD4 where it is not exact.
  if entry.on_grid:
    with pytest.raises(ValueError, match="steps"):
      sampling.check_arguments(entry, None, "uniform", sampling.SamplerOptions(cache=entry.caches))
  genmd4_like = types.SimpleNamespace(per_token_schedule=True)
  if entry.per_token:
    sampling.check_model(genmd4_like, entry)
  else:
    with pytest.raises(ValueError, match="not exact for GenMD4"):
      sampling.check_model(genmd4_like, entry)


def test_registry_tags_and_flags_are_unique():
  entries = list(sampling.SAMPLERS.values())
  stems = {command.output_stem(1, e, 8, 0, None) for e in entries}
  assert len(stems) == len(entries)
  declared = [f.name for e in entries for f in e.flags]
  assert len(declared) == len(set(declared))
  with pytest.raises(ValueError, match="already registered"):
    sampling.register(entries[0])
  if declared:  # A flag another entry declares is refused.
    owner = next(e for e in entries if e.flags)

    @dataclasses.dataclass(frozen=True)
    class Clash(base.Sampler):
      name: ClassVar[str] = "clash"
      flags: ClassVar[tuple[base.Flag, ...]] = owner.flags[:1]

    with pytest.raises(ValueError, match="declares already"):
      sampling.register(Clash())
    assert "clash" not in sampling.SAMPLERS


# ------------------------------------- a sampler added in one file's worth ---


@dataclasses.dataclass(frozen=True)
class OneShot(base.Sampler):
  """Reveals every masked position in one network call at time `oneshot_t`."""

  name: ClassVar[str] = "oneshot"
  on_grid: ClassVar[bool] = False
  flags: ClassVar[tuple[base.Flag, ...]] = (
      base.Flag("oneshot_t", "float", 1.0, "oneshot: the time the network sees."),)
  oneshot_t: float = 1.0

  def check(self, t_start):
    if not 0 < self.oneshot_t <= t_start:
      raise ValueError(f"oneshot_t must lie in (0, t_start], got {self.oneshot_t}.")

  def file_tag(self):
    return f"t{self.oneshot_t:g}_"

  def json_fields(self):
    return {"oneshot_t": self.oneshot_t}

  def run(self, chain, z_BxD, frames):
    batch = z_BxD.shape[0]
    t_B = jnp.full((batch,), self.oneshot_t, jnp.float32)
    tokens = chain.draw_tokens(chain.predict(z_BxD, t_B), base.TOKEN, jnp.zeros((batch,)))
    z_BxD = jnp.where(z_BxD == chain.mask_id, tokens, z_BxD)
    return z_BxD, jnp.int32(1), chain.finish_frames(frames, z_BxD, t_B)


class TimeToken(nn.Module):
  """Predicts token round(t·(V − 1)) everywhere, surely: the tokens show the time seen."""

  vocab_size: int

  @nn.compact
  def __call__(self, z, t, cond=None, train=False):
    del cond, train
    scale = self.param("scale", nn.initializers.constant(40.0), ())
    token = jnp.round(t * (self.vocab_size - 1)).astype(jnp.int32)
    return jnp.broadcast_to(scale * jax.nn.one_hot(token, self.vocab_size)[:, None],
                            z.shape + (self.vocab_size,))


@pytest.fixture
def oneshot():
  sampling.register(OneShot())  # The one registry line.
  yield
  registry.SAMPLERS.pop("oneshot")


def test_a_sampler_added_in_one_file_runs_through_sample_and_the_cli(oneshot):
  del oneshot
  flag_values = flags.FlagValues()
  command.define_flags(flag_values)
  flag_values(["sample", "--sampler=oneshot", "--oneshot_t=0.5"])
  sampler = command.sampler_from_flags(flag_values)
  assert sampler == OneShot(oneshot_t=0.5)
  assert command.output_stem(7, sampler, 16, 0, 3) == "ckpt00000007_oneshot_t0.5_seed0_label3"
  info = command.sampler_info(sampler, 16, "uniform", sampling.SamplerOptions(), False)
  assert info["sampler"] == "oneshot" and info["oneshot_t"] == 0.5 and info["steps"] is None

  model = helpers.md4(TimeToken(V), "linear", V, (L,))
  variables = {"params": {"network": {"scale": jnp.float32(40.0)}}}
  z = np.full((3, L), V, np.int32)
  z[:, 0] = 1  # A prompt token.
  fn = jax.jit(lambda v, r, z: sampling.sample(model, v, r, z_init=z, steps=None,
                                               sampler=sampler, frames=3))
  tokens, stats = fn(variables, jax.random.key(0), z)
  want = np.full((3, L), 2)  # round(0.5·4): the flag's time reached the network.
  want[:, 0] = 1
  np.testing.assert_array_equal(tokens, want)
  assert int(stats["nfe"]) == 1
  np.testing.assert_array_equal(stats["frames"][0], z)  # τ = 1 > 0.5: before the reveal.
  np.testing.assert_array_equal(stats["frames"][-1], want)
  with pytest.raises(ValueError, match="oneshot_t must"):
    sampling.sample(model, variables, jax.random.key(0), z_init=z, steps=None,
                    sampler=OneShot(oneshot_t=0.0))
