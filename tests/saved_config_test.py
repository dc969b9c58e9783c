"""The saved-config schema: old configs are completed from configs/base.py by themselves.

A key added to base.get_config() is missing from every config saved before it;
`saved_config.config_from_dict` fills it in (from LEGACY_VALUES, else from base), and
a key nobody declared fails here instead of making every old run refuse to resume.
"""

import json
import os
import shutil

import pytest

from md4_jax.configs import base
from md4_jax.configs import digits
from md4_jax.run import saved_config
from md4_jax.run import workdir as workdir_lib
import helpers

# The oldest supported saved config: a workdir written by the previous release (cea09dd).
OLDEST = os.path.join(os.path.dirname(__file__), "data", "workdir_cea09dd_digits_tiny")


def _flat_keys(config) -> set[str]:
  return set(saved_config._flatten(saved_config.plain(config)))  # pylint: disable=protected-access


def _undeclared_keys() -> set[str]:
  """Base keys that the oldest saved config lacks and saved_config does not declare."""
  with open(os.path.join(OLDEST, saved_config.CONFIG_FILE)) as f:
    oldest = set(saved_config._flatten(json.load(f)))  # pylint: disable=protected-access
  return (_flat_keys(base.get_config()) - oldest - saved_config.DEFAULTED_KEYS
          - set(saved_config.LEGACY_VALUES))


def _with_new_key(monkeypatch, value=64):
  """Patches base.get_config to add a top-level key and a new network group."""
  get_config = base.get_config

  def patched():
    config = get_config()
    config.new_knob = "on"
    config.newnet = {"width": value, "depth": 2}
    return config

  monkeypatch.setattr(base, "get_config", patched)


def test_every_base_key_is_saved_by_the_oldest_run_or_declared(monkeypatch):
  assert not _undeclared_keys(), (
      "Runs saved before these base keys existed lack them: list each in "
      "saved_config.DEFAULTED_KEYS (base's default reproduces those runs) or give it "
      "saved_config.LEGACY_VALUES (the value that does); see docs/configs.md.")
  base_keys = _flat_keys(base.get_config())
  assert saved_config.DEFAULTED_KEYS <= base_keys  # No stale or misspelt entries ...
  assert not saved_config.DEFAULTED_KEYS & set(saved_config.LEGACY_VALUES)  # ... nor both.
  _with_new_key(monkeypatch)  # A new key that nobody declared is caught.
  assert _undeclared_keys() == {"new_knob", "newnet.width", "newnet.depth"}
  monkeypatch.setattr(saved_config, "DEFAULTED_KEYS",
                      saved_config.DEFAULTED_KEYS | {"new_knob", "newnet.width"})
  monkeypatch.setattr(saved_config, "LEGACY_VALUES", {"newnet.depth": 1})
  assert not _undeclared_keys()


def test_a_new_base_key_fills_old_configs_and_the_run_resumes(tmp_path, monkeypatch):
  _with_new_key(monkeypatch)
  workdir = str(tmp_path / "run")
  shutil.copytree(OLDEST, workdir)
  with open(os.path.join(workdir, saved_config.CONFIG_FILE)) as f:
    assert "newnet" not in json.load(f)
  # What a resume compares against: the config in the newest checkpoint, else config.json.
  for saved in (workdir_lib.stored_config(workdir), workdir_lib.load_config(workdir)):
    assert saved.newnet.width == 64 and saved.new_knob == "on"
    # Today's digits:tiny (built on the patched base) at the old run's length resumes it as is
    # (without EMA warm-up, which that run predates).
    config = helpers.digits_tiny(num_train_steps=4, checkpoint_every_steps=2, ema_warmup=False)
    assert config.newnet.width == 64
    assert saved_config.check_resume(saved, config, allow_safe_changes=False, where="old") == {}
  # A config that sets the new key otherwise is a change like any other.
  config = helpers.digits_tiny(num_train_steps=4, checkpoint_every_steps=2, ema_warmup=False)
  config.newnet.width = 32
  with pytest.raises(ValueError, match=r"newnet.width: 64 -> 32"):
    saved_config.check_resume(workdir_lib.load_config(workdir), config, False, "old")


def test_legacy_values_win_over_base_for_configs_saved_without_the_key(monkeypatch):
  monkeypatch.setattr(saved_config, "LEGACY_VALUES", {"time_embedding": "md4",
                                                      "unet.film": "shift"})
  saved = saved_config.plain(helpers.digits_tiny())
  del saved["time_embedding"], saved["unet"]["film"]
  config = saved_config.config_from_dict(saved)
  assert config.time_embedding == "md4" and config.unet.film == "shift"
  assert config.unet.channels == helpers.digits_tiny().unet.channels  # The rest as saved.
  # A config that saved the key keeps its own value.
  kept = saved_config.config_from_dict(saved_config.plain(helpers.digits_tiny()))
  assert kept.time_embedding == "dit" and kept.unet.film == "scale_shift"


def test_old_saved_configs_are_md4_runs():
  # digits:tiny sets one defaulted key away from base (EMA warm-up, which old runs lacked).
  saved = saved_config.plain(helpers.digits_tiny(ema_warmup=False))
  for key in saved_config.DEFAULTED_KEYS:
    *groups, leaf = key.split(".")
    node = saved
    for group in groups:
      node = node[group]
    node.pop(leaf)
  config = saved_config.config_from_dict(saved)
  assert config.model == "md4"
  assert not saved_config.differences(config, helpers.digits_tiny(ema_warmup=False))


def test_a_missing_group_is_filled_whole():
  saved = saved_config.plain(digits.get_config())
  del saved["uvit"]
  assert saved_config.config_from_dict(saved).uvit == base.get_config().uvit
  assert saved_config.config_from_dict({"seed": 0}).masked_head is False  # Old saved configs.
  assert "masked_head" in saved_config.SAFE_KEYS
