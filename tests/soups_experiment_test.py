"""Smoke test: configs/soups.py:runlocal through experiments.main.run_experiment.

The soups, fine-tuning and augmentation are tested in soups_test.py; this only runs the
experiment and checks what holds by construction of its methods."""

import os

import pytest

from configs import soups as soups_config
from experiments import main


def test_soups_runlocal(tmp_path):
  config = soups_config.get_config("runlocal")
  out = main.run_experiment(config, str(tmp_path))
  for f in ("config.json", "results.md", "results.json", "barrier_loss.png",
            "barrier_accuracy.png", "finetune/metrics.jsonl", "scratch/metrics.jsonl"):
    assert os.path.exists(tmp_path / f), f
  for rows in (out["finetune"]["rows"], out["scratch"]["naive_rows"],
               out["scratch"]["aligned_rows"]):
    r = {row["method"]: row for row in rows}
    best, uniform = r["best individual (by val)"], r["uniform soup"]
    # Greedy (sorted) starts from the best ingredient; pruned soups from the uniform one.
    assert r["greedy soup (sorted)"]["val_acc"] >= best["val_acc"]
    assert r["pruned soup (sorted)"]["val_acc"] >= uniform["val_acc"]
    assert r["pruned soup (random, mean of 1)"]["val_acc"] >= uniform["val_acc"]
    assert uniform["ingredients"] == len(uniform["indices"][0])
  assert len(out["finetune"]["ingredients"]) == config.finetune.ingredients
  sc = out["scratch"]
  naive = {r["method"]: r for r in sc["naive_rows"]}
  aligned = {r["method"]: r for r in sc["aligned_rows"]}
  # Permuting hidden units changes no member's function, so neither their outputs nor
  # the ends of the interpolation path (the reference, the other member) change.
  for method in ("mean individual", "output ensemble of all 3 (K x cost)"):
    assert aligned[method]["test_acc"] == pytest.approx(naive[method]["test_acc"])
  for m in ("loss", "accuracy"):
    for end in (0, -1):
      assert sc["curves"]["aligned"][m][end] == pytest.approx(sc["curves"]["naive"][m][end],
                                                              rel=1e-5)
