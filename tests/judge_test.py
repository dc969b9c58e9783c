"""Generative perplexity (md4_jax/metrics/judge.py) with a tiny judge built and fitted here.

The judge is a 2-layer GPT-2 (md4_jax/metrics/gpt2.py) with a byte-level BPE
tokenizer, both trained for a few seconds on a fixture text and saved as a
published GPT-2 is laid out: config.json, model.safetensors (GPT-2's names)
and tokenizer.json. One test checks that transformers' Flax GPT-2 reads the
same files into the same log-probabilities.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy

import helpers
from md4_jax.configs import synthetic_text
from md4_jax.metrics import gpt2
from md4_jax.metrics import judge as judge_lib

# The tiny judge is fitted once: these tests stay on one xdist worker.
pytestmark = pytest.mark.xdist_group("judge")

CONTEXT = 32


def fixture_text(n: int, seed: int) -> list[str]:
  """Sentences of a small grammar: predictable text for the judge to learn."""
  rng = np.random.default_rng(seed)
  subjects, verbs, objects = ["the cat", "a dog", "my friend"], ["sees", "likes"], [
      "the ball", "a tree", "the house"]
  return [" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                   for _ in range(rng.integers(2, 6))) for _ in range(n)]


def build_judge(directory: str) -> None:
  """Tokenizer + 2-layer GPT-2 fitted for 50 Adam steps on fixture_text, saved to directory."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  texts = fixture_text(200, seed=0)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  eos = tok.token_to_id("<|endoftext|>")
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = gpt2.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=CONTEXT, n_embd=32,
                           n_layer=2, n_head=2)
  model = gpt2.GPT2(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, CONTEXT), jnp.int32))
  stream = [t for text in texts for t in [eos] + tok.encode(text).ids]
  rows = np.array([stream[i:i + CONTEXT] for i in range(0, len(stream) - CONTEXT, CONTEXT)])

  def loss_fn(params, ids):
    logits = model.apply(params, ids)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, ids):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  for _ in range(50):
    params, opt_state, _ = step(params, opt_state, rows[rng.integers(0, len(rows), 16)])
  gpt2.save(directory, config, params["params"], bos_token_id=eos, eos_token_id=eos)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("judge"))
  build_judge(directory)
  return directory


@pytest.fixture(scope="module")
def judge(judge_dir):
  return judge_lib.Judge(judge_dir, batch_size=4)


def test_gen_ppl_is_finite_deterministic_and_lower_for_the_fixture_text(judge):
  texts = fixture_text(12, seed=1)  # Held-out sentences of the same grammar.
  first, again = judge.score(texts), judge.score(texts)
  assert first == again
  assert np.isfinite(first["gen_ppl"]) and first["gen_ppl"] > 1
  assert 0 < first["gen_ppl_stderr"] < first["gen_ppl"]
  rng = np.random.default_rng(0)
  vocab = judge.tokenizer.get_vocab_size()
  random_texts = [judge.tokenizer.decode(rng.integers(0, vocab - 1, 40).tolist())
                  for _ in range(12)]
  noise = judge.score(random_texts)
  # Fitted for seconds, the judge already finds its grammar far likelier than noise.
  assert first["gen_ppl"] * 5 < noise["gen_ppl"], (first, noise)


def test_every_token_is_scored_once_in_bos_led_chunks(judge):
  long_text = " ".join(fixture_text(6, seed=2))
  rows, owner = judge.rows([long_text, "the cat sees a tree."])
  ids = judge.tokenizer.encode(long_text, add_special_tokens=False).ids
  assert len(ids) > 2 * CONTEXT  # Several chunks.
  long_rows = [r for r, o in zip(rows, owner) if o == 0]
  assert all(r[0] == judge.bos_id and len(r) <= CONTEXT for r in long_rows)
  assert [t for r in long_rows for t in r[1:]] == ids
  assert judge.score([long_text])["judge_tokens"] == len(ids)


@pytest.mark.slow
def test_padded_batches_match_a_direct_unpadded_computation(judge):
  """Padding and batching do not change any row's NLL: compare with one row at a time."""
  texts = ["the cat sees the ball.", " ".join(fixture_text(2, seed=3)), "a dog likes"]
  rows, _ = judge.rows(texts)
  assert len(rows) > len(texts) and len(set(map(len, rows))) > 2  # Chunks of unequal lengths.
  logits_fn = jax.jit(lambda params, ids: judge.model.apply({"params": params}, ids))
  total, tokens = 0.0, 0
  for row in rows:
    ids = jnp.asarray([row])
    logits = logits_fn(judge.params, ids)[0, :-1]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    total -= float(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1).sum())
    tokens += len(row) - 1
  result = judge.score(texts)
  assert result["judge_tokens"] == tokens
  assert result["gen_ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-4)


def test_no_tokens_is_a_clear_error(judge):
  with pytest.raises(ValueError, match="no judge tokens"):
    judge.score(["", ""])


@pytest.mark.slow
def test_sample_cli_reports_gen_ppl_next_to_the_entropy(tmp_path, judge_dir):
  config = synthetic_text.get_config("tiny")
  workdir = tmp_path / "run"
  helpers.saved_workdir(workdir, config, step=3)
  result = helpers.run_module("md4_jax.sample", f"--workdir={workdir}", "--num_samples=4",
                              "--steps=4", f"--judge={judge_dir}", "--judge_batch_size=2")
  assert result.returncode == 0, result.stderr[-3000:]
  [path] = [p for p in os.listdir(workdir / "samples") if p.endswith(".json")]
  info = json.loads((workdir / "samples" / path).read_text())
  assert info["judge"] == judge_dir and info["judge_tokens"] > 0
  assert np.isfinite(info["gen_ppl"]) and info["gen_ppl"] > 1
  assert "Generative perplexity under" in result.stdout and "unigram entropy" in result.stdout


def random_gpt2(directory, **extra_config) -> gpt2.GPT2Config:
  """A tiny GPT-2 with random weights everywhere (LayerNorms and biases too), saved."""
  config = gpt2.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=3)
  params = gpt2.GPT2(config).init(jax.random.PRNGKey(1), jnp.zeros((1, 1), jnp.int32))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  gpt2.save(str(directory), config, jax.tree.unflatten(treedef, leaves), **extra_config)
  return config


@pytest.mark.slow
def test_our_gpt2_and_transformers_flax_gpt2_give_the_same_log_probs(tmp_path):
  """Both read the same published-layout files; padded keys are masked in both."""
  try:
    from transformers import FlaxGPT2LMHeadModel  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("transformers' Flax GPT-2 (transformers < 5) is not installed")
  config = random_gpt2(tmp_path)
  ids_BxT = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
  mask_BxT = np.ones_like(ids_BxT)
  mask_BxT[1, 11:] = 0
  ours_config, params = gpt2.load(str(tmp_path))
  ours = jax.nn.log_softmax(gpt2.GPT2(ours_config).apply({"params": params}, ids_BxT, mask_BxT))
  # (Reading PyTorch-named safetensors needs transformers' eager random init first: slow.)
  theirs_model = FlaxGPT2LMHeadModel.from_pretrained(str(tmp_path))
  theirs = jax.nn.log_softmax(theirs_model(ids_BxT, attention_mask=mask_BxT).logits)
  real = mask_BxT.astype(bool)
  assert float(jnp.std(ours[real])) > 1  # Far from uniform: the random weights matter.
  np.testing.assert_allclose(ours[real], theirs[real], atol=2e-5, rtol=0)


def test_the_loader_takes_a_prefix_buffers_and_a_tied_head_and_names_what_is_missing(tmp_path):
  random_gpt2(tmp_path)
  path = str(tmp_path / "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  _, plain = gpt2.load(str(tmp_path))
  prefixed = {f"transformer.{k}": v for k, v in tensors.items()}
  prefixed["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
  prefixed["lm_head.weight"] = tensors["wte.weight"]
  safetensors.numpy.save_file(prefixed, path)
  _, loaded = gpt2.load(str(tmp_path))
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, plain))
  del prefixed["transformer.h.1.mlp.c_fc.weight"]
  safetensors.numpy.save_file(prefixed, path)
  with pytest.raises(ValueError, match=r"lacks 1 weights, e.g. h\.1\.mlp\.c_fc\.weight"):
    gpt2.load(str(tmp_path))


def test_a_judge_neither_local_nor_fetchable_is_one_clear_error(tmp_path, monkeypatch):
  # No network call where huggingface_hub is first imported here; the name exists nowhere anyway.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(OSError, match="'nobody/no-such-judge' is not a local directory and could "
                     "not be fetched"):
    judge_lib.Judge("nobody/no-such-judge")
  with pytest.raises(FileNotFoundError, match="No judge directory"):
    judge_lib.Judge(str(tmp_path / "missing" / "dir"))
