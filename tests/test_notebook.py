"""CI executes the Colab quickstart notebook (shortened through its env knobs)."""

import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("TFJAX_NOTEBOOK_STEPS", "20")
  monkeypatch.setenv("TFJAX_NOTEBOOK_VAE_STEPS", "10")
  monkeypatch.setenv("TFJAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  # One CPU device in the kernel, not the suite's eight fake ones.
  monkeypatch.setenv("XLA_FLAGS", "")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  assert (tmp_path / "work" / "report.md").exists()
  assert (tmp_path / "work" / "samples_grid.png").exists()

