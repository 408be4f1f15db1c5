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
  # BN snapshots are also ensembled after recalibrating each one's statistics.
  assert "ensemble of 2 snapshots, each BN recalibrated" in res["methods"]["starsse"]
  assert 0.0 < star["summary"]["disagreement"] < 0.5
  # The star phase trains (M - 1) copies of every seed as one member axis.
  recs = [json.loads(l) for l in open(os.path.join(wd, "starsse/star/metrics.jsonl"))]
  assert {r["member"] for r in recs} == set(range(config.members * (config.traj.num_cycles - 1)))


def test_recalibrate_over_seeds_x_snapshots_matches_a_per_model_loop(digits):
  """`recalibrate(member_dims=2)` recomputes each (seed, snapshot) model's BN statistics
  exactly as `recompute_batch_stats` on that model alone would."""
  import jax
  from ensembling import averaging, configlib, members, models
  from experiments import trajectory
  cfg = configlib.model_config("mlp", widths=(16, 16), dropout=0.0)
  cfg.batch_norm = True  # as configs/swa.py does for its BN-MLP
  model = models.make_model(cfg, num_classes=10)
  seeds, snaps = 2, 3
  v = members.init_members(jax.random.key(0), model, digits.x_train[:1], seeds * snaps)
  # Distinct weights per model, and stale (zeroed) statistics that must not matter.
  v = {"params": jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape),
                              v["params"]),
       "batch_stats": jax.tree.map(lambda a: 0.0 * a, v["batch_stats"])}
  grid = jax.tree.map(lambda a: a.reshape((seeds, snaps) + a.shape[1:]), v)
  x = digits.x_train[:200]
  out = trajectory.recalibrate(model, grid, x, batch_size=32, num_examples=160, member_dims=2)
  for s in range(seeds):
    for m in range(snaps):
      one = jax.tree.map(lambda a: a[s, m], grid)
      ref = averaging.recompute_batch_stats(model.apply, one,
                                            (x[i:i + 32] for i in range(0, 160, 32)))
      got = jax.tree.map(lambda a: a[s, m], out)
      for a, b in zip(jax.tree.leaves(got["batch_stats"]), jax.tree.leaves(ref["batch_stats"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert float(np.abs(np.asarray(jax.tree.leaves(got["batch_stats"])[0])).sum()) > 0
