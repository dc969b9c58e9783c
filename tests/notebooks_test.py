"""The notebooks run top to bottom (with small step counts) so they cannot rot."""

import os

import nbclient
import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", ["schedules.ipynb", "quickstart.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
  monkeypatch.setenv("MD4_NOTEBOOK_STEPS", "30")  # The quick start's training steps.
  monkeypatch.setenv("MD4_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
