"""Smoke test of experiments/trajectory.py with its runlocal config (digits, seconds)."""

import json
import os

import numpy as np

from experiments import main


def test_trajectory_runlocal(tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", os.path.join("configs", "starsse.py"))
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  config = cfg.get_config("preset=digits,runlocal,methods=swa+starsse")
  wd = str(tmp_path)
  main.run_experiment(config, wd)
  for f in ("config.json", "results.md", "results.json", "trajectory.png",
            "disagreement_starsse.png", "swa/run/metrics.jsonl", "starsse/star/metrics.jsonl"):
    assert os.path.exists(os.path.join(wd, f)), f
  res = json.load(open(os.path.join(wd, "results.json")))
  swa = res["methods"]["swa"]
  assert set(swa) >= {"end point (single model)", "SWA (BN recalibrated)",
                      "SWA, no recalibration: averaged BN stats"}
  for rows in res["methods"].values():
    for r in rows.values():
      assert len(r["per_seed"]) == config.members
      assert 0.5 < r["summary"]["accuracy"] <= 1.0 and np.isfinite(r["summary"]["nll"])
  star = res["methods"]["starsse"]["ensemble of 2 snapshots"]
  assert 0.0 < star["summary"]["disagreement"] < 0.5
  # The star phase trains (M - 1) copies of every seed as one member axis.
  recs = [json.loads(l) for l in open(os.path.join(wd, "starsse/star/metrics.jsonl"))]
  assert {r["member"] for r in recs} == set(range(config.members * (config.traj.num_cycles - 1)))
