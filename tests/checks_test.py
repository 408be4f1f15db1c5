"""The shared count check, and the library functions that take counts through it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import checks, distributed, members, metrics, schedules, soups
from ensembling import low_precision
from ensembling.data import shards
from ensembling.models import batchensemble, mimo, packed


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), np.asarray(3), jnp.asarray(3)])
def test_integer_accepts_every_integer_kind_and_returns_a_python_int(value):
  out = checks.integer(value, name="n")
  assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, False, 2.0, 2.5, "3", None, np.float32(3), np.asarray([3])])
def test_integer_refuses_what_is_not_an_integer(value):
  with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got "):
    checks.integer(value, name="n")


def test_integer_bounds_are_inclusive_and_named():
  assert checks.integer(0, name="n", low=0) == 0
  assert checks.integer(8, name="bits", low=3, high=8) == 8
  for bad in (2, 9):
    with pytest.raises(ValueError, match=rf"^bits must be an integer in \[3, 8\], got {bad}\.$"):
      checks.integer(bad, name="bits", low=3, high=8)
  with pytest.raises(ValueError, match=r"^n must be an integer >= -1, got -2\.$"):
    checks.integer(-2, name="n", low=-1)
  assert low_precision.check_bits(np.int64(4)) == 4  # the library's bounded count
  for bad in (True, 4.0, 9):
    with pytest.raises(ValueError, match=rf"bits must be an integer in \[3, 8\], got {bad!r}"):
      low_precision.check_bits(bad)


# Each call takes a count `n`; before the shared check, some of these accepted True (as 1)
# or 2.0, and some refused np.int64, depending on which copy of the check they carried.
y = np.repeat(np.arange(4), 5)
p = np.full((20, 4), 0.25)
CALLS = {
    "members.check_num_members": lambda n: members.check_num_members(n),
    "metrics.ece num_bins": lambda n: metrics.ece(p, y, num_bins=n),
    "metrics.top_k_accuracy k": lambda n: metrics.top_k_accuracy(p, y, k=n),
    "schedules.cycle_length": lambda n: schedules.cycle_length(8, n),
    "schedules.warmup_cosine": lambda n: schedules.warmup_cosine(0.1, n),
    "schedules.swa_schedule anneal_steps": lambda n: schedules.swa_schedule(0.1, 0.01,
                                                                            anneal_steps=n),
    "schedules.after_pretraining": lambda n: schedules.after_pretraining(
        optax.constant_schedule(0.1), pretrain_steps=n, pretrain_schedule=0.2),
    "soups.held_out_batches": lambda n: soups.held_out_batches(p, y, batch_size=n),
    "shards.class_skewed_shards": lambda n: shards.class_skewed_shards(
        y, num_shards=n, num_classes=4, dominant_per_shard=1, dominant_fraction=0.4,
        shard_size=4),
    "mimo.repeat_input": lambda n: mimo.repeat_input(np.zeros((2, 3)), num_members=n),
    "mimo.mimo_batch batch_repetitions": lambda n: mimo.mimo_batch(
        jax.random.key(0), np.zeros((4, 3)), np.arange(4), num_members=2, batch_repetitions=n),
    "packed.packed_width": lambda n: packed.packed_width(8, num_estimators=n, alpha=1.0),
    "packed.packed_width gamma": lambda n: packed.packed_width(8, num_estimators=2, alpha=2.0,
                                                               gamma=n),
    "batchensemble.repeat_batch": lambda n: batchensemble.repeat_batch(np.zeros((2, 3)),
                                                                       num_members=n),
    "distributed.check_settings": lambda n: distributed.check_settings(
        coordinator="127.0.0.1:1", num_processes=n, process_id=0),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_library_counts_take_numpy_integers_and_refuse_bools_and_floats(name):
  call = CALLS[name]
  call(np.int64(2))  # a count read from a NumPy array is a count
  for bad in (True, 2.0):
    with pytest.raises(ValueError, match=rf"must be an integer .*got {bad!r}"):
      call(bad)


def test_paired_names_both_lengths_and_where():
  checks.paired(np.zeros((3, 2)), [0, 1, 2])
  with pytest.raises(ValueError, match=r"^x has 3 examples but y has 2\.$"):
    checks.paired(np.zeros((3, 2)), [0, 1])
  with pytest.raises(ValueError, match=r"^evaluate: x has 1 examples but y has 2\.$"):
    checks.paired([0], [0, 1], where="evaluate")
