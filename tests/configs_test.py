"""Every config file loads, with and without its `runlocal` switch, and via the flags."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads(path):
  mod = _load(path)
  if not hasattr(mod, "get_config"):
    pytest.skip("helper module")
  for arg in (None, "runlocal"):
    c = mod.get_config(arg)
    assert c.experiment and os.path.exists(os.path.join(REPO, "experiments", c.experiment + ".py"))
    assert mod.__doc__ and "python -m experiments.main" in mod.__doc__


def test_flag_typo_is_rejected():
  res = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=configs/default.py:runlocal",
       "--workdir=/tmp/unused", "--config.memberz=3"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode != 0
  assert "memberz" in res.stderr
