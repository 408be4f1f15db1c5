"""Every notebook executes top to bottom (it imports the package, never copies it)."""

import glob
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "ensemble (prob. average)" in outputs


def test_quickstart_is_in_sync_with_its_generator():
  import importlib.util
  nbformat = pytest.importorskip("nbformat")
  spec = importlib.util.spec_from_file_location("mk", os.path.join(REPO, "notebooks", "make_quickstart.py"))
  mk = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mk)
  saved = nbformat.read(os.path.join(REPO, "notebooks", "quickstart.ipynb"), as_version=4)
  assert [c.source for c in saved.cells] == [c.source for c in mk.build().cells]
