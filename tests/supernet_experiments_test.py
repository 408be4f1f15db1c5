"""Smoke tests of the SuperNet experiments (runlocal configs), and the 20 Newsgroups loader.

The library pieces are tested in supernet_test.py; each smoke test runs one experiment
through `experiments.main` and checks what holds by construction."""

import io
import os
import tarfile

import jax
import numpy as np
import pytest

from configs import supernet as cfg_supernet
from configs import supernet_partition as cfg_partition
from configs import supernet_time as cfg_time
from ensembling import configlib, data, supernet, tree
from ensembling.data import newsgroups
from experiments.main import run_experiment


def test_head_from_config_is_train_head_with_the_config_fields():
  """configlib's cache and head = `supernet.cache_features` / `train_head` called with
  config.supernet's fields by hand; `head_seed` overrides config.supernet.head_seed."""
  import chex
  import optax
  from ensembling import members
  config = cfg_supernet.get_config("runlocal")
  config.supernet.head_seed = 1
  splits = configlib.load_data(config)
  model = configlib.model_from_config(config.model, num_classes=splits.num_classes)
  variables = members.init_members(jax.random.key(0), model, splits.x_train[:1], 2)
  cache = configlib.supernet_cache_from_config(config, splits, model, variables,
                                               strategy="vmap")
  ref = supernet.cache_features(model, variables, {n: splits.split(n)[0] for n in (
      "train", "val", "test")}, batch_size=config.eval_batch_size, strategy="vmap")
  for n in ("train", "val", "test"):
    np.testing.assert_array_equal(cache[n]["features"], ref[n]["features"])
    np.testing.assert_array_equal(cache[n]["y"], splits.split(n)[1])
  heads = supernet.member_heads(variables["params"])
  sn = config.supernet
  steps = int(sn.head_epochs) * (len(splits.y_train) // int(sn.head_batch_size))
  tx = optax.adam(optax.cosine_decay_schedule(sn.head_lr, steps))
  ref = lambda seed: supernet.train_head(
      cache, heads, num_members=2, init="copy_scaled", tx=tx, epochs=int(sn.head_epochs),
      batch_size=int(sn.head_batch_size), seed=config.seed + seed,
      key=jax.random.key(config.seed + 7), l2=0.01, dropout=float(sn.head_dropout))[0]
  got = lambda **kw: configlib.train_head_from_config(
      config, cache, heads, num_members=2, init="copy_scaled", l2=0.01, scale=0.0, **kw)[0]
  chex.assert_trees_all_close(got(), ref(1), rtol=1e-6, atol=1e-7)  # config's head_seed
  chex.assert_trees_all_close(got(head_seed=3), ref(3), rtol=1e-6, atol=1e-7)  # override
  assert not np.allclose(np.asarray(ref(1)["kernel"]), np.asarray(ref(3)["kernel"]))


def test_supernet_experiment(tmp_path):
  config = cfg_supernet.get_config("runlocal")
  res = run_experiment(config, str(tmp_path))
  t12, acc = res["table12"], res["member_test_accuracy"]
  assert [r["members"] for r in t12] == list(range(1, config.members + 1))
  # One member: its softmax and majority votes are that member, and its copy_scaled head
  # (scale 1/1: the member's own head) starts at the member's accuracy (epoch-0 record).
  assert t12[0]["softmax_voting"]["accuracy"] == pytest.approx(acc[0])
  assert t12[0]["majority_voting"] == pytest.approx(acc[0])
  assert t12[0]["head_history"][0]["test_accuracy"] == pytest.approx(acc[0], abs=1e-6)
  for r in t12:
    assert r["best_member"] == max(acc[: r["members"]])
    # The untrained copy_scaled head (member heads scaled by 1/K, run on the cached
    # features) is the logit average computed from the cached logits: two paths, one answer.
    assert r["head_history"][0]["test_accuracy"] == pytest.approx(
        r["logit_average"]["accuracy"], abs=1e-6)
    assert r["head_history"][0]["test_nll"] == pytest.approx(r["logit_average"]["nll"], rel=1e-4)
    assert r["head_epoch"] == config.supernet.head_epochs  # head_select = last
  # Table 5 describes Table 12's K-member heads and votes.
  assert res["table5"]["supernet"]["accuracy"] == pytest.approx(t12[-1]["supernet"]["accuracy"])
  assert res["table5"]["softmax_voting"]["accuracy"] == pytest.approx(
      t12[-1]["softmax_voting"]["accuracy"])
  assert len(res["table6"]) == len(config.supernet.grid_l2) * len(config.supernet.grid_inits)
  # The boost starts from the trained members.
  stages = res["table3"]["stages"]
  assert [s["stage"] for s in stages] == [0, 1, 2]
  np.testing.assert_allclose(stages[0]["accuracy"], acc)
  assert (tmp_path / "accuracy_vs_members.png").exists()


def test_supernet_partition_experiment(tmp_path):
  config = cfg_partition.get_config("runlocal")
  res = run_experiment(config, str(tmp_path))
  p1, p2 = res["rows"]
  in_dim, c = 64, 10  # digits
  assert (p1["parts"], p2["parts"]) == (1, 2) and tuple(p2["sub_widths"]) == (6, 6)
  # P = 1: one member, so its vote is itself, and the SuperModel has the MLP's size.
  assert p1["softmax_voting"]["accuracy"] == pytest.approx(p1["members"]["accuracy"])
  assert p1["classical"]["accuracy"] == p1["members"]["accuracy"]
  assert p1["params"] == p1["classical"]["params"] == supernet.mlp_params(
      in_dim, (12, 12), num_classes=c)
  # The whole-trained PartitionedMLP is P MLPs of widths / P; the dense "equal-params" MLP
  # is the smallest scaling with at least the SuperModel's parameters.
  assert p2["whole_trained"]["params"] == 2 * supernet.mlp_params(in_dim, (6, 6), num_classes=c)
  eq = p2["classical_equal_params"]
  assert eq["params"] == supernet.mlp_params(in_dim, eq["widths"], num_classes=c) >= p2["params"]
  assert tuple(eq["widths"]) == supernet.equal_param_widths(in_dim, (12, 12), num_classes=c,
                                                            target=p2["params"])
  # Every training checkpoints into its own folder; a rerun resumes them all (nothing
  # retrained) and gives the same table.
  assert {"P1_members", "P2_members", "P2_whole", "P2_dense_eq"} <= set(os.listdir(tmp_path))
  again = run_experiment(config, str(tmp_path))["rows"]
  for r, a in zip(res["rows"], again):
    for key in ("members", "softmax_voting", "supermodel", "whole_trained",
                "classical_equal_params"):
      if key in r:
        assert a[key]["accuracy"] == r[key]["accuracy"], key


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_supernet_time_experiment(tmp_path, arch):
  config = cfg_time.get_config(f"runlocal,arch={arch}")
  assert config.timing.single.name == config.timing.sub.name == arch
  res = run_experiment(config, str(tmp_path))
  sub = configlib.model_from_config(config.timing.sub, num_classes=10)
  x = configlib.load_data(config).x_train[:1]
  one = sub.init(jax.random.key(0), x, train=False)["params"]
  assert res["supernet"]["params"] == config.timing.sub_members * tree.count_params(one)
  for arm in ("single", "supernet"):
    curve = res[arm]["curve"]
    assert [r["epoch"] for r in curve] == list(range(1, len(curve) + 1))
    assert len(curve) == config.timing.max_epochs or (
        curve[-1]["val_accuracy"] >= max(config.timing.targets))
    np.testing.assert_allclose([r["member_seconds"] for r in curve],
                               np.cumsum([r["train_seconds"] for r in curve]))
    assert res[arm]["time_to"] == supernet.time_to_accuracy(curve, config.timing.targets)
    assert curve[0]["compile_seconds"] > 0 and all(r["compile_seconds"] == 0 for r in curve[1:])
  for r in res["supernet"]["curve"]:  # members' cumulative time + this epoch's build
    assert r["seconds"] == pytest.approx(r["member_seconds"] + r["build_seconds"])
  assert (tmp_path / "val_accuracy_vs_time.png").exists()


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
