"""Shared fixtures. Tests run on CPU with small shapes; nothing is downloaded."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(scope="session")
def digits():
  from ensembling import data
  return data.load({"name": "digits"}, seed=0)
