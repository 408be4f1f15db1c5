"""Smoke test: configs/merging.py:runlocal through experiments.main.run_experiment.

The merges and alignments are tested in merging_test.py and align_test.py; this only runs
the experiment and checks what holds by construction."""

import os

import numpy as np
import pytest

from configs import merging as merging_config
from experiments import main


def test_merging_runlocal(tmp_path):
  config = merging_config.get_config("runlocal")
  out = main.run_experiment(config, str(tmp_path))
  for f in ("config.json", "results.md", "results.json", "barrier_loss.png",
            "barrier_accuracy.png", "pretrain/metrics.jsonl", "scratch/metrics.jsonl"):
    assert os.path.exists(tmp_path / f), f
  mt = out["multitask"]
  rows = {r["method"]: r for r in mt["rows"]}
  assert len(rows) == 11 and mt["tasks"] == ["rotate90", "noise1.0"]
  own = rows["fine-tuned on the task (one model per task)"]
  assert own["test_norm"] == pytest.approx(1.0) and own["val_norm"] == pytest.approx(1.0)
  for r in rows.values():  # normalised = mean over tasks of acc / the task's own model's acc
    assert r["test_norm"] == pytest.approx(np.mean(np.array(r["test_acc"]) / own["test_acc"]))
    if "val_norm_by_scale" in r and r["scale"] is not None:  # lambda picked on validation
      assert r["val_norm"] == pytest.approx(max(r["val_norm_by_scale"]))
  sc = out["scratch"]
  merged = {r["method"]: r for r in sc["rows"]}
  assert sorted(merged) == sorted(["naive", "weight_matching", "activation_matching",
                                   "merge_many"])
  for m, r in merged.items():
    assert r["barrier_loss"] >= 0 and 0 <= r["merged_acc"] <= 1
    curve = sc["curves"]["nll"][m]
    assert len(curve) == config.scratch.alphas
    mid = 0.5 * (curve[0] + curve[-1])  # 3 alphas: the barrier is the midpoint's excess
    assert r["barrier_loss"] == pytest.approx(max(0.0, curve[1] - mid), abs=1e-6)
  # weight and activation matching align to member 0: the path starts at the same model
  for m in ("weight_matching", "activation_matching"):
    assert sc["curves"]["nll"][m][0] == pytest.approx(sc["curves"]["nll"]["naive"][0], rel=1e-4)
