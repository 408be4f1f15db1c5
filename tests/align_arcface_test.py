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
    for sp in g["head_span"]:  # 10 centres in a 64-dim embedding: a proper subspace
      assert 0.0 < sp["fraction"] < 1.0
      assert 0.0 <= sp["mP@5 inside"] <= 1.0 and 0.0 <= sp["mP@5 outside"] <= 1.0
  assert "| ours | mP@5 |" in (tmp_path / "results.md").read_text()


def test_span_diagnostic_finds_class_information_outside_the_head_span():
  """Classes separated only orthogonally to the head's centres: retrieval works on the
  part outside the span and is at chance inside it; a head spanning everything leaves
  nothing outside."""
  from experiments import align_arcface as exp
  rng = np.random.default_rng(0)
  d, n = 6, 400
  centers = np.eye(d)[:2] * 3.0  # the head spans the first two axes
  y = rng.integers(0, 4, 2 * n)
  e = rng.normal(size=(2 * n, d))                 # the span part: noise only
  e[:, 2:] = 0.05 * rng.normal(size=(2 * n, d - 2))
  e[np.arange(2 * n), 2 + y] += 0.5               # the class lives on axes 2..5
  emb = {"test": e[:n], "index": e[n:]}
  out = exp.span_diagnostic(emb, {"centers": centers}, y[:n], y[n:], k=5)
  n_e = e[:n] / np.linalg.norm(e[:n], axis=1, keepdims=True)
  assert out["fraction"] == pytest.approx(np.mean(np.sum(n_e[:, :2] ** 2, axis=1)))
  assert out["mP@5 outside"] == 1.0
  assert out["mP@5 inside"] < 0.45  # chance is 0.25
  full = exp.span_diagnostic(emb, {"centers": rng.normal(size=(d, d))}, y[:n], y[n:], k=5)
  assert full["fraction"] == pytest.approx(1.0) and full["mP@5 outside"] is None


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


def test_align_arcface_open_set_retrieves_only_held_out_classes(tmp_path):
  """Open set: trained on the other classes, evaluated on held-out ones, mP@5 only."""
  from configs import align_arcface
  from ensembling import data
  from experiments.main import run_experiment
  config = align_arcface.get_config("runlocal,group=heterogeneous,open_set")
  config.progress = False
  held = config.eval.held_out_classes
  assert tuple(held) == align_arcface.OPEN_SET_HELD_OUT
  g = run_experiment(config, str(tmp_path))["groups"]["heterogeneous"]
  _, unseen = data.split_classes(data.load(config.data, seed=config.seed), held_out=held)
  assert g["open_set"] and g["frozen_leaves_unchanged"] == [True]
  assert g["index_size"] == min(config.eval.index_size, len(unseen.x_train))
  assert g["num_queries"] == min(config.eval.test_size, len(unseen.x_test))
  for kind in ("traditional", "ours"):
    for col in g["models"] + ["mean"]:
      assert set(g["rows"][kind][col]) == {"mP@5"}  # no head covers the held-out classes
      assert 0.0 <= g["rows"][kind][col]["mP@5"] <= 1.0
  text = (tmp_path / "results.md").read_text()
  assert "held-out classes" in text and "| ours | mP@5 |" in text and "Acc@1 |" not in text


def test_open_set_selection_on_the_retrieval_validation_split(tmp_path):
  """`align.select_on=retrieval` picks the shared head on held-out-class validation
  images (never test): same models, same traditional rows, other validation scores."""
  from configs import align_arcface
  from experiments.main import run_experiment
  config = align_arcface.get_config("runlocal,group=heterogeneous,open_set")
  config.progress = False
  first = run_experiment(config, str(tmp_path / "a"))["groups"]["heterogeneous"]
  config.models_dir = str(tmp_path / "a")
  config.align.select_on = "retrieval"
  g = run_experiment(config, str(tmp_path / "b"))["groups"]["heterogeneous"]
  assert first["selected_on"] == "train_classes" and g["selected_on"] == "retrieval"
  assert g["rows"]["traditional"] == first["rows"]["traditional"]  # the same models
  assert g["val_mP"] != first["val_mP"]
  assert g["best"] == g["models"][int(np.argmax(g["val_mP"]))]
  config.align.select_on = "test"
  with pytest.raises(ValueError, match="align.select_on"):
    run_experiment(config, str(tmp_path / "c"))
