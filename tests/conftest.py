"""Shared fixtures. Tests run on CPU with small shapes; nothing is downloaded.

Compiled programs are kept in a persistent JAX compilation cache for the session (and
inherited by the subprocesses the tests start), so the same step compiled in several
processes or tests is compiled once: it cut the launcher tests' CPU time by about a third.
"""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"ensembling-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(scope="session")
def digits():
  from ensembling import data
  return data.load({"name": "digits"}, seed=0)
