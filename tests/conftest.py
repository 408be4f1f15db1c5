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
# The tests' programs are small and run for milliseconds, so compiling them dominates: LLVM
# at -O0 compiles them about a third faster (measured on the experiment smoke tests), and
# every comparison a test makes is between programs compiled with the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    f for f in (os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS) if f)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


def needs_shared_data(folder):
  """Marks a test to skip when ../shared/data/<folder> is absent (a checkout without it)."""
  return pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, folder)),
                            reason=f"../shared/data/{folder} not present")


@pytest.fixture(scope="session")
def digits():
  from ensembling import data
  return data.load({"name": "digits"}, seed=0)
