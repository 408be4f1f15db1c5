"""Members trained by separate runs, assembled into one ensemble (`config.members_from`).

`train.fit_members(..., read_only=True)` loads what a finished run left (its verified
final checkpoint and metrics) and writes nothing; `configlib.member_sources` checks the
sources against the config before any work; an assembled run's members are the sources'
members, bit for bit, and a SuperNet over a run's own members reproduces that run."""

import hashlib
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest

from configs import deep_ensemble as cfg_de
from configs import supernet as cfg_supernet
from ensembling import checkpoint, configlib, members, models, optim, train
from ensembling import workdir as workdir_lib
from experiments.main import run_experiment


def _snapshot(directory):
  """{relative path: SHA-256 of its bytes, mtime} for every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = (hashlib.sha256(f.read()).hexdigest(),
                                                  os.stat(path).st_mtime_ns)
  return out


def _train(digits, wd, *, epochs, read_only=False):
  x, y = digits.x_train[:256], digits.y_train[:256]
  return train.train_members(models.MLP(widths=(16,), dropout=0.1), x, y, num_members=2,
                             tx=optim.make_optimizer(learning_rate=0.05), epochs=epochs,
                             batch_size=64, seed=3, workdir=wd, progress=False,
                             eval_data=(digits.x_val, digits.y_val), read_only=read_only)


def test_read_only_loads_the_final_state_and_writes_nothing(digits, tmp_path):
  wd = str(tmp_path / "run")
  trained = _train(digits, wd, epochs=2)
  before = _snapshot(wd)
  loaded = _train(digits, wd, epochs=2, read_only=True)
  chex.assert_trees_all_equal(jax.device_get(loaded.state), jax.device_get(trained.state))
  assert loaded.history == trained.history and len(loaded.history) == 4  # 2 evals x 2 members
  assert _snapshot(wd) == before
  # a run that has not reached the requested step is not finished: an error, nothing moved
  with pytest.raises(ValueError, match=r"no finished training: its checkpoints are at steps "
                                       r"\[4, 8\], and the run ends at step 12"):
    _train(digits, wd, epochs=3, read_only=True)
  with pytest.raises(ValueError, match="holds no checkpoint"):
    _train(digits, str(tmp_path / "empty"), epochs=2, read_only=True)
  # a corrupt final checkpoint is named, not replaced by an older one, and left in place
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(wd, "checkpoints", "8"))
                for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
  path = max(data_files, key=os.path.getsize)
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x10
  open(path, "wb").write(bytes(raw))
  corrupt = _snapshot(wd)
  with pytest.raises(checkpoint.CheckpointError, match="checkpoints/8"):
    _train(digits, wd, epochs=2, read_only=True)
  assert _snapshot(wd) == corrupt


def _de_config(**fields):
  c = cfg_de.get_config("runlocal")
  c.progress = False
  c.data.split_seed = 0
  for name, value in fields.items():
    c[name] = value
  return c


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Two one-member deep-ensemble runs (seeds 0 and 1) sharing split 0, and their results."""
  root = tmp_path_factory.mktemp("sources")
  out = {}
  for seed in (0, 1):
    wd = str(root / f"s{seed}")
    out[wd] = run_experiment(_de_config(members=1, seed=seed), wd)
  return out


def test_assembled_members_are_the_sources_members(sources, tmp_path):
  paths = list(sources)
  snaps = {p: _snapshot(p) for p in paths}
  wd = str(tmp_path / "both")
  res = run_experiment(_de_config(members=2, members_from=",".join(paths)), wd)
  record = json.load(open(os.path.join(wd, "members_from.json")))
  for i, p in enumerate(paths):  # member i of the ensemble is member 0 of source i
    assert res["members"][i]["accuracy"] == sources[p]["members"][0]["accuracy"]
    for metric in ("nll", "ece", "brier"):  # predicted 2 at a time instead of 1: rounding
      assert res["members"][i][metric] == pytest.approx(sources[p]["members"][0][metric],
                                                        rel=1e-6)
    assert _snapshot(p) == snaps[p]  # the sources are only read
  # reference: each member retrained in memory from its source's seed (bit-identical
  # states), then the probability average by hand
  splits = configlib.load_data(_de_config())
  probs = []
  for seed in (0, 1):
    model, r = configlib.train_members_from_config(_de_config(members=1, seed=seed), splits,
                                                   None)
    assert record[seed]["state_sha256"] == checkpoint.checksum(jax.device_get(r.state))
    probs.append(jax.nn.softmax(np.asarray(members.predict(model, r.state, splits.x_test))[0]))
  avg = np.mean(probs, axis=0)
  assert res["ensemble"]["accuracy"] == float(np.mean(avg.argmax(-1) == splits.y_test))
  assert res["ensemble"]["nll"] == pytest.approx(
      float(-np.mean(np.log(avg[np.arange(len(avg)), splits.y_test]))), rel=1e-5)
  assert [r["members"] for r in record] == [[0, 1], [1, 2]]
  assert [r["seed"] for r in record] == [0, 1]
  assert [r["fields_sha256"] for r in record] == [
      json.load(open(os.path.join(p, "run.json")))["sha256"] for p in paths]


def test_sources_are_checked_before_any_work(sources, tmp_path):
  s0, s1 = list(sources)
  target = str(tmp_path / "never")

  def refused(match, **fields):
    with pytest.raises(ValueError, match=match):
      run_experiment(_de_config(**fields), target)
    assert not os.path.exists(target)

  refused(r"members=3 but the sources hold 2", members=3, members_from=f"{s0},{s1}")
  refused(r"hold the same members \(seed 0, 1 members\)", members=2,
          members_from=f"{s0},{s0}")
  refused(r"nope is not a directory", members=1, members_from=str(tmp_path / "nope"))
  refused(r"optim.learning_rate: 0.05 -> 0.1", members=2, members_from=f"{s0},{s1}",
          optim=dict(_de_config().optim.to_dict(), learning_rate=0.1))
  c = _de_config(members=2, members_from=f"{s0},{s1}")
  c.data.split_seed = -1
  c.seed = 4  # its own split would be seed 4's: not the one the members were trained on
  with pytest.raises(ValueError, match=r"data.split_seed: 0 -> 4; runs of several seeds"):
    run_experiment(c, target)
  # an edited run.json, a run of another experiment, a run still in progress, itself
  edited = str(tmp_path / "edited")
  shutil.copytree(s1, edited)
  stored = json.load(open(os.path.join(edited, "run.json")))
  stored["fields"]["epochs"] = 9
  json.dump(stored, open(os.path.join(edited, "run.json"), "w"))
  refused(r"edited after the run", members=2, members_from=f"{s0},{edited}")
  other = str(tmp_path / "other")
  with workdir_lib.claim(other, fields={"experiment": "soups", "members": 1, "seed": 5}):
    pass
  refused(r"holds a 'soups' run", members=2, members_from=f"{s0},{other}")
  with workdir_lib.claim(s1, fields=json.load(open(os.path.join(s1, "run.json")))["fields"]):
    refused(r"in use by pid", members=2, members_from=f"{s0},{s1}")
  with pytest.raises(ValueError, match="this run's own workdir"):
    configlib.train_members_from_config(_de_config(members=2, members_from=f"{s0},{s1}"),
                                        configlib.load_data(_de_config()), s1)


def test_supernet_over_a_runs_members_reproduces_it_and_takes_new_heads(tmp_path):
  a = str(tmp_path / "a")
  base = cfg_supernet.get_config("runlocal")
  ref = run_experiment(base, a)
  again = cfg_supernet.get_config("runlocal")
  again.members_from = a
  res = run_experiment(again, str(tmp_path / "b"))
  for key in ("member_test_accuracy", "table12", "table5", "table6"):
    assert res[key] == ref[key], key
  seed1 = cfg_supernet.get_config("runlocal")
  seed1.members_from, seed1.supernet.head_seed = a, 1  # a new head on the same members
  other = run_experiment(seed1, str(tmp_path / "c"))
  assert other["member_test_accuracy"] == ref["member_test_accuracy"]
  assert other["table12"][-1]["supernet"] != ref["table12"][-1]["supernet"]
