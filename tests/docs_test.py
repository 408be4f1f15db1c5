"""The usage snippets in README.md and docs/*.md run as written.

Blocks fenced as ```python are complete programs and run here; fragments that need the
reader's own data are fenced as ```py and are not run.
"""

import os
import re

import pytest

from conftest import REPO


def _snippets(path):
  text = open(path).read()
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
                              if f.endswith(".md") and not f.startswith("results"))
CASES = [(d, i) for d in DOCS for i, _ in enumerate(_snippets(os.path.join(REPO, d)))]


@pytest.mark.parametrize("doc,index", CASES, ids=[f"{d}#{i}" for d, i in CASES])
def test_snippet_runs(doc, index, monkeypatch):
  monkeypatch.chdir(REPO)
  code = _snippets(os.path.join(REPO, doc))[index]
  exec(compile(code, f"{doc}[{index}]", "exec"), {"__name__": "__snippet__"})
