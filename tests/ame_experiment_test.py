"""Smoke test: configs/ame.py:runlocal through experiments.main.run_experiment.

AME itself is tested in ame_test.py; this runs the experiment and checks what holds by
construction: one SGD step at rate 1 is the uniform soup, the greedy soup starts from
the best expert, the output ensemble's rows are filled in."""

import os

import pytest

from configs import ame as ame_config
from experiments import main


def test_ame_runlocal(tmp_path):
  config = ame_config.get_config("runlocal")
  out = main.run_experiment(config, str(tmp_path))
  for f in ("config.json", "results.md", "results.json", "ame_test_K2.png",
            "ame_shifted_K2.png", "seed0/K2/metrics.jsonl", "seed0/pretrain/metrics.jsonl"):
    assert os.path.exists(tmp_path / f), f
  rows = {r: v["per_seed"][0] for r, v in out["rows"]["K=2"].items()}
  soup, ame1 = rows["uniform soup"], rows["AME sgd:1.0, T=1"]
  for col in ("val", "test", "rotate", "noise", "contrast", "test_nll"):
    assert ame1[col] == pytest.approx(soup[col], abs=1e-6), col
  greedy = next(v for r, v in rows.items() if r.startswith("greedy soup"))
  best = next(v for r, v in rows.items() if r.startswith("best expert"))
  assert greedy["val"] >= best["val"]
  ens = rows["output ensemble (2 experts)"]
  assert set(ens) >= {"test", "rotate", "noise", "contrast", "shifted", "test_nll"}
  assert out["info"]["K2_seed0"]["shards"][0] == 2
  assert "| K=2 | uniform soup |" in open(tmp_path / "results.md").read()
