"""Smoke test of the shared-head alignment experiment (runlocal, both groups)."""

import json
import os

import numpy as np
import pytest

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "..", "shared", "data")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(SHARED_DATA, "fashion-mnist")),
    reason="Fashion-MNIST not in ../shared/data")


def test_align_arcface_runlocal(tmp_path):
  from configs import align_arcface
  from experiments.main import run_experiment
  config = align_arcface.get_config("runlocal")
  config.progress = False
  res = run_experiment(config, str(tmp_path))
  for f in ("config.json", "results.json", "results.md"):
    assert os.path.exists(tmp_path / f)
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert set(saved["groups"]) == {"heterogeneous", "resolution"}
  for name, g in res["groups"].items():
    assert g["frozen_leaves_unchanged"] == [True] * (len(g["models"]) - 1)
    for kind in ("traditional", "ours"):
      for col in g["models"] + ["mean"]:
        for v in g["rows"][kind][col].values():
          assert np.isfinite(v) and 0.0 <= v <= 1.0
    # The shared-head model is not retrained: its row is the same in both.
    assert g["rows"]["ours"][g["best"]] == g["rows"]["traditional"][g["best"]]
  assert "| ours | mP@5 |" in (tmp_path / "results.md").read_text()


def test_align_arcface_procrustes_reuses_models_and_keeps_each_space(tmp_path):
  """Closed-form Procrustes alignment: an orthogonal map keeps every model's cosines."""
  from configs import align_arcface
  from experiments.main import run_experiment
  config = align_arcface.get_config("runlocal,group=heterogeneous")
  config.progress = False
  first = run_experiment(config, str(tmp_path / "a"))["groups"]["heterogeneous"]
  config = align_arcface.get_config(
      f"runlocal,group=heterogeneous,method=procrustes,models_dir={tmp_path / 'a'}")
  config.progress = False
  g = run_experiment(config, str(tmp_path / "b"))["groups"]["heterogeneous"]
  assert g["method"] == "procrustes" and g["frozen_leaves_unchanged"] == [None]
  assert g["val_mP"] == first["val_mP"]  # the same models, resumed rather than retrained
  for name in g["models"]:
    assert g["rows"]["ours"][name]["mP@5"] == pytest.approx(
        g["rows"]["traditional"][name]["mP@5"], abs=2e-3)
  with pytest.raises(ValueError, match="align.method"):
    config.align.method = "orthogonal"
    run_experiment(config, str(tmp_path / "c"))
