"""Smoke test of the shared-head alignment experiment (runlocal, both groups).

The logic (alignment, selection, closed-form maps, open set, span diagnostic) is tested
on tiny shapes in shared_head_test.py; this only runs the experiment end to end.
"""

import os

import numpy as np
import pytest

from conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(SHARED_DATA, "fashion-mnist")),
    reason="Fashion-MNIST not in the shared data folder")


def test_align_arcface_runlocal(tmp_path):
  from configs import align_arcface
  from experiments import main
  config = align_arcface.get_config("runlocal")
  config.data.dir = os.path.join(SHARED_DATA, "fashion-mnist")
  config.progress = False
  res = main.run_experiment(config, str(tmp_path))
  for f in ("config.json", "results.json", "results.md"):
    assert os.path.exists(tmp_path / f), f
  assert set(res["groups"]) == {"heterogeneous", "resolution"}
  for g in res["groups"].values():
    assert g["frozen_leaves_unchanged"] == [True] * (len(g["models"]) - 1)
    assert g["best"] == g["models"][int(np.argmax(g["val_mP"]))]
    # The shared-head model is not retrained: its row is the same in both.
    assert g["rows"]["ours"][g["best"]] == g["rows"]["traditional"][g["best"]]
  assert "| ours | mP@5 |" in (tmp_path / "results.md").read_text()
