"""Zero-shot evaluation sets: each detokenizer on known pairs, and the two packing protocols."""

import numpy as np
import pytest

from md4_jax.data import zero_shot


@pytest.mark.parametrize("raw,want", [
    (" = = Early life = = \n", " == Early life ==\n"),  # WikiText lines end in " \n".
    ("a 1 @,@ 000 @-@ strong army , built in 3 @.@ 5 years . \n",
     "a 1,000-strong army, built in 3.5 years.\n"),
    ("the king 's men ( and women ) said \" no \" ; then : go ! \n",
     "the king's men (and women) said \"no\"; then: go!\n"),
    ("the players ' union", "the players' union"),
    ("it was 15 \N{DEGREE SIGN} C \nnext", "it was 15\N{DEGREE SIGN}C\nnext"),
])
def test_wikitext(raw, want):
  assert zero_shot.wikitext(raw) == want


@pytest.mark.parametrize("raw,want", [
    ("the company 's shares did n't rise", "the company's shares didn't rise"),
    ("a N % gain to $ N million", "a 1 % gain to $1 million"),
    ("N N N items", "N 1 1 items"),  # Only " N " between spaces is a number.
    ("the <unk> and\\/or the investors ' money", "the ? and/or the investors' money"),
])
def test_ptb(raw, want):
  assert zero_shot.ptb(raw) == want


def test_lambada():
  raw = "  \N{LEFT DOUBLE QUOTATION MARK}Hello,\N{RIGHT DOUBLE QUOTATION MARK} she said  "
  assert zero_shot.lambada(raw) == '\n"Hello," she said'


@pytest.mark.parametrize("raw,want", [
    ("see http : / / example.com now", "see http://example.com now"),
    ("it 's a dog , he said : yes ; no ! really ?", "it's a dog, he said: yes; no! really?"),
    ("they paid $ 20 for it .", "they paid $20 for it."),
    ("he said \" go home \" today", "he said \"go home\" today"),
    ("we do n't know", "we don't know"),
])
def test_lm1b(raw, want):
  assert zero_shot.lm1b(raw) == want


def test_every_table_set_has_a_detokenizer():
  assert set(zero_shot.DETOKENIZERS) == {"lambada", "wikitext2", "wikitext103", "ptb", "lm1b"}


EOS = 99


def test_join_protocol_counts_and_eos_placement():
  docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # Stream: 1 2 3 E 4 5 E 6 7 8 9 E (12 tokens).
  blocks = zero_shot.pack(docs, 5, EOS)
  np.testing.assert_array_equal(blocks, [[1, 2, 3, EOS, 4], [5, EOS, 6, 7, 8]])  # 9 E dropped.
  assert blocks.dtype == np.int32
  np.testing.assert_array_equal(zero_shot.pack(docs, 4, EOS),
                                [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, EOS]])


def test_bos_eos_protocol_wraps_every_block():
  docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
  blocks = zero_shot.pack(docs, 5, EOS, protocol="bos_eos", bos=98)
  # Pieces of 3: [1 2 3] [E 4 5] [E 6 7] [8 9 E]; each as BOS piece EOS.
  np.testing.assert_array_equal(blocks, [[98, 1, 2, 3, EOS], [98, EOS, 4, 5, EOS],
                                         [98, EOS, 6, 7, EOS], [98, 8, 9, EOS, EOS]])
  assert zero_shot.pack(docs, 5, EOS, protocol="bos_eos")[0, 0] == EOS  # GPT-2: BOS = EOS.


def test_a_split_too_short_for_one_block_is_an_error():
  with pytest.raises(ValueError, match="ptb/test has 7 tokens.*fewer than one block of 1024"):
    zero_shot.pack([[1, 2], [3, 4, 5]], 1024, EOS, name="ptb/test")
  with pytest.raises(ValueError, match="Unknown packing protocol"):
    zero_shot.pack([[1]], 4, EOS, protocol="wrap")
  with pytest.raises(ValueError, match="no room"):
    zero_shot.pack([[1]], 2, EOS, protocol="bos_eos")


# ------------------------------------------- raw files, prepare, evaluate ---

import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tarfile  # noqa: E402
import zipfile  # noqa: E402

import helpers  # noqa: E402
from md4_jax.configs import openwebtext  # noqa: E402
from md4_jax import data  # noqa: E402
from md4_jax import evaluate  # noqa: E402
from md4_jax.experiment import validation  # noqa: E402
from md4_jax.run import saved_config  # noqa: E402
from md4_jax.data import prepare  # noqa: E402
from md4_jax.data import tokenized  # noqa: E402

WIKI = " = Robert = \n\n Robert is a 1 @,@ 000 @-@ year old actor . \n\n = = Career = = \n"
PTB = " the company 's shares did n't rise \n a N % gain \n"
LAMBADA = ['{"text": "\\u201cHi,\\u201d she said"}', '{"text": "no quotes here"}']
LM1B = "it 's a dog , he said .\nwe do n't know\n"


def write_raw(tmp_path):
  """Each set's test file in the form it ships in: jsonl, zip member, text, tar.gz member."""
  paths = {"lambada": tmp_path / "lambada_test.jsonl", "ptb": tmp_path / "ptb.test.txt",
           "wikitext2": tmp_path / "wikitext-2-raw-v1.zip",
           "lm1b": tmp_path / "1-billion-word.tar.gz"}
  paths["lambada"].write_text("\n".join(LAMBADA) + "\n")
  paths["ptb"].write_text(PTB)
  with zipfile.ZipFile(paths["wikitext2"], "w") as z:
    z.writestr("wikitext-2-raw/wiki.train.raw", "not the test split")
    z.writestr("wikitext-2-raw/wiki.test.raw", WIKI)
  with tarfile.open(paths["lm1b"], "w:gz") as t:
    data_bytes = LM1B.encode()
    info = tarfile.TarInfo("1-billion-word-language-modeling-benchmark-r13output/"
                           "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050")
    info.size = len(data_bytes)
    t.addfile(info, io.BytesIO(data_bytes))
  return paths


def test_documents_are_read_from_each_sets_file_or_archive(tmp_path):
  paths = write_raw(tmp_path)
  docs = {name: zero_shot.documents(zero_shot.SETS[name],
                                    zero_shot.read_text(zero_shot.SETS[name], str(path)))
          for name, path in paths.items()}
  assert docs["lambada"] == ["\N{LEFT DOUBLE QUOTATION MARK}Hi,\N{RIGHT DOUBLE QUOTATION MARK} "
                             "she said", "no quotes here"]
  assert docs["ptb"] == [" the company 's shares did n't rise ", " a N % gain "]
  # WikiText: one document per line as the Hugging Face rows (blank lines are empty documents).
  assert docs["wikitext2"] == [" = Robert = \n", "",
                               " Robert is a 1 @,@ 000 @-@ year old actor . \n", "",
                               " = = Career = = \n"]
  assert docs["lm1b"] == ["it 's a dog , he said .", "we do n't know"]
  with pytest.raises(ValueError, match="no file ending in"):
    zero_shot.read_text(zero_shot.SETS["wikitext103"], str(paths["wikitext2"]))


def test_fetch_downloads_once(tmp_path, monkeypatch):
  source = tmp_path / "ptb.test.txt"
  source.write_text(PTB)
  spec = zero_shot.SETS["ptb"]
  path = zero_shot.fetch(spec, str(tmp_path / "raw"), url=source.as_uri())
  assert open(path).read() == PTB and path.endswith("ptb.test.txt")
  monkeypatch.setattr(zero_shot.urllib.request, "urlopen", None)  # A second download would fail.
  assert zero_shot.fetch(spec, str(tmp_path / "raw"), url=source.as_uri()) == path


def byte_encode_batch(texts):
  return [list(t.encode()) for t in texts]


def read_blocks(directory):
  source = grain_source(directory)
  return np.stack([np.frombuffer(source[i], tokenized.TOKEN_DTYPE) for i in range(len(source))])


def grain_source(directory):
  import grain  # pylint: disable=g-import-not-at-top
  return grain.sources.ArrayRecordDataSource(
      tokenized.find_shards(zero_shot.DATASETS["ptb"], str(directory), "test"))


@pytest.mark.parametrize("protocol", ["join", "bos_eos"])
def test_prepare_writes_the_detokenized_packed_blocks(tmp_path, protocol):
  paths = write_raw(tmp_path)
  out = tmp_path / "zs" / "wikitext2"
  summary = prepare.prepare_zero_shot("wikitext2", str(paths["wikitext2"]), byte_encode_batch,
                                      data_dir=str(out), eos_id=256, seq_len=8,
                                      protocol=protocol)
  docs = [list(zero_shot.wikitext(d).encode()) for d in zero_shot.documents(
      zero_shot.SETS["wikitext2"], WIKI)]
  want = zero_shot.pack(docs, 8, 256, protocol)
  np.testing.assert_array_equal(read_blocks(out), want)
  assert summary["blocks"] == len(want) and summary["protocol"] == protocol
  assert summary["tokens"] == sum(len(d) + 1 for d in docs) == sum(map(len, docs)) + 5
  piece = 6 if protocol == "bos_eos" else 8
  assert summary["dropped_tokens"] == summary["tokens"] - len(want) * piece
  assert json.loads((out / "summary.json").read_text())["sha256"] == summary["sha256"]
  # The registry reads them as an evaluation-only dataset with one split.
  config = openwebtext.get_config("tiny")
  config.update(dataset="wikitext2", data_dir=str(out), data_shape=(8,), eval_batch_size=4)
  ds = data.create_datasets(config, 0, 1)
  assert ds.num_eval_examples == len(want) and ds.eval_split == "test"


def test_prepare_refuses_a_split_shorter_than_one_block(tmp_path):
  paths = write_raw(tmp_path)
  with pytest.raises(ValueError, match="ptb .*fewer than one block of 1024"):
    prepare.prepare_zero_shot("ptb", str(paths["ptb"]), byte_encode_batch,
                              data_dir=str(tmp_path / "out"), eos_id=256, seq_len=1024)


def test_zero_shot_sets_are_evaluation_only(tmp_path):
  config = openwebtext.get_config("tiny")
  config.dataset = "lambada"
  with pytest.raises(ValueError, match="evaluation set.*--zero_shot=lambada"):
    validation.validate(config)
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="--dataset=lambada .*--tokenizer="):
    data.create_datasets(config, 0, 1)
  with pytest.raises(ValueError, match="Unknown zero-shot set"):
    zero_shot.check_names(["ptb", "wikitext"])


def bpe_tokenizer(path):
  """A tiny byte-level BPE with GPT-2's EOS token name, saved as tokenizer.json."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([WIKI, PTB, LM1B] * 3, trainers.BpeTrainer(
      vocab_size=280, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path))


@pytest.mark.slow
def test_prepare_and_evaluate_cli_print_the_table(tmp_path):
  """prepare (two sets, from a local file and from a URL) -> a model trained 3 steps ->
  evaluate --zero_shot -> table + JSON."""
  paths = write_raw(tmp_path)
  bpe_tokenizer(tmp_path / "tokenizer.json")
  root = tmp_path / "zero_shot"
  for name, source in (("wikitext2", f"--raw={paths['wikitext2']}"),
                       ("ptb", f"--url={paths['ptb'].as_uri()}")):
    result = helpers.run_module("md4_jax.data.prepare", f"--dataset={name}", source,
                                f"--tokenizer={tmp_path / 'tokenizer.json'}",
                                f"--data_dir={root / name}", "--seq_len=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--zero_shot={name} --zero_shot_dir={root}" in result.stdout
  assert (root / "ptb" / "raw" / "ptb.test.txt").exists()  # Downloaded from the URL.

  config = openwebtext.get_config("tiny")
  config.update(data_shape=(8,), eval_batch_size=4)
  config.transformer.update(width=16, depth=1, num_heads=2)
  workdir = tmp_path / "run"
  blocks = read_blocks(root / "wikitext2").astype(np.int32)  # A few train steps on its blocks.
  batches = [{"x": np.resize(blocks, (config.batch_size, 8))} for _ in range(3)]
  helpers.saved_workdir(workdir, config, step=7, batches=batches)

  result = helpers.run_module("md4_jax.evaluate", f"--workdir={workdir}", "--num_t_samples=2",
                              "--zero_shot=wikitext2,ptb", f"--zero_shot_dir={root}", devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  path = workdir / "eval" / "step_00000007_zero_shot_ema_k2.json"
  table = json.loads(path.read_text())
  assert [r["dataset"] for r in table["sets"]] == ["wikitext2", "ptb"]
  for r in table["sets"]:
    summary = json.loads((root / r["dataset"] / "summary.json").read_text())
    assert r["blocks"] == summary["blocks"] and r["tokens"] == 8 * summary["blocks"]
    assert r["protocol"] == "join" and np.isfinite(r["perplexity"])
    assert r["perplexity"] == pytest.approx(math.exp(r["nelbo"] / 8))
    assert r["bits_per_token"] == pytest.approx(r["nelbo"] / (8 * math.log(2)))
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith("Zero-shot perplexity bounds, step 7 (ema params, K=2, blocks of 8")
  assert lines[2].split()[0] == "WikiText2" and lines[3].split()[0] == "PTB"
  assert str(path) in lines[-1]


def test_a_set_tokenised_with_another_tokenizer_is_flagged(tmp_path, caplog):
  config = openwebtext.get_config("tiny")
  config.data_dir = str(tmp_path / "owt")
  (tmp_path / "owt").mkdir()
  (tmp_path / "owt" / "tokenizer.json").write_text('{"model": "gpt2"}')
  saved_config.save_config(config, str(tmp_path))
  for name, text in (("ptb", '{"model": "gpt2"}'), ("lambada", '{"model": "other"}')):
    (tmp_path / name).mkdir()
    (tmp_path / name / "tokenizer.json").write_text(text)
  targets = [evaluate.Target(dataset=n, data_dir=str(tmp_path / n)) for n in ("ptb", "lambada")]
  with caplog.at_level("WARNING"):
    evaluate._check_same_tokenizer(str(tmp_path), targets)  # pylint: disable=protected-access
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and warnings[0].startswith("lambada was tokenised with")
