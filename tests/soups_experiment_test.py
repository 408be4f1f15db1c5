"""Smoke test: configs/soups.py:runlocal through experiments.main.run_experiment."""

import json
import os

import numpy as np

from configs import soups as soups_config
from experiments import main


def test_soups_runlocal(tmp_path):
  config = soups_config.get_config("runlocal")
  out = main.run_experiment(config, str(tmp_path))
  for f in ("config.json", "results.md", "results.json", "metrics.jsonl",
            "barrier_loss.png", "barrier_accuracy.png", "finetune/metrics.jsonl"):
    assert os.path.exists(tmp_path / f), f
  rows = {r["method"]: r for r in out["finetune"]["rows"]}
  best = rows["best individual (by val)"]
  assert 0.5 < best["test_acc"] <= 1.0
  # greedy (sorted) is never below the best ingredient on the held-out split
  assert rows["greedy soup (sorted)"]["val_acc"] >= best["val_acc"]
  assert rows["greedy soup (sorted)"]["ingredients"] >= 1
  assert rows["uniform soup"]["ingredients"] == config.finetune.ingredients
  sc = out["scratch"]
  naive = {r["method"]: r for r in sc["naive_rows"]}
  aligned = {r["method"]: r for r in sc["aligned_rows"]}
  # aligning does not change individual members
  assert np.isclose(naive["mean individual"]["test_acc"], aligned["mean individual"]["test_acc"])
  assert sc["curves"]["naive"]["accuracy"][0] == sc["curves"]["aligned"]["accuracy"][0]
  assert len(sc["alphas"]) == config.scratch.alphas
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(l) for l in f]
  assert {r["part"] for r in recs} == {"finetune", "scratch", "scratch_aligned"}
