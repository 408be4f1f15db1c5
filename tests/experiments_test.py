"""Smoke tests: each core config at its smallest runs end to end and writes its outputs."""

import json
import os

import pytest

from configs import deep_ensemble, default
from experiments import main


def test_default_config_runlocal_writes_everything(tmp_path):
  config = default.get_config("runlocal")
  config.progress = False
  rep = main.run_experiment(config, str(tmp_path))
  for f in ("config.json", "metrics.jsonl", "results.md", "results.json",
            "accuracy_vs_members.png", "disagreement.png"):
    assert os.path.exists(tmp_path / f), f
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert len(saved["members"]) == config.members
  assert set(saved["ensemble"]) == {"accuracy", "nll", "ece", "brier"}
  assert 0.5 < saved["ensemble"]["accuracy"] <= 1.0  # digits learn fast even in 2 epochs
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(l) for l in f]
  assert {r["member"] for r in recs} == set(range(config.members))
  assert "val_accuracy" in recs[-1] and "train_loss" in recs[-1]
  # Rerunning the same command resumes from the final checkpoint: identical numbers.
  rep2 = main.run_experiment(config, str(tmp_path))
  assert rep2["ensemble"] == rep["ensemble"]


def test_deep_ensemble_presets_and_errors():
  c = deep_ensemble.get_config("fashion_mnist,members=4,arch=cnn")
  assert c.members == 4 and c.model.name == "cnn" and c.data.name == "fashion_mnist"
  with pytest.raises(ValueError, match="Unknown config arg"):
    deep_ensemble.get_config("memberz=3")
  with pytest.raises(ValueError, match="Unknown preset"):
    deep_ensemble.get_config("cifar")


def test_unknown_experiment_is_named(tmp_path):
  config = default.get_config("runlocal")
  config.experiment = "deep_ensembel"
  with pytest.raises(ValueError, match="Unknown experiment 'deep_ensembel'"):
    main.run_experiment(config, str(tmp_path))


def test_unknown_model_option_is_named(tmp_path):
  config = default.get_config("runlocal")
  config.model.name = "cnn"  # the MLP's widths/dropout don't fit the CNN
  with pytest.raises(ValueError, match="Unknown option"):
    main.run_experiment(config, str(tmp_path))
