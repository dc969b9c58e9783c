"""Every paper config builds the paper's network: parameter counts (compile-free, from
jax.eval_shape) pinned, equal to the MD4 reference implementation's own count (recomputed here
layer by layer from its code's structure), and docs/paper_params.md is the table
`benchmarks/paper_configs.py --write_table` writes."""

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
    ("cifar10", ""): 28_427_520, ("cifar10", "wide_cond"): 36_390_784,
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
    assert counts[key] == ref, (key, counts[key], ref)


def _dense(n_in, n_out, bias=True):
  return n_in * n_out + (n_out if bias else 0)


def _conv(k, n_in, n_out):
  return k * k * n_in * n_out + n_out


def test_reference_counts_follow_from_its_layers(script):
  """The reference's counts, summed from the layers its code builds (md4/models/backward.py,
  md4/networks/transformer.py, unet.py, uvit.py, dit.py with the configs' sizes)."""
  def cond_embedding(e):  # Sinusoid(e) -> Dense(4e) -> swish -> Dense(e).
    return _dense(e, 4 * e) + _dense(4 * e, e)

  # text8: 64-dim embedding outside, Dense(64 -> 768), 12 blocks, adaLN-zero from the 64-wide c.
  d, hidden = 768, 2048  # int(2 * 4 * 768 / 3) rounded up to a multiple of 32.
  block = 4 * _dense(d, d, False) + 3 * _dense(d, hidden, False) + _dense(64, 6 * d)
  text8 = (cond_embedding(64) + 28 * 64 + _dense(64, d) + 12 * block + _dense(64, 2 * d)
           + _dense(d, 27, False))
  assert text8 == script.REFERENCE["text8", ""] == 88_734_272
  assert text8 + 27 == script.REFERENCE["text8", "genmd4"]  # GenMD4's per-token exponents.

  # CIFAR-10 UNet: GroupNorm(c) has 2c parameters; the middle attention is Flax's
  # MultiHeadDotProductAttention (q/k/v/out with biases).
  c = 128

  def res(n_in):  # GN, conv, Dense(c) shift without bias, GN, conv, Dense skip.
    return (2 * n_in + _conv(3, n_in, c) + _dense(c, c, False) + 2 * c + _conv(3, c, c)
            + (_dense(n_in, c) if n_in != c else 0))
  cifar = (cond_embedding(c) + 257 * c + _conv(3, 3 * c, c) + 32 * res(c)
           + 2 * res(c) + 2 * c + 4 * _dense(c, c) + 33 * res(2 * c)
           + 2 * c + _conv(3, c, 3 * 256))
  assert cifar == script.REFERENCE["cifar10", ""] == 28_427_520

  # ImageNet 64 UViT: conditional GroupNorms (Dense(2c) from c), DiT 768 wide on 2x2 patches.
  c, d = 256, 768

  def uvit_res(n_in):
    return (_dense(c, 2 * n_in) + _conv(3, n_in, c) + _dense(c, 2 * c) + _conv(3, c, c)
            + (_dense(n_in, c) if n_in != c else 0))
  dit_block = (_dense(c, 6 * d) + 3 * _dense(d, d) + _dense(d, d, False) + _dense(d, 4 * d)
               + _dense(4 * d, d))

  def uvit(n_res, n_dit):
    dit = (_conv(2, c, d) + 1024 * d + n_dit * dit_block + _dense(c, 2 * d)
           + _dense(d, 2 * 2 * c))
    return (cond_embedding(c) + 257 * c + _conv(3, 3 * c, c) + n_res * uvit_res(c) + dit
            + (n_res + 1) * uvit_res(2 * c) + _dense(c, 2 * c) + _conv(3, c, 3 * 256))
  assert uvit(8, 20) == script.REFERENCE["imagenet64", ""] == 204_595_712
  assert uvit(24, 12) == script.REFERENCE["imagenet64", "best_likelihood"] == 198_279_680


def test_parameter_counts_are_pinned(counts):
  assert {key: counts.get(key) for key in PINNED} == PINNED


def test_docs_table_is_the_one_the_script_writes(script, counts):
  with open(TABLE) as f:
    written = f.read()
  assert written == script.parameter_table(counts), (
      "docs/paper_params.md is stale; run "
      "`python benchmarks/paper_configs.py --write_table=docs/paper_params.md`")

