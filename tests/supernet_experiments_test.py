"""Smoke tests of the SuperNet experiments (runlocal configs) and the 20 Newsgroups loader."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from configs import supernet as cfg_supernet
from configs import supernet_partition as cfg_partition
from configs import supernet_time as cfg_time
from ensembling import data
from ensembling.data import newsgroups
from experiments.main import run_experiment


def _read(workdir):
  assert os.path.exists(os.path.join(workdir, "results.md"))
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_supernet_experiment(tmp_path):
  res = _read_run(cfg_supernet.get_config("runlocal"), tmp_path)
  k = 2
  assert [r["members"] for r in res["table12"]] == list(range(1, k + 1))
  for r in res["table12"]:
    assert 0.0 <= r["supernet"]["accuracy"] <= 1.0 and np.isfinite(r["supernet"]["nll"])
    assert r["best_member"] == max(res["member_test_accuracy"][: r["members"]])
  # One member's softmax voting is that member.
  assert res["table12"][0]["softmax_voting"]["accuracy"] == pytest.approx(
      res["member_test_accuracy"][0])
  assert {g["init"] for g in res["table6"]} == {"random", "copy", "copy_scaled"}
  stages = res["table3"]["stages"]
  assert [s["stage"] for s in stages] == [0, 1, 2] and len(stages[0]["accuracy"]) == k
  assert set(res["table5"]) == {"members_average", "softmax_voting", "supernet"}
  assert os.path.exists(tmp_path / "accuracy_vs_members.png")


def _read_run(config, tmp_path):
  run_experiment(config, str(tmp_path))
  return _read(str(tmp_path))


def test_supernet_partition_experiment(tmp_path):
  res = _read_run(cfg_partition.get_config("runlocal"), tmp_path)
  rows = res["rows"]
  assert [r["parts"] for r in rows] == [1, 2]
  assert tuple(rows[1]["sub_widths"]) == (6, 6)
  assert "classical" in rows[0] and "whole_trained" in rows[1]
  eq = rows[1]["classical_equal_params"]
  assert abs(eq["params"] - rows[1]["params"]) / rows[1]["params"] < 0.2
  for r in rows:
    assert 0.0 <= r["supermodel"]["accuracy"] <= 1.0


def test_supernet_time_experiment(tmp_path):
  res = _read_run(cfg_time.get_config("runlocal"), tmp_path)
  assert np.all(np.diff([r["seconds"] for r in res["single"]["curve"]]) >= 0)
  for r in res["supernet"]["curve"]:  # members' cumulative time + this epoch's build
    assert r["seconds"] == pytest.approx(r["member_seconds"] + r["build_seconds"])
  assert np.all(np.diff([r["member_seconds"] for r in res["supernet"]["curve"]]) >= 0)
  for arm in ("single", "supernet"):
    curve = res[arm]["curve"]
    assert 1 <= len(curve) <= 2
    for t, hit in res[arm]["time_to"].items():
      first = next((r for r in curve if r["val_accuracy"] >= float(t)), None)
      assert (hit is None) == (first is None)


def _tiny_archive(path):
  posts = {
      ("train", "rec.autos"): ["car engine wheel", "engine car fast", "wheel car road",
                               "car car engine"],
      ("train", "sci.space"): ["orbit rocket moon", "moon orbit space", "rocket space launch",
                               "space orbit moon"],
      ("test", "rec.autos"): ["car wheel engine"],
      ("test", "sci.space"): ["rocket orbit caf\xe9"],
  }
  with tarfile.open(path, "w:gz") as tf:
    i = 0
    for (split, group), texts in posts.items():
      for t in texts:
        raw = t.encode("latin-1")
        info = tarfile.TarInfo(f"20news-bydate-{split}/{group}/{1000 + i}")
        info.size = len(raw)
        tf.addfile(info, io.BytesIO(raw))
        i += 1


def test_newsgroups_loader(tmp_path):
  _tiny_archive(tmp_path / newsgroups.ARCHIVE)
  raw = newsgroups.read_archive(str(tmp_path))
  assert len(raw["train"][0]) == 8 and len(raw["test"][0]) == 2
  assert raw["test"][0][1].endswith("caf\xe9")  # latin-1 decoded
  s = data.load({"name": "20newsgroups", "dir": str(tmp_path), "validation_size": 2,
                 "max_features": 50}, seed=0)
  assert s.num_classes == 2 and s.x_train.shape[0] == 6 and s.x_val.shape[0] == 2
  assert s.x_train.dtype == np.float32 and s.x_train.shape[1] == s.x_test.shape[1]
  # TF-IDF rows are L2-normalised; test words unseen in training ("cafe") are dropped.
  np.testing.assert_allclose(np.linalg.norm(s.x_train, axis=1), 1.0, rtol=1e-5)
  assert list(s.y_test) == [0, 1]  # sorted group order
  # The vocabulary comes from the training posts only (min_df=2 over 6 posts).
  from sklearn.feature_extraction.text import TfidfVectorizer
  texts, groups = raw["train"]
  (t_tr, _), _ = data.core.carve_validation(np.array(texts, dtype=object),
                                            np.zeros(len(texts)), size=2, seed=0)
  vocab = TfidfVectorizer(min_df=2).fit(list(t_tr)).vocabulary_
  assert s.x_train.shape[1] == len(vocab)


def test_newsgroups_missing_archive(tmp_path):
  with pytest.raises(FileNotFoundError, match="20 Newsgroups archive"):
    newsgroups.read_archive(str(tmp_path))


def test_head_optimizer_schedules():
  """Cosine: the rate reaches 0 after exactly head_epochs passes; constant: it stays."""
  import jax.numpy as jnp
  from experiments import supernet as exp
  sn = cfg_supernet.supernet_block(head_optimizer="sgd", head_lr=0.1, head_epochs=3,
                                   head_batch_size=10)
  params, grads = jnp.zeros(()), jnp.ones(())
  momentum_sum = lambda n: (1 - 0.9 ** n) / 0.1  # SGD momentum 0.9 trace after n unit grads
  for schedule in ("cosine", "constant"):
    sn.head_schedule = schedule
    tx = exp.head_optimizer(sn, 45)  # 4 steps per epoch (the last partial batch dropped)
    state = tx.init(params)
    updates = []
    for _ in range(13):
      update, state = tx.update(grads, state, params)
      updates.append(float(update))
    if schedule == "cosine":
      lr_11 = 0.1 * 0.5 * (1 + np.cos(np.pi * 11 / 12))
      assert updates[11] == pytest.approx(-lr_11 * momentum_sum(12), rel=1e-5)
      assert updates[12] == 0.0  # step 12 = 3 epochs x 4 steps: the rate is 0
    else:
      assert updates[12] == pytest.approx(-0.1 * momentum_sum(13), rel=1e-5)
  sn.head_schedule = "cosin"
  with pytest.raises(ValueError, match="head_schedule"):
    exp.head_optimizer(sn, 45)
