"""Smoke test: the SimCSE/STS experiment at its smallest (tiny random BERT) end to end."""

import json
import os

import jax
import numpy as np
import pytest

from configs import simcse_sts
from conftest import SHARED_DATA
from experiments import main


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "stsb")), reason="no shared data")
def test_simcse_sts_runlocal(tmp_path):
  config = simcse_sts.get_config("runlocal")
  config.eval.data_root = SHARED_DATA
  config.prng_impl = "rbg"
  before = jax.config.jax_default_prng_impl
  res = main.run_experiment(config, str(tmp_path))
  assert jax.config.jax_default_prng_impl == before  # set inside run() only, then restored
  for f in ("config.json", "metrics.jsonl", "results.md", "results.json", "train_loss.png"):
    assert os.path.exists(tmp_path / f), f
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  k = config.members
  aug = config.augmentations[0]
  assert len(saved["encoders"]) == 1 + k * len(config.augmentations)
  group = saved["groups"][aug]
  assert group["best"] in group["members"]
  rows = dict((name, row) for name, row in saved["table"])
  for name, row in rows.items():
    vals = [row[t] for t in ("STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R")]
    assert all(-100 <= v <= 100 for v in vals), name
    assert row["avg"] == pytest.approx(np.mean(vals))
  assert {f"{aug}: naive average of {k}", f"{aug}: aligned average (lstsq)",
          f"{aug}: aligned average (info_nce)"} <= set(rows)
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(line) for line in f]
  assert {r["member"] for r in recs} == set(range(k))
  assert all(np.isfinite(r["train_loss"]) and r["augmentation"] == aug for r in recs)
