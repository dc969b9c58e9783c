"""What every chain shares: the shared options, the `Sampler` entry, its CLI `Flag`s,
the `Chain` context (network, keys, frames) and the time grids.

Shapes: B batch, D positions of one example (the flattened data_shape), V
vocabulary, N grid steps, K recorded frames; the mask id is V.

Randomness: every draw of example b comes from fold_in(rng, b), then a stream
id (below) and the step or call index, so results do not depend on the batch
size, the position of the example in the batch, the device mesh, or on whether
a step called the network.
"""

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Optional

import jax
import jax.numpy as jnp

from md4_jax.diffusion.sampling import draws

# Random stream ids folded into each example's key (a new chain reuses them).
REVEAL, TOKEN, TIME, POSITION, REFERENCE, REMASK, EXTRA_REVEAL, CLOCK = range(8)
GRIDS = ("uniform", "cosine")


# Below this temperature logits / temperature overflow float32 (1e-45 makes every logit inf);
# the limit of the tempered distribution, the argmax, is computed instead.
MIN_TEMPERATURE = 1e-6


def temper(logits: jax.Array, temperature: float) -> jax.Array:
  """float32 logits / temperature; for 0 < temperature < MIN_TEMPERATURE the τ -> 0 limit:
  the argmax (ties kept) at 0 and every other token at -1e30, so any draw returns an argmax."""
  logits = logits.astype(jnp.float32)
  if 0 < temperature < MIN_TEMPERATURE:
    return jnp.where(logits >= logits.max(axis=-1, keepdims=True), 0.0, -1e30)
  return logits / temperature


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """Options every sampler shares (hashable: pass it as a static argument).

  A sampler's own options (top_p, eta, order, ...) are fields of its registry
  entry (`Sampler`), not of this record.

  Attributes:
    temperature: logits are divided by this (> 0; 0 = argmax tokens, for the
      samplers whose entry allows it) before a token is drawn. Below
      MIN_TEMPERATURE every sampler draws the argmax (`temper`).
    exact: 48-bit exact reveal coins and Gumbel noise (see draws.py);
      False: the reference MD4 float32 step (biased against rare tokens;
      every step calls the network, `cache` does not apply).
    cache: grid samplers call the network only at steps where an example
      reveals a token (same samples as False for the same rng; fewer calls).
      Refused by samplers whose network runs at every step (`Sampler.caches`).
    guidance: classifier-free guidance weight w for class-conditional
      models trained with label dropout: the prediction becomes
      (1 + w)·log p(x | c) − w·log p(x | null label), both from one batched
      network call (`draws.guided_logits`); 0 = the conditional model.
  """

  temperature: float = 1.0
  exact: bool = True
  cache: bool = True
  guidance: float = 0.0


@dataclasses.dataclass(frozen=True)
class Flag:
  """A CLI flag a sampler declares; `--name` sets the entry's field `name`.

  Attributes:
    name: the flag, and the field of the sampler it sets.
    kind: absl's DEFINE_<kind>: 'float', 'integer', 'bool', 'string', 'enum' or 'list'.
    default: the flag's default as the command line spells it.
    help: one line; say which sampler reads it.
    choices: the valid values of an 'enum' flag.
    parse: flag value -> field value (default: unchanged).
  """

  name: str
  kind: str
  default: Any
  help: str
  choices: tuple[str, ...] = ()
  parse: Callable[[Any], Any] = lambda value: value


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registry entry: one reverse chain, its own options (the dataclass fields of a
  subclass), its checks, its CLI flags and its output tags.

  Class attributes (facts about the chain, not options):
    name: the registry name (--sampler, file names, JSON).
    flags: the CLI flags that set its fields.
    on_grid: it walks a time grid (`steps` and `grid` apply); False: it picks
      its own times (`steps` is ignored, the file name and JSON have no steps).
    per_token: exact for GenMD4's schedule per token value.
    caches: `SamplerOptions.cache` applies (False: the network runs at every
      step, and cache=True is refused).
    argmax_at_zero_temperature: temperature 0 is allowed (argmax tokens).
  """

  name: ClassVar[str] = ""
  flags: ClassVar[tuple[Flag, ...]] = ()
  on_grid: ClassVar[bool] = True
  per_token: ClassVar[bool] = False
  caches: ClassVar[bool] = True
  argmax_at_zero_temperature: ClassVar[bool] = False

  def check(self, t_start: float) -> None:
    """Raises ValueError for an option of this sampler that it cannot run with."""
    del t_start

  def token_logits(self, logits: jax.Array) -> jax.Array:
    """The logits tokens are drawn from, given tempered logits [..., V]."""
    return logits

  def file_tag(self) -> str:
    """Inserted after the sampler's name in output file names ('' or ending in '_')."""
    return ""

  def json_fields(self) -> dict[str, Any]:
    """The options recorded in the CLI's JSON file."""
    return {}

  def from_flags(self, values: Mapping[str, Any]) -> "Sampler":
    """This sampler with the fields its flags set (values: flag name -> value)."""
    return dataclasses.replace(self, **{f.name: f.parse(values[f.name]) for f in self.flags})

  def run(self, chain: "Chain", z_BxD: jax.Array, frames: Optional[jax.Array]):
    """Runs the chain from z (mask id = generate).

    Args:
      chain: the network, schedule, keys, options and grid (`Chain`).
      z_BxD: int32 start.
      frames: int32 [K, B, D] trajectory to fill (`Chain.record`), or None.

    Returns:
      (z_BxD with no mask left, nfe int32 scalar, frames or None).
    """
    raise NotImplementedError


def time_grid(name: str, steps: int) -> jax.Array:
  """t_i for i = 0..steps (t_0 = 0, t_steps = 1); the chain walks it backwards."""
  i = jnp.arange(steps + 1, dtype=jnp.float32) / steps
  if name == "uniform":
    return i
  if name == "cosine":  # Clipped: float32 cos(π/2) is −4e-8, and polyK needs t ≥ 0.
    return jnp.clip(jnp.cos(math.pi / 2 * (1.0 - i)), 0.0, 1.0)
  raise ValueError(f"Unknown time grid {name!r}; valid: 'uniform', 'cosine'.")


def still_masked_fraction(alpha: jax.Array) -> jax.Array:
  """r_j = (1 − α_j)/(1 − α_N) on a grid t_0 < ... < t_N: the probability that a
  position masked at t_N is still masked at t_j. [N + 1], r_N = 1, non-decreasing
  (cummax: float rounding must not reverse the order)."""
  return jax.lax.cummax((1.0 - alpha) / (1.0 - alpha[-1]))


def example_keys(rng: jax.Array, batch: int) -> jax.Array:
  """Key of example b = fold_in(rng, b): [B] keys."""
  return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch, dtype=jnp.uint32))


@dataclasses.dataclass(frozen=True)
class Chain:
  """What a chain needs besides z: the network, the model, keys, options, the grid.

  Attributes:
    predict: (z_BxD, t_B) -> logits_BxDxV (guidance already applied).
    model: the MD4 module (schedule, mask id, GenMD4's `powers`).
    variables: its variables.
    keys_B: the examples' keys.
    options: the shared options.
    sampler: the entry being run (its `token_logits`).
    ts: the grid t_0 = 0 < ... < t_N = t_start (on-grid samplers), else None.
    t_start: the time z starts at.
    frame_times_K: τ_k of the recorded frames, or None.
  """

  predict: Callable[[jax.Array, jax.Array], jax.Array]
  model: Any
  variables: Any
  keys_B: jax.Array
  options: SamplerOptions
  sampler: Sampler
  ts: Optional[jax.Array]
  t_start: float
  frame_times_K: Optional[jax.Array]

  @property
  def schedule(self):
    return self.model.schedule

  @property
  def mask_id(self) -> int:
    return self.model.mask_id

  def keys(self, stream: int, index_B: jax.Array) -> jax.Array:
    """fold_in(fold_in(key_b, stream), index_b) for every example: [B] keys."""
    return jax.vmap(lambda k, i: jax.random.fold_in(jax.random.fold_in(k, stream), i))(
        self.keys_B, index_B.astype(jnp.uint32))

  def tempered(self, logits: jax.Array) -> jax.Array:
    """float32 logits / temperature, then the sampler's `token_logits`."""
    return self.sampler.token_logits(temper(logits, self.options.temperature))

  def draw_tokens(self, logits, stream: int, index_B) -> jax.Array:
    """Per-example draws from the (tempered, truncated) logits [B, ..., V]."""
    logits = self.tempered(logits)
    keys = self.keys(stream, index_B)
    return jax.vmap(lambda k, l: draws.categorical(k, l, self.options.exact))(keys, logits)

  def uniforms(self, stream: int, index_B, shape) -> jax.Array:
    """Per-example U[0, 1) [B, *shape] (48-bit if exact)."""
    keys = self.keys(stream, index_B)
    draw = draws.fine_uniform if self.options.exact else (lambda k, s: jax.random.uniform(k, s))
    return jax.vmap(lambda k: draw(k, shape))(keys)

  def record(self, frames, z_BxD, lo_B, hi_B, active_B):
    """Writes z into the frames whose time τ lies in (lo_b, hi_b] (active examples).

    Frame k holds the state at τ_k: every reveal at a time ≥ τ_k has happened.
    Callers pass, before a reveal at time lo, the time hi of the previous one.
    """
    if frames is None:
      return None
    tau = self.frame_times_K[:, None]
    inside_KxB = (tau > lo_B[None]) & (tau <= hi_B[None]) & active_B[None]
    return jnp.where(inside_KxB[..., None], z_BxD[None], frames)

  def finish_frames(self, frames, z_BxD, last_B):
    """Frames at or after the last reveal (τ ≤ last_b) show the final tokens."""
    if frames is None:
      return None
    inside_KxB = self.frame_times_K[:, None] <= last_B[None]
    return jnp.where(inside_KxB[..., None], z_BxD[None], frames)
