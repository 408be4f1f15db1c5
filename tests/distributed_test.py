"""Two processes, one ensemble (jax.distributed on localhost, gloo CPU collectives)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO

ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")


def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cmd(wd, *extra):
  return [sys.executable, "-m", "experiments.main", "--config=configs/default.py:runlocal",
          f"--workdir={wd}", "--config.members=4", *extra]


def _two(wd, port, *extra):
  args = lambda i: _cmd(wd, f"--config.distributed.coordinator=127.0.0.1:{port}",
                        "--config.distributed.num_processes=2",
                        f"--config.distributed.process_id={i}", *extra)
  procs = [subprocess.Popen(args(i), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  return [(p.wait(timeout=600), p.stderr.read()) for p in procs]


def test_two_processes_equal_one(tmp_path):
  single = subprocess.run(_cmd(tmp_path / "single"), cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-2000:]
  outs = _two(tmp_path / "multi", _port())
  assert [rc for rc, _ in outs] == [0, 0], [err[-2000:] for _, err in outs]
  a = json.load(open(tmp_path / "single" / "results.json"))
  b = json.load(open(tmp_path / "multi" / "results.json"))
  assert [m["accuracy"] for m in a["members"]] == [m["accuracy"] for m in b["members"]]
  assert a["ensemble"]["accuracy"] == b["ensemble"]["accuracy"]
  assert abs(a["ensemble"]["nll"] - b["ensemble"]["nll"]) < 1e-5
  for m, n in zip(a["members"], b["members"]):
    assert abs(m["nll"] - n["nll"]) < 1e-5
  lines = open(tmp_path / "multi" / "metrics.jsonl").read().splitlines()
  assert len(lines) == len(open(tmp_path / "single" / "metrics.jsonl").read().splitlines())
  # Resume: both processes restore the collective checkpoint and end where they were.
  again = _two(tmp_path / "multi", _port())
  assert [rc for rc, _ in again] == [0, 0], [err[-2000:] for _, err in again]
  assert json.load(open(tmp_path / "multi" / "results.json")) == b
  assert "resumed from step" in again[0][1]


@pytest.mark.parametrize("extra,message", [
    (("--config.distributed.num_processes=2", "--config.distributed.process_id=2",
      "--config.distributed.coordinator=127.0.0.1:1"), r"process_id must be an integer in \[0, 1\]"),
    (("--config.distributed.num_processes=2", "--config.distributed.process_id=1",
      "--config.distributed.timeout=3", "--config.distributed.coordinator=127.0.0.1:{port}"),
     "nothing answers at the coordinator"),
])
def test_bad_settings_fail_fast_with_a_message(tmp_path, extra, message):
  extra = [e.format(port=_port()) for e in extra]
  res = subprocess.run(_cmd(tmp_path / "w", *extra), cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 1
  assert __import__("re").search(message, res.stderr), res.stderr[-2000:]


def test_members_must_divide_over_all_devices(tmp_path):
  outs = _two(tmp_path / "w", _port(), "--config.members=3")
  assert [rc for rc, _ in outs] == [1, 1]
  assert all("do not divide over the 4 devices" in err for _, err in outs)
