"""Configs by name (`--config=digits:tiny`) as an install without a clone runs them."""

import os
import subprocess
import sys

import pytest
from absl import flags

from md4_jax import cli
from md4_jax.configs import digits

import helpers


def test_config_names_are_the_shipped_config_files():
  names = cli.config_names()
  assert "digits" in names and "base" in names and "__init__" not in names
  for name in names:
    assert os.path.isfile(os.path.join(cli.configs_dir(), f"{name}.py"))
  shipped = os.listdir(os.path.join(helpers.REPO, "configs"))
  assert sorted(f[:-3] for f in shipped if f.endswith(".py") and f != "__init__.py") == names


def test_a_bare_name_resolves_to_the_shipped_file_and_keeps_its_variant():
  path = os.path.join(cli.configs_dir(), "digits.py")
  assert cli.config_path("digits") == path
  assert cli.config_path("digits:tiny") == f"{path}:tiny"
  assert cli.config_path("digits:") == f"{path}:"


@pytest.mark.parametrize("spec", ["configs/digits.py:tiny", "digits.py", "./digits",
                                  "/abs/path/to/digits.py:cond"])
def test_a_path_is_left_as_it_is(spec):
  assert cli.config_path(spec) == spec


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "digits").write_text("def get_config():\n  return {}\n")
  assert cli.config_path("digits:x") == "digits:x"


def test_an_unknown_name_lists_the_valid_ones_in_the_error():
  with pytest.raises(ValueError, match="Unknown config 'nope'") as error:
    cli.config_path("nope:tiny")
  assert all(name in str(error.value) for name in cli.config_names())


def test_the_flag_loads_a_name_like_its_path():
  values = flags.FlagValues()
  holder = cli.define_config_flag("config", "A config.", flag_values=values)
  values(["prog", "--config=digits:tiny"])
  assert holder.value.to_dict() == digits.get_config("tiny").to_dict()
  assert holder.value.is_locked


@pytest.mark.slow  # Two training processes (they stop at validation).
def test_training_takes_a_name_from_any_directory(tmp_path):
  """From a directory without configs/, the name loads, `--config.key` overrides apply, and
  an unknown name is one line and exit 2."""
  def train(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "md4_jax.train", *args,
                           f"--workdir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  # A config that loads and then fails validation: the name resolved and the override
  # reached the run, without compiling anything.
  result = train("--config=digits:tiny", "--config.num_train_steps=0")
  errors = [l for l in result.stderr.splitlines() if l.startswith("md4_jax: error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert "num_train_steps" in errors[0] and "Unknown config" not in errors[0]
  result = train("--config=nope")
  errors = [l for l in result.stderr.splitlines() if l.startswith("md4_jax: error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert "Unknown config 'nope'; valid names: " in errors[0] and "digits" in errors[0]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run").exists()
