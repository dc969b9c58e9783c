"""Configs take dataset facts (vocab_size, data_shape, classes) from the DatasetInfo records.

Every config file in configs/ and each of its variants is checked against the record of
the dataset it names, so a new config or dataset is covered without editing this file.
"""

import importlib
import os
import pkgutil
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import pytest

from md4_jax import data
import md4_jax.configs
from md4_jax.configs import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variants():
  """Every (config module, variant) of configs/, as pytest params named 'file:variant'."""
  for module_info in pkgutil.iter_modules(md4_jax.configs.__path__):
    module = importlib.import_module(f"md4_jax.configs.{module_info.name}")
    for variant in getattr(module, "VARIANTS", ()):
      yield pytest.param(module, variant, id=f"{module_info.name}:{variant}")


@pytest.mark.parametrize("module,variant", list(_variants()))
def test_every_config_reads_its_dataset_facts_from_the_record(module, variant):
  config = module.get_config(variant)
  label = f"{module.__name__}:{variant}"
  info = data.get_info(config.dataset)
  info.check_config(config)  # V, the image shape and the classes agree with the record.
  assert config.vocab_size == info.vocab_size, label
  assert config.classes in (0, info.classes), label
  # Text smoke runs ('tiny') choose a shorter L; every other config keeps the record's.
  if info.kind == "image" or "tiny" not in variant:
    assert tuple(config.data_shape) == info.default_data_shape, label


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_set_dataset_copies_the_record(name):
  info = data.get_info(name)
  config = base.set_dataset(base.get_config(), name)
  assert config.dataset == name and config.vocab_size == info.vocab_size
  assert config.data_shape == info.default_data_shape and config.classes == 0
  if info.classes:
    assert base.set_dataset(config, name, conditional=True).classes == info.classes
  else:
    with pytest.raises(ValueError, match="has no labels"):
      base.set_dataset(config, name, conditional=True)
  info.check_config(config)


def test_digits_cond_is_conditional_on_the_records_labels():
  digits = importlib.import_module("md4_jax.configs.digits")
  assert digits.get_config("cond").classes == data.get_info("digits").classes == 10
  assert digits.get_config("").classes == 0


def test_flags_override_the_records_facts():
  argv = ["prog", f"--config={REPO}/configs/text8.py:tiny", "--config.vocab_size=30",
          "--config.data_shape=(32,)", "--config.classes=3"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "The config.", flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert (config.vocab_size, tuple(config.data_shape), config.classes) == (30, (32,), 3)


def test_configs_load_without_tensorflow_or_grain():
  # Accelerator images may lack them; the benchmarks build from configs alone.
  script = (
      "import importlib.abc, sys\n"
      "class Blocker(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'grain', 'clu'):\n"
      "      raise ImportError(name + ' is blocked')\n"
      "sys.meta_path.insert(0, Blocker())\n"
      "import pkgutil, importlib, md4_jax.configs\n"
      "for m in pkgutil.iter_modules(md4_jax.configs.__path__):\n"
      "  module = importlib.import_module('md4_jax.configs.' + m.name)\n"
      "  for variant in getattr(module, 'VARIANTS', ()):\n"
      "    module.get_config(variant)\n"
      "from md4_jax.run import saved_config\n"
      "saved_config.config_from_dict({'seed': 0})\n"
      "print('ok')\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_vocabulary_tensor_cannot_split_is_named_with_the_padding_that_splits_it(caplog):
  """GPT-2's V = 50257 under mesh.tensor=4: a warning names the head and the embedding and
  the vocab_multiple that splits them; with it (or without tensor parallelism) none."""
  from md4_jax.configs import openwebtext  # pylint: disable=g-import-not-at-top
  from md4_jax.experiment import validation  # pylint: disable=g-import-not-at-top
  config = openwebtext.get_config("")
  config.mesh.tensor = 4
  for multiple, warned in ((1, True), (128, False)):
    config.transformer.vocab_multiple = multiple
    caplog.clear()
    validation.validate(config)
    text = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert ("head's columns (50257) or the embedding's rows (50258)" in text
            and "vocab_multiple=128" in text) == warned, text
