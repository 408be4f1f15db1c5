"""Smoke test: the SimCSE/STS experiment at its smallest (tiny random BERT) end to end.

The library pieces (SimCSE step and training, encoding, STS scoring, adapters) are
tested in text_test.py; this only runs the experiment.
"""

import json
import os

import jax
import numpy as np
import pytest

from conftest import SHARED_DATA


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "stsb")), reason="no shared data")
def test_simcse_sts_runlocal(tmp_path):
  from configs import simcse_sts
  from experiments import main
  config = simcse_sts.get_config("runlocal")
  config.eval.data_root = SHARED_DATA
  config.prng_impl = "rbg"  # only the dropout keys': nothing global changes
  before = jax.config.jax_default_prng_impl
  res = main.run_experiment(config, str(tmp_path))
  assert jax.config.jax_default_prng_impl == before
  for f in ("config.json", "metrics.jsonl", "results.md", "results.json", "train_loss.png"):
    assert os.path.exists(tmp_path / f), f
  k, aug = config.members, config.augmentations[0]
  assert len(res["encoders"]) == 1 + k * len(config.augmentations)
  group = res["groups"][aug]
  devs = [res["encoders"][m]["stsb_dev"] for m in group["members"]]
  assert group["best"] == group["members"][int(np.argmax(devs))]
  rows = dict(res["table"])
  # The "best single" row is the chosen encoder's own row.
  assert rows[f"{aug}: best single ({group['best']}, by STS-B dev)"] == rows[group["best"]]
  assert {f"{aug}: naive average of {k}", f"{aug}: aligned average (lstsq)",
          f"{aug}: aligned average (info_nce)"} <= set(rows)
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(line) for line in f]
  assert {r["member"] for r in recs} == set(range(k))
  assert all(r["augmentation"] == aug for r in recs)
