"""Every notebook executes top to bottom (it imports the package, never copies it)."""

import importlib.util
import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _generator():
  spec = importlib.util.spec_from_file_location(
      "make_notebooks", os.path.join(REPO, "notebooks", "make_notebooks.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


MARKERS = {  # what each notebook must print: its checks ran
    "quickstart.ipynb": ["ensemble (prob. average)"],
    "own_model.ipynb": ["linen: vmapped members == per-member loop",
                        "nnx: vmapped members == per-member loop", "greedy soup of",
                        "SWA, recalibrated"],
    "trajectory.ipynb": ["SWA (BN recalibrated)", "ensemble of 3 snapshots", "image/png"],
    "arcface.ipynb": ["ours: mean", "frozen leaves unchanged: [True, True]"],
    "text.ipynb": ["aligned average (lstsq)", "naive average"],
    "soups_merging.ipynb": ["greedy soup of", "model stock", "computes the same function",
                            "weight matching: loss barrier", "image/png"],
    "supernet.ipynb": ["copy_scaled head == logit average: True", "SuperNet head"],
    "uncertainty.ipynb": ["auroc_rotated 60", "BatchEnsemble", "mutual information: test",
                          "image/png"],
}


def _outputs(nb) -> str:
  """Every code cell's printed text, rendered Markdown, and the names of its image types."""
  out = []
  for c in nb.cells:
    if c.cell_type != "code":
      continue
    for o in c.get("outputs", []):
      out.append(o.get("text", ""))
      data = o.get("data", {})
      out.append(data.get("text/markdown", ""))
      out += [k for k in data if k.startswith("image/")]
  return "\n".join(out)


def test_every_notebook_is_generated_and_checked():
  assert sorted(_generator().NOTEBOOKS) == sorted(MARKERS)
  on_disk = sorted(f for f in os.listdir(os.path.join(REPO, "notebooks")) if f.endswith(".ipynb"))
  assert on_disk == sorted(MARKERS)


@pytest.mark.parametrize("name", sorted(MARKERS))
def test_notebook_is_in_sync_with_its_generator_and_runs(name, monkeypatch):
  monkeypatch.setenv("ENSEMBLING_TINY_BERT", "1")  # the text notebook: seconds, no weights
  saved = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  assert [c.source for c in saved.cells] == [c.source for c in
                                             _generator().build(_generator().NOTEBOOKS[name]).cells]
  for marker in MARKERS[name]:  # the outputs stored in the file show the checks ran
    assert marker in _outputs(saved), marker
  client = nbclient.NotebookClient(saved, timeout=900, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = _outputs(saved)
  for marker in MARKERS[name]:
    assert marker in outputs
  assert "IProgress" not in outputs and "Warning" not in outputs
