"""report.cached: a stored result is reused only under its own key."""

import json

import numpy as np
import pytest

from ensembling import report


def test_cached_reuses_matching_key_and_recomputes_otherwise(tmp_path):
  path, calls = str(tmp_path / "sub" / "r.json"), []

  def compute(v):
    def f():
      calls.append(v)
      return {"acc": np.float32(v), "m": np.arange(3) * v, "nan": float("nan")}
    return f

  first = report.cached(path, key="a", compute=compute(0.5))
  assert first["acc"] == 0.5 and first["m"] == [0.0, 0.5, 1.0] and np.isnan(first["nan"])
  again = report.cached(path, key="a", compute=compute(9.0))
  assert calls == [0.5] and again["m"] == first["m"] and again["acc"] == first["acc"]
  other = report.cached(path, key="b", compute=compute(2.0))
  assert calls == [0.5, 2.0] and other["acc"] == 2.0
  assert json.load(open(path))["key"] == "b"


@pytest.mark.parametrize("text", ['{"key": "a", "val', '[1, 2]', '{"key": "a"}'])
def test_cached_recomputes_an_unreadable_file(tmp_path, text):
  path = tmp_path / "r.json"
  path.write_text(text)
  assert report.cached(str(path), key="a", compute=lambda: {"x": 1}) == {"x": 1}
  assert json.loads(path.read_text()) == {"key": "a", "value": {"x": 1}}


def test_cached_needs_a_key(tmp_path):
  with pytest.raises(ValueError, match="key"):
    report.cached(str(tmp_path / "r.json"), key="", compute=lambda: 1)
