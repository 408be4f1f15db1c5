"""Runs that cannot lie: verified checkpoints, fallback to the newest valid one, locks,
fingerprints, and kill -9 at three points, each rerun equal to an uninterrupted run."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

from conftest import REPO
from ensembling import checkpoint, members, models, optim, train, workdir as workdir_lib


def _fit(digits, wd, num_steps):
  model = models.MLP(widths=(16,), dropout=0.1)
  tx = optim.make_optimizer(learning_rate=0.05)
  state = members.init_states(members.init_members(jax.random.key(0), model,
                                                   digits.x_train[:1], 2), tx)
  step = members.ensemble_step(model=model, tx=tx, num_members=2)
  batch_fn, _ = train.make_batch_fn(digits.x_train[:256], digits.y_train[:256], seed=0,
                                    batch_size=32, num_members=2)
  out, _, hist = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=num_steps,
                           key=jax.random.key(1), workdir=wd, checkpoint_every=2,
                           eval_fn=lambda s: train.evaluate_members(model, s, digits.x_val,
                                                                    digits.y_val),
                           eval_every=2, progress=False)
  return jax.device_get(out), hist


def _newest_data_file(wd):
  files = glob.glob(os.path.join(wd, "checkpoints", "6", "state", "**", "d", "*"), recursive=True)
  return max(files, key=os.path.getsize)


def _flip_bit(wd):
  path = _newest_data_file(wd)
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x10
  open(path, "wb").write(bytes(raw))


def _truncate(wd):
  path = _newest_data_file(wd)
  raw = open(path, "rb").read()
  open(path, "wb").write(raw[: len(raw) // 3])


def _garble(wd):
  path = _newest_data_file(wd)
  raw = bytearray(open(path, "rb").read())
  raw[8:40] = np.random.default_rng(0).integers(0, 256, 32, dtype=np.uint8).tobytes()
  open(path, "wb").write(bytes(raw))


def _bad_metadata(wd):
  open(os.path.join(wd, "checkpoints", "6", "state", "_METADATA"), "w").write("{not json")


def _missing_item(wd):
  shutil.rmtree(os.path.join(wd, "checkpoints", "6", "state"))


@pytest.fixture(scope="module")
def reference(digits):
  return _fit(digits, None, 8)


@pytest.mark.parametrize("corrupt", [_flip_bit, _truncate, _garble, _bad_metadata, _missing_item],
                         ids=lambda f: f.__name__.strip("_"))
def test_corrupt_newest_checkpoint_falls_back_and_ends_as_uninterrupted(digits, tmp_path,
                                                                        reference, corrupt,
                                                                        caplog):
  wd = str(tmp_path)
  _fit(digits, wd, 6)  # checkpoints at steps 4 and 6 are kept
  corrupt(wd)
  with caplog.at_level("WARNING"):
    got, hist = _fit(digits, wd, 8)
  assert any("checkpoints/6" in r.message and "trying an older checkpoint" in r.message
             for r in caplog.records)
  chex.assert_trees_all_equal(got, reference[0])
  assert [r["step"] for r in hist] == [r["step"] for r in reference[1]]
  assert glob.glob(os.path.join(wd, "checkpoints", "6.corrupt-*"))  # kept aside, reported


def test_no_valid_checkpoint_is_a_clear_error(digits, tmp_path):
  wd = str(tmp_path)
  _fit(digits, wd, 6)
  for step in ("4", "6"):
    open(os.path.join(wd, "checkpoints", step, "state", "_METADATA"), "w").write("{")
  with pytest.raises(checkpoint.CheckpointError, match=r"No checkpoint verifies:(.|\n)*"
                     r"checkpoints/6(.|\n)*checkpoints/4"):
    _fit(digits, wd, 8)


def test_checksum_covers_values_shapes_and_paths():
  a = {"w": np.arange(4.0, dtype=np.float32)}
  assert checkpoint.checksum(a) == checkpoint.checksum({"w": np.arange(4.0, dtype=np.float32)})
  for other in ({"w": np.arange(4.0, dtype=np.float32)[::-1].copy()},
                {"w": np.arange(4.0, dtype=np.float32).reshape(2, 2)},
                {"v": np.arange(4.0, dtype=np.float32)},
                {"w": np.arange(4.0, dtype=np.float64)}):
    assert checkpoint.checksum(a) != checkpoint.checksum(other)


def test_workdir_lock_refuses_a_second_process(tmp_path):
  wd = str(tmp_path / "run")
  with workdir_lib.claim(wd, fields={"a": 1}):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from ensembling import workdir\n"
            "try:\n  workdir.claim(%r, fields={'a': 1}).__enter__()\n"
            "except workdir.WorkdirError as e:\n  print('REFUSED', e)\n") % (REPO, wd)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120).stdout
    assert out.startswith("REFUSED") and f"pid {os.getpid()}" in out
  with workdir_lib.claim(wd, fields={"a": 1}):  # released: the same config may resume
    pass
  with pytest.raises(workdir_lib.WorkdirError, match=r"a: 1 -> 2(.|\n)*--restart"):
    with workdir_lib.claim(wd, fields={"a": 2}):
      pass
  with workdir_lib.claim(wd, fields={"a": 2}, restart=True):  # old run deleted, new one recorded
    assert sorted(os.listdir(wd)) == [".lock", "run.json"]
    assert json.load(open(os.path.join(wd, "run.json")))["fields"] == {"a": 2}


def test_a_workdir_without_fingerprint_is_not_adopted(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(workdir_lib.WorkdirError, match="no run.json"):
    with workdir_lib.claim(str(tmp_path), fields={}):
      pass


def test_an_unreadable_run_json_is_named_and_kept(tmp_path):
  # truncated JSON, no "fields", not an object: claim and stored_fields both refuse it by
  # path, and the file is left as it was
  for i, text in enumerate(('{"fields": {"a": 1}, "sha', '{"sha256": "x"}', '[1, 2]')):
    wd = tmp_path / f"run{i}"
    wd.mkdir()
    (wd / "run.json").write_text(text)
    for call in (lambda: workdir_lib.claim(str(wd), fields={"a": 1}).__enter__(),
                 lambda: workdir_lib.stored_fields(str(wd))):
      with pytest.raises(workdir_lib.WorkdirError, match=f"run{i}/run.json is unreadable"):
        call()
    assert (wd / "run.json").read_text() == text


# --------------------------------------------------------------------------- end to end

KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    point = {point!r}
    from ensembling import checkpoint, members, report
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "mid_epoch":            # the 30th training step of the run
      calls = {{"n": 0}}
      step_call = members.MemberStep.__call__
      def counted(self, *a):
        calls["n"] += 1
        if calls["n"] == 30:
          die()
        return step_call(self, *a)
      members.MemberStep.__call__ = counted
    elif point == "save":               # inside orbax, while the second checkpoint is written
      saves = {{"n": 0}}
      orig = checkpoint.ocp.CheckpointManager.save
      def save(self, step, *a, **kw):
        saves["n"] += 1
        out = orig(self, step, *a, **kw)
        if saves["n"] == 2:
          die()
        return out
      checkpoint.ocp.CheckpointManager.save = save
    elif point == "final_eval":         # after training, while the report is computed
      report.ensemble_report = lambda *a, **k: die()
    from experiments import main
    sys.exit(main.main(["main", "--config=configs/default.py:runlocal",
                        "--workdir=" + {wd!r}, "--config.epochs=3"]))
""")


CLI = [sys.executable, "-m", "experiments.main", "--config=configs/default.py:runlocal",
       "--config.epochs=3"]


def _cli(wd, *extra):
  return subprocess.run([*CLI, f"--workdir={wd}", *extra], cwd=REPO, capture_output=True,
                        text=True, timeout=600)


def _together(commands, logs):
  """Runs the commands at once (the independent runs need not wait for each other); each
  one's stderr goes to its log file. Returns (returncode, stderr) per command, in order."""
  procs = []
  for cmd, log in zip(commands, logs):
    with open(log, "w") as err:
      procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                    text=True))
  codes = [p.wait(timeout=600) for p in procs]
  return [(c, open(log).read()) for c, log in zip(codes, logs)]


def test_kill_9_at_three_points_then_rerun_equals_uninterrupted(tmp_path):
  points = ("mid_epoch", "save", "final_eval")
  wds = {point: str(tmp_path / point) for point in points}
  # The reference run and the three runs killed at each point are independent: start them
  # at once, then the three reruns at once.
  first = _together([[*CLI, f"--workdir={tmp_path / 'ref'}"]]
                    + [[sys.executable, "-c", KILLER.format(repo=REPO, point=p, wd=wds[p])]
                       for p in points],
                    [tmp_path / f"{name}.log" for name in ("ref", *points)])
  assert first[0][0] == 0, first[0][1][-2000:]
  want = json.load(open(tmp_path / "ref" / "results.json"))
  for point, (code, err) in zip(points, first[1:]):
    assert code == -signal.SIGKILL, (point, err[-2000:])
    assert not os.path.exists(os.path.join(wds[point], "results.json"))
  again = _together([[*CLI, f"--workdir={wds[p]}"] for p in points],
                    [tmp_path / f"{p}.again.log" for p in points])
  ref_recs = [json.loads(l) for l in open(tmp_path / "ref" / "metrics.jsonl")]
  for point, (code, err) in zip(points, again):
    wd = wds[point]
    assert code == 0, (point, err[-2000:])
    assert json.load(open(os.path.join(wd, "results.json"))) == want, point
    recs = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [(r["step"], r["member"]) for r in recs] == [(r["step"], r["member"]) for r in ref_recs]
  # A changed config is refused before anything is touched, naming the field.
  changed = _cli(str(tmp_path / "ref"), "--config.optim.learning_rate=0.5")
  assert changed.returncode == 1 and "optim.learning_rate: 0.05 -> 0.5" in changed.stderr
  assert json.load(open(tmp_path / "ref" / "results.json")) == want


def test_a_concurrent_run_is_refused(tmp_path):
  wd = str(tmp_path / "w")
  first = subprocess.Popen([sys.executable, "-m", "experiments.main",
                            "--config=configs/default.py", f"--workdir={wd}"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(wd, "config.json")) and time.time() < deadline:
      time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "experiments.main",
                             "--config=configs/default.py", f"--workdir={wd}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert f"is in use by pid {first.pid}" in second.stderr
  finally:
    first.kill()
    first.wait()
