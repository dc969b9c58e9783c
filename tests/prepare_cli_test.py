"""md4_jax.data.prepare on bad input: one line on stderr, exit 2, nothing created."""

import builtins
import json
import os
import types
import zipfile

import pytest

import helpers
from md4_jax.data import prepare
from zero_shot_test import bpe_tokenizer


def _flags(tmp_path, **overrides):
  values = dict(dataset="ptb", data_dir=str(tmp_path / "out"), raw=None, url=None,
                protocol="join", tokenizer=str(tmp_path / "tokenizer.json"),
                eos_token="<|endoftext|>", seq_len=8, validation_docs=1, max_docs=0,
                sequences_per_shard=10)
  values.update(overrides)
  return types.SimpleNamespace(**values)


def _inputs(tmp_path):
  bpe_tokenizer(tmp_path / "tokenizer.json")
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
  (tmp_path / "bad_tokenizer.json").write_text("{not json")
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
    z.writestr("something/else.txt", "text")


CASES = {
    "empty raw": (dict(raw="{tmp}/empty.txt"), "is empty"),
    "binary raw": (dict(raw="{tmp}/binary.bin"), "neither UTF-8 text nor a zip/tar archive"),
    "invalid tokenizer": (dict(raw="{tmp}/empty.txt", tokenizer="{tmp}/bad_tokenizer.json"),
                          "is not a Hugging Face tokenizer.json"),
    "missing tokenizer": (dict(tokenizer="{tmp}/nope.json"), "no such file"),
    "zip without the member": (dict(dataset="wikitext2", raw="{tmp}/other.zip"),
                               "holds no file ending in"),
    "data_dir under a file": (dict(raw="{tmp}/empty.txt", data_dir="{tmp}/empty.txt/out"),
                              "cannot be created"),
    "offline download": (dict(url="http://127.0.0.1:9/ptb.test.txt"), "Cannot download ptb"),
    "bos_eos too short": (dict(protocol="bos_eos", seq_len=2), "need BOS, a token and EOS"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_and_creates_nothing(tmp_path, case):
  _inputs(tmp_path)
  overrides, message = CASES[case]
  overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
               for k, v in overrides.items()}
  before = sorted(os.listdir(tmp_path))
  with pytest.raises((ValueError, OSError), match=message):
    prepare.run(_flags(tmp_path, **overrides))
  assert sorted(os.listdir(tmp_path)) == before  # No output directory, no tokenizer copy.


def test_an_unwritable_data_dir_is_found_before_anything_is_read(tmp_path, monkeypatch):
  _inputs(tmp_path)
  monkeypatch.setattr(prepare.os, "access", lambda path, mode: path != str(tmp_path))
  with pytest.raises(PermissionError, match="is not writable"):
    prepare.run(_flags(tmp_path, raw=str(tmp_path / "empty.txt")))
  assert not (tmp_path / "out").exists()


def test_a_training_corpus_without_the_prepare_extra_names_it(tmp_path, monkeypatch):
  _inputs(tmp_path)
  real_import = builtins.__import__

  def no_datasets(name, *args, **kwargs):
    if name == "datasets":
      raise ImportError("No module named 'datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_datasets)
  monkeypatch.delitem(__import__("sys").modules, "datasets", raising=False)
  with pytest.raises(ValueError, match=r'pip install -e "\.\[prepare\]"'):
    prepare.run(_flags(tmp_path, dataset="openwebtext"))
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", [
    (["--dataset=ptb", "--seq_len=0"], "--seq_len"),
    (["--dataset=ptb", "--raw={tmp}/empty.txt", "--tokenizer={tmp}/bad_tokenizer.json"],
     "is not a Hugging Face tokenizer.json"),
])
def test_the_command_exits_2_with_one_line(tmp_path, argv, message):
  _inputs(tmp_path)
  argv = [a.format(tmp=tmp_path) for a in argv]
  if not any(a.startswith("--tokenizer") for a in argv):
    argv.append(f"--tokenizer={tmp_path / 'tokenizer.json'}")
  result = helpers.run_module("md4_jax.data.prepare", *argv, f"--data_dir={tmp_path / 'out'}")
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("md4_jax.data.prepare: error:") and message in last, last
  assert not (tmp_path / "out").exists()


# ------------------------------------------- prepared zero-shot sets' integrity ---

from md4_jax import evaluate  # noqa: E402
from md4_jax.data import tokenized  # noqa: E402
from md4_jax.data import zero_shot  # noqa: E402
from zero_shot_test import byte_encode_batch, write_raw  # noqa: E402


def _prepared(tmp_path):
  root = tmp_path / "zero_shot"
  raw = write_raw(tmp_path)["wikitext2"]
  prepare.prepare_zero_shot("wikitext2", str(raw), byte_encode_batch,
                            data_dir=str(root / "wikitext2"), eos_id=0, seq_len=8)
  shards = tokenized.find_shards(zero_shot.DATASETS["wikitext2"], str(root / "wikitext2"), "test")
  return root, root / "wikitext2", shards


def _edit_summary(directory, **changes):
  path = directory / "summary.json"
  summary = json.loads(path.read_text())
  summary.update(changes)
  path.write_text(json.dumps(summary))


def test_a_prepared_set_verifies_against_its_summary(tmp_path):
  _, directory, shards = _prepared(tmp_path)
  summary = zero_shot.verify_prepared(str(directory), "wikitext2", shards)
  assert summary["shards"][0]["records"] == summary["blocks"] > 0


@pytest.mark.parametrize("change, message", [
    (dict(blocks=1), "blocks"),
    (dict(seq_len=16), "seq_len=16"),
    (dict(protocol="mdlm"), "protocol='mdlm'"),
    (dict(dataset="ptb"), "dataset='ptb'"),
])
def test_a_summary_that_disagrees_with_the_shards_is_refused_before_scoring(tmp_path, change,
                                                                           message):
  root, directory, _ = _prepared(tmp_path)
  _edit_summary(directory, **change)
  with pytest.raises(ValueError, match=message):  # Before the (missing) run is even read.
    evaluate.evaluate_zero_shot(str(tmp_path / "no_run"), ["wikitext2"], root=str(root))


def test_a_truncated_shard_is_named(tmp_path):
  root, directory, shards = _prepared(tmp_path)
  data = open(shards[0], "rb").read()
  with open(shards[0], "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=rf"{shards[0]} does not match the checksum"):
    evaluate.evaluate_zero_shot(str(tmp_path / "no_run"), ["wikitext2"], root=str(root))
  # Without a recorded checksum (an older summary) the reader's failure is named instead.
  _edit_summary(directory, shards=[])
  with pytest.raises(ValueError, match=rf"{shards[0]} (is unreadable|holds)"):
    zero_shot.verify_prepared(str(directory), "wikitext2", shards)


def test_an_invalid_summary_is_found_at_start_naming_the_file(tmp_path):
  root, directory, _ = _prepared(tmp_path)
  (directory / "summary.json").write_text("{broken")
  with pytest.raises(ValueError, match=rf"{directory / 'summary.json'} is not valid JSON"):
    evaluate.evaluate_zero_shot(str(tmp_path / "no_run"), ["wikitext2"], root=str(root))
