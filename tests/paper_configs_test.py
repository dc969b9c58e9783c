"""Every paper config builds the paper's network: parameter counts (compile-free, from
jax.eval_shape) pinned, within 1% of the MD4 reference implementation's own count, and
the README's parameter table is the one this test prints."""

import importlib
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from md4_jax.experiment import build

# Tracing every paper-size network (no compile) takes ~15 s: the full suite's tier.
pytestmark = pytest.mark.slow

CONFIGS = ("digits", "synthetic_text", "text8", "openwebtext", "fineweb_edu", "cifar10",
           "imagenet64")

# (config, variant) -> parameter count of the MD4 reference implementation's network for the
# same data shape and vocabulary (its configs: text8, openwebtext, cifar10, imagenet64 with
# n_layers = 8 / 24 and n_dit_layers = 20 / 12).
REFERENCE = {
    ("text8", ""): 88_734_272,
    ("openwebtext", ""): 165_857_344,
    ("fineweb_edu", ""): 165_857_344,
    ("cifar10", ""): 28_427_520,
    ("imagenet64", ""): 204_595_712,
    ("imagenet64", "best_likelihood"): 198_279_680,
}

# md4_jax's counts, pinned: a change to a network's structure must show up here.
PINNED = {
    ("digits", ""): 791_889, ("digits", "cond"): 793_297, ("digits", "genmd4"): 791_906,
    ("synthetic_text", ""): 332_616, ("synthetic_text", "order2"): 332_616,
    ("text8", ""): 88_734_272, ("text8", "genmd4"): 88_734_299,
    ("text8", "wide_cond"): 129_665_307,
    ("openwebtext", ""): 165_857_344, ("openwebtext", "medium"): 416_240_960,
    ("openwebtext", "genmd4"): 165_907_601, ("openwebtext", "wide_cond"): 207_458_641,
    ("fineweb_edu", ""): 165_857_344, ("fineweb_edu", "medium"): 416_240_960,
    ("fineweb_edu", "genmd4"): 165_907_601, ("fineweb_edu", "wide_cond"): 207_458_641,
    ("cifar10", ""): 28_427_008, ("cifar10", "wide_cond"): 36_390_784,
    ("imagenet64", ""): 204_595_712, ("imagenet64", "best_likelihood"): 198_279_680,
}


def num_params(config) -> int:
  """Parameters of the config's model (network + schedule parameters), without compiling."""
  model = build.build_model(config)
  x = jnp.zeros((1, *config.data_shape), jnp.int32)
  cond = jnp.zeros((1,), jnp.int32) if config.classes else None
  shapes = jax.eval_shape(
      lambda r: model.init({"params": r, "sample": r, "dropout": r}, x, cond), jax.random.key(0))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nn.meta.unbox(shapes["params"])))


def _variants():
  for name in CONFIGS:
    module = importlib.import_module(f"configs.{name}")
    for variant in module.VARIANTS:
      if "tiny" not in variant:  # Smoke-run sizes.
        yield name, variant, module.get_config(variant)


@pytest.fixture(scope="module")
def counts():
  return {(name, variant): num_params(config) for name, variant, config in _variants()}


def _label(name, variant):
  return f"`{name}.py{':' + variant if variant else ''}`"


def table(counts) -> str:
  """The README's parameter table (markdown rows)."""
  lines = ["| config | network | parameters | MD4 reference |", "|---|---|---|---|"]
  for name, variant, config in _variants():
    ref = REFERENCE.get((name, variant))
    ref_cell = "—" if ref is None else f"{ref / 1e6:.1f}M"
    lines.append(f"| {_label(name, variant)} | {config.network} | "
                 f"{counts[name, variant] / 1e6:.2f}M | {ref_cell} |")
  return "\n".join(lines)


def test_paper_configs_build_the_papers_networks(counts):
  for key, ref in REFERENCE.items():
    assert abs(counts[key] / ref - 1) < 0.01, (key, counts[key], ref)


def test_parameter_counts_are_pinned(counts):
  assert counts == PINNED


def test_readme_lists_the_counts_this_test_prints(counts):
  printed = table(counts)
  print("\n" + printed)
  readme = open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")).read()
  missing = [row for row in printed.splitlines()[2:] if row not in readme]
  assert not missing, "README parameter table is stale; rows to paste:\n" + printed
