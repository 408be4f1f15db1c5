"""Smoke tests of the launcher: the main job at its smallest, resumption, bad configs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, needs_shared_data
from configs import deep_ensemble, default
from experiments import main


def test_default_config_runlocal_writes_everything_and_resumes(tmp_path):
  config = default.get_config("runlocal")
  rep = main.run_experiment(config, str(tmp_path))
  for f in ("config.json", "run.json", "metrics.jsonl", "results.md", "results.json",
            "accuracy_vs_members.png", "disagreement.png"):
    assert os.path.exists(tmp_path / f), f
  saved = json.load(open(tmp_path / "results.json"))
  assert len(saved["members"]) == config.members
  assert saved["best_member"]["selected_on"] == "validation"
  recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {r["member"] for r in recs} == set(range(config.members))
  assert "val_accuracy" in recs[-1] and "train_loss" in recs[-1]
  # Rerunning the same command resumes from the final checkpoint: identical numbers.
  rep2 = main.run_experiment(config, str(tmp_path))
  assert rep2["ensemble"] == rep["ensemble"] and rep2["members"] == rep["members"]


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


def test_invalid_configs_are_refused_before_the_workdir_exists(tmp_path):
  config = default.get_config("runlocal")
  config.model.name = "cnn"  # the MLP's widths/dropout don't fit the CNN
  config.members = 0
  config.optim.learning_rate = -0.1
  with pytest.raises(ValueError, match=r"members must be(.|\n)*learning_rate must be a number "
                                       r"> 0(.|\n)*Unknown option\(s\) \['dropout', 'widths'\]"):
    main.run_experiment(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_command_line_errors_are_one_line_with_suggestions(tmp_path):
  res = _cli("--config=configs/default.py:runlocal", f"--workdir={tmp_path}/w",
             "--config.memberz=3")
  assert res.returncode == 2
  assert res.stderr.strip() == ("error: Unknown config field 'memberz'; did you mean 'members' "
                                "or 'members_from'?")
  res = _cli("--config=configs/default.py:runlocal", f"--workdir={tmp_path}/w",
             "--config.data.name=digitz")
  assert res.returncode == 1 and "did you mean 'digits'?" in res.stderr
  assert len(res.stderr.strip().splitlines()) <= 3 and "Traceback" not in res.stderr


def test_per_member_lists_from_the_command_line(tmp_path):
  res = _cli("--config=configs/default.py:runlocal", f"--workdir={tmp_path}/w",
             "--config.optim.lr_scale=1.0,0.5,0.25", "--config.optim.weight_decay=[0,1e-4,1e-3]")
  assert res.returncode == 0, res.stderr[-2000:]
  saved = json.load(open(tmp_path / "w" / "config.json"))
  assert saved["optim"]["lr_scale"] == [1.0, 0.5, 0.25]
  assert saved["optim"]["weight_decay"] == [0.0, 1e-4, 1e-3]


def test_list_shows_every_config_with_its_args():
  res = _cli("--list")
  assert res.returncode == 0
  for name in os.listdir(os.path.join(REPO, "configs")):
    if name.endswith(".py"):
      assert f"configs/{name}" in res.stdout
  assert ":args  preset='digits', arch='mlp', members=8" in res.stdout


def test_trajectory_runlocal(tmp_path):
  from configs import starsse
  config = starsse.get_config("preset=digits,runlocal,methods=swa+starsse")
  res = main.run_experiment(config, str(tmp_path))
  for f in ("results.md", "results.json", "trajectory.png", "disagreement_starsse.png",
            "swa/run/metrics.jsonl", "starsse/star/metrics.jsonl"):
    assert os.path.exists(tmp_path / f), f
  swa = res["methods"]["swa"]
  assert set(swa) == {"end point (single model)", "SWA (BN recalibrated)",
                      "SWA, no recalibration: last iterate's BN stats",
                      "SWA, no recalibration: averaged BN stats"}
  assert all(len(r["per_seed"]) == config.members for m in res["methods"].values()
             for r in m.values())
  # The star phase trains (M - 1) copies of every seed as one member axis.
  recs = [json.loads(l) for l in open(tmp_path / "starsse" / "star" / "metrics.jsonl")]
  assert {r["member"] for r in recs} == set(range(config.members * (config.traj.num_cycles - 1)))
  # One seed's row mean is that seed's value: the summary is the mean of the per-seed rows.
  row = res["methods"]["starsse"]["ensemble of 2 snapshots"]
  assert row["summary"]["accuracy"] == pytest.approx(
      sum(r["accuracy"] for r in row["per_seed"]) / len(row["per_seed"]))


def test_starsse_transfer_runlocal(tmp_path, monkeypatch):
  from configs import starsse_transfer
  config = starsse_transfer.get_config("runlocal")
  config.checkpoint_every_steps = 1
  res = main.run_experiment(config, str(tmp_path))
  m = config.transfer.num_models
  # Fine-tuning checkpoints at the configured interval (every step; the last two kept).
  steps = sorted(int(d) for d in os.listdir(tmp_path / "SSE" / "run" / "checkpoints") if d.isdigit())
  assert steps == [m * res["cycle_steps"] - 1, m * res["cycle_steps"]]
  assert set(res["methods"]) == {"local deep ensemble", "SSE", "StarSSE"}
  for rows in res["methods"].values():
    assert f"ensemble of {m} snapshots" in rows and "uniform soup (BN recalibrated)" in rows
  # The target task holds only the classes the source task did not: 5 of them, renumbered.
  assert res["target"].endswith("5 classes") and res["source"].endswith("5 classes")
  star = [json.loads(l) for l in open(tmp_path / "StarSSE" / "star" / "metrics.jsonl")]
  assert {r["member"] for r in star} == set(range(config.members * (m - 1)))
  local = [json.loads(l) for l in open(tmp_path / "local_deep_ensemble" / "run" / "metrics.jsonl")]
  assert {r["member"] for r in local} == set(range(config.members * m))

  # A rerun finds every method trained and its rows stored: nothing is evaluated again.
  from ensembling import trajectory
  calls, rows = [], trajectory.snapshot_rows
  monkeypatch.setattr(trajectory, "snapshot_rows", lambda *a, **k: calls.append(1) or rows(*a, **k))
  assert main.run_experiment(config, str(tmp_path)) == res and not calls
  json.dump({"key": "0" * 64, "value": {}}, open(tmp_path / "SSE" / "rows.json", "w"))
  assert main.run_experiment(config, str(tmp_path)) == res and len(calls) == 1


@needs_shared_data("sick")
def test_starsse_transfer_text_runlocal(tmp_path):
  """The text path: a (tiny random) pre-trained BERT with new heads fine-tuned on SICK."""
  from configs import starsse_transfer
  config = starsse_transfer.get_config("arch=minilm,runlocal")
  res = main.run_experiment(config, str(tmp_path))
  m = config.transfer.num_models
  assert res["target"].endswith("3 classes") and res["target"].startswith("sick token ids")
  for rows in res["methods"].values():  # no BatchNorm: plain rows, no recalibrated ones
    assert set(rows) == {f"ensemble of {m} snapshots", "mean snapshot (single model)",
                         "uniform soup"}
  read = lambda d: [json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")]
  assert {r["member"] for r in read("local_deep_ensemble/run")} == set(range(config.members * m))
  # All three start from the one checkpoint (run 0 with the same head): the first cycle
  # of run 0 is the same fine-tune in each (local: vmapped with the other members).
  first = lambda d: next(r for r in read(d) if r["member"] == 0 and "val_nll" in r)
  sse, star, local = first("SSE/run"), first("StarSSE/first"), first("local_deep_ensemble/run")
  assert sse["step"] == star["step"] == local["step"] == res["cycle_steps"]
  assert star["val_nll"] == sse["val_nll"]
  assert local["val_nll"] == pytest.approx(sse["val_nll"], abs=1e-5)


@needs_shared_data("20newsgroups")
def test_align_text_runlocal(tmp_path):
  from configs import align_text
  config = align_text.get_config("runlocal")
  res = main.run_experiment(config, str(tmp_path))
  best = res["best"]
  # The model lending its head is not moved: its aligned row is its own row.
  assert res["rows"]["ours"][best] == res["rows"]["traditional"][best]
  assert res["frozen_leaves_unchanged"] == [True] * (len(config.encoder.depths) - 1)
  assert res["num_classes"] == 20
  # The encoders' features are computed once and reused by a rerun (resume).
  assert os.path.exists(tmp_path / "features.npz")
  assert main.run_experiment(config, str(tmp_path))["rows"] == res["rows"]


@needs_shared_data("20newsgroups")
def test_adapter_composition_runlocal(tmp_path):
  from configs import adapter_composition
  from ensembling import composition
  config = adapter_composition.get_config("runlocal")
  res = main.run_experiment(config, str(tmp_path))
  a = len(res["domains"])
  assert a == 6 and res["texts"] == 6 * config.posts.test_per_domain
  t = res["table"]
  assert len(t) == len(composition.STRATEGIES) * len(composition.COMBINATIONS) * a
  for s in composition.STRATEGIES:
    # One adapter: averaging its parameters is ensembling its outputs.
    assert t[f"{s}/average/k=1"] == t[f"{s}/ensemble/k=1"]
    assert "out ppl" not in t[f"{s}/ensemble/k={a}"]   # leave-one-out has A - 1 adapters
    assert t[f"{s}/ensemble/k=2"]["out passes"] == composition.forward_passes(s, "ensemble", 2, a - 1)
  refs = res["references"]
  assert 1.0 < refs["no adapter (MLM head only)"] < float("inf")
  # A routing that always picks the text's own adapter would reach the oracle exactly.
  routed = refs["routing accuracy of top-1 (in-domain)"]
  assert set(routed) == {"sentence", "tfidf", "entropy"} and all(0 <= v <= 1 for v in routed.values())


def test_trajectory_partial_table_and_rows_reused_on_resume(tmp_path, monkeypatch):
  """An interrupted run leaves the finished methods' table; a rerun re-evaluates only what
  is new, and rows stored under other inputs (or unreadable) are recomputed, not trusted."""
  from configs import swa
  from ensembling import trajectory
  config = swa.get_config("preset=digits,runlocal,methods=sgd+swa")
  fit = trajectory.fit

  def interrupted(model, plan, *args, **kwargs):
    if plan.method == "swa":
      raise RuntimeError("interrupted")
    return fit(model, plan, *args, **kwargs)

  monkeypatch.setattr(trajectory, "fit", interrupted)
  with pytest.raises(RuntimeError, match="interrupted"):
    main.run_experiment(config, str(tmp_path))
  partial = open(tmp_path / "results_partial.md").read()
  assert "**Partial**: sgd done; swa not yet" in partial
  assert "independent ensemble of the" in partial and "SWA" not in partial
  monkeypatch.setattr(trajectory, "fit", fit)

  evaluated, evaluate = [], trajectory._evaluate  # what runs when the rows are not stored
  monkeypatch.setattr(trajectory, "_evaluate",
                      lambda model, run, *a, **k: evaluated.append(run.plan.method)
                      or evaluate(model, run, *a, **k))
  res = main.run_experiment(config, str(tmp_path))
  assert evaluated == ["swa"]  # sgd's rows were stored by the interrupted run
  assert not os.path.exists(tmp_path / "results_partial.md")
  assert "SWA (BN recalibrated)" in open(tmp_path / "results.md").read()
  assert main.run_experiment(config, str(tmp_path)) == res and evaluated == ["swa"]

  # Rows stored for other weights, or a damaged file: evaluated again, same numbers.
  stored = json.load(open(tmp_path / "sgd" / "rows.json"))
  json.dump({"key": "0" * 64, "value": stored["value"]}, open(tmp_path / "sgd" / "rows.json", "w"))
  open(tmp_path / "swa" / "rows.json", "w").write('{"key": "trunc')
  assert main.run_experiment(config, str(tmp_path)) == res
  assert evaluated == ["swa", "sgd", "swa"]
  assert json.load(open(tmp_path / "sgd" / "rows.json")) == stored
