"""OOD columns of report.ensemble_report, and the smoke test of experiments/uncertainty.py."""

import gzip
import importlib.util
import json
import os
import struct

import numpy as np
import pytest

from conftest import REPO
from ensembling import ensemble, report, uncertainty


def _logits(k, n, c=4, seed=0, scale=2.0):
  return np.random.default_rng(seed).normal(size=(k, n, c)).astype(np.float32) * scale


def test_ensemble_report_ood_columns_equal_ood_report():
  lin, lout = _logits(3, 40), _logits(3, 25, seed=1, scale=0.5)
  y = np.random.default_rng(2).integers(0, 4, 40)
  plain = report.ensemble_report(lin, y)
  rep = report.ensemble_report(lin, y, ood_logits={"far": lout, "same": lin[:, :20]})
  p_in, p_out = ensemble.members_probs(lin), ensemble.members_probs(lout)
  want = uncertainty.ood_report(p_in, p_out)
  assert rep["ood"]["far"]["ensemble"] == want
  assert rep["ensemble"]["auroc_far"] == want["predictive_entropy"]["auroc"]
  per = [uncertainty.ood_report(p_in[i], p_out[i])["predictive_entropy"]["auroc"] for i in range(3)]
  assert [m["auroc_far"] for m in rep["members"]] == per
  assert rep["mean_member"]["auroc_far"] == pytest.approx(np.mean(per))
  assert rep["best_member"]["auroc_far"] == per[rep["best_member"]["index"]]
  # Everything else is the report without OOD sets, which is left unchanged.
  assert {k: v for k, v in rep["ensemble"].items() if not k.startswith("auroc_")} == plain["ensemble"]
  assert "ood" not in plain and "auroc_far" not in plain["ensemble"]
  # A single array is one set named "ood".
  assert "auroc_ood" in report.ensemble_report(lin, y, ood_logits=lout)["ensemble"]


def test_ood_logits_of_other_members_or_classes_raise():
  lin, y = _logits(3, 10), np.zeros(10, int)
  with pytest.raises(ValueError, match=r"K=3, M, C=4"):
    report.ensemble_report(lin, y, ood_logits={"x": _logits(2, 5)})
  with pytest.raises(ValueError, match=r"K=3, M, C=4"):
    report.ensemble_report(lin, y, ood_logits=_logits(3, 5, c=5))


def _write_idx(path, arr, magic):
  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.astype(np.uint8).tobytes())


def _idx_dir(path, *, n_train=600, n_test=200, side=28, seed=0):
  """An IDX directory of random images whose labels follow their mean brightness."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_train), ("t10k", n_test)):
    x = rng.integers(0, 256, (n, side, side)) * rng.random((n, 1, 1))
    _write_idx(os.path.join(path, f"{split}-images-idx3-ubyte.gz"), x, 2051)
    _write_idx(os.path.join(path, f"{split}-labels-idx1-ubyte.gz"),
               np.minimum(x.mean((1, 2)) / 12.8, 9), 2049)
  return str(path)


def test_uncertainty_runlocal(tmp_path):
  """The whole table on a tiny IDX set: every method, every OOD column, consistent costs."""
  from experiments import main
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs",
                                                                     "uncertainty.py"))
  cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg)
  config = cfg.get_config("runlocal")
  config.data.dir, config.data.validation_size = _idx_dir(tmp_path / "data"), 50
  config.ood.dir = _idx_dir(tmp_path / "small", side=20, seed=1)
  with pytest.raises(ValueError, match=r"shape \(20, 20, 1\)"):   # refused before training
    main.run_experiment(config, str(tmp_path / "bad"))
  config.ood.dir, config.ood.name = _idx_dir(tmp_path / "other", seed=2), "other"
  wd = str(tmp_path / "run")
  main.run_experiment(config, wd)
  res = json.load(open(os.path.join(wd, "results.json")))
  rows = res["rows"]
  assert list(rows) == ["single model", "deep ensemble (2)", "MC dropout (3 passes)", "SWA",
                        "SWAG (3 samples)", "SSE (2 snapshots)", "FGE (2 snapshots)",
                        "BatchEnsemble (2)", "MIMO (2)", "Packed-Ensemble (2, alpha=2)",
                        "distilled student (T=1)"]
  sets = ["digits", "rotate60", "noise0.4", "contrast0.2", "other"]
  assert res["sets"]["test"] == [200, 28, 28, 1] and res["sets"]["digits"] == [200, 28, 28, 1]
  for name, r in rows.items():
    for s in sets:
      assert r[f"auroc_{s}"] == res["ood"][name][s]["ensemble"]["predictive_entropy"]["auroc"]
  de, single = rows["deep ensemble (2)"], rows["single model"]
  assert (de["train_flops_x"], de["passes"], de["infer_flops_x"]) == (2.0, 2, 2.0)
  assert (single["train_flops_x"], single["train_time_x"]) == (1.0, 1.0)
  assert rows["SWAG (3 samples)"]["train_s"] == rows["SWA"]["train_s"]     # one run, two rows
  student = rows["distilled student (T=1)"]
  for m in ("nll", "ece"):
    assert res["gain_retained"][m] == pytest.approx(
        (single[m] - student[m]) / (single[m] - de[m]))
  md = open(os.path.join(wd, "results.md")).read()
  assert "auroc_other" in md and "gain retained" in md
