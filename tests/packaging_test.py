"""setup.py and constraints.txt: what an install gets, and the versions CI passed with."""

import os
import runpy

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import helpers


@pytest.fixture(scope="module")
def setup_kwargs():
  captured = {}
  original = setuptools.setup
  setuptools.setup = lambda **kwargs: captured.update(kwargs)
  try:
    runpy.run_path(os.path.join(helpers.REPO, "setup.py"))
  finally:
    setuptools.setup = original
  return captured


def _pins() -> dict[str, str]:
  pins = {}
  with open(os.path.join(helpers.REPO, "constraints.txt")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
  return pins


def test_every_range_admits_the_version_ci_passed_with(setup_kwargs):
  """A bound raised in setup.py without a CI run on it (or a stale pin) fails here."""
  pins = _pins()
  requirements = [*setup_kwargs["install_requires"],
                  *(r for extra in setup_kwargs["extras_require"].values() for r in extra)]
  for requirement in map(Requirement, requirements):
    pinned = pins.get(canonicalize_name(requirement.name))
    if pinned is not None:
      assert requirement.specifier.contains(pinned), (str(requirement), pinned)
  for requirement in map(Requirement, [*setup_kwargs["install_requires"],
                                       *setup_kwargs["extras_require"]["test"]]):
    assert canonicalize_name(requirement.name) in pins, f"{requirement.name} has no pin"
  assert not any(name.startswith("md4") for name in pins)  # The project itself is not pinned.


def test_the_configs_install_inside_md4_jax_not_as_a_top_level_package(setup_kwargs):
  packages = setup_kwargs["packages"]
  assert "md4_jax.configs" in packages and "md4_jax" in packages
  assert all(p == "md4_jax" or p.startswith("md4_jax.") for p in packages)
  assert setup_kwargs["package_dir"]["md4_jax.configs"] == "configs"
