"""Every paper config builds the paper's network: parameter counts (compile-free, from
jax.eval_shape) pinned, within 1% of the MD4 reference implementation's own count, and
docs/paper_params.md is the table `benchmarks/paper_configs.py --write_table` writes."""

import importlib.util
import os

import pytest

# Tracing every paper-size network (no compile) takes ~15 s: the full suite's tier.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("paper_configs")]  # Counted once.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(REPO, "docs", "paper_params.md")

# md4_jax's counts, pinned: a change to a network's structure must show up here. A new
# config variant need not be added (its row is checked through docs/paper_params.md).
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


def _script():
  """benchmarks/paper_configs.py as a module (its flags are defined only when it runs)."""
  spec = importlib.util.spec_from_file_location(
      "paper_configs", os.path.join(REPO, "benchmarks", "paper_configs.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def script():
  return _script()


@pytest.fixture(scope="module")
def counts(script):
  return script.parameter_counts()


def test_paper_configs_build_the_papers_networks(script, counts):
  for key, ref in script.REFERENCE.items():
    assert abs(counts[key] / ref - 1) < 0.01, (key, counts[key], ref)


def test_parameter_counts_are_pinned(counts):
  assert {key: counts.get(key) for key in PINNED} == PINNED


def test_docs_table_is_the_one_the_script_writes(script, counts):
  with open(TABLE) as f:
    written = f.read()
  assert written == script.parameter_table(counts), (
      "docs/paper_params.md is stale; run "
      "`python benchmarks/paper_configs.py --write_table=docs/paper_params.md`")

