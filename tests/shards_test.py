"""ensembling.data.shards: disjoint class-skewed shards and per-member shard batches."""

import numpy as np
import pytest

from ensembling import data
from ensembling.data import shards


def _labels():
  return np.random.default_rng(1).permutation(np.repeat(np.arange(5), 40))  # 5 classes x 40


def test_shards_are_disjoint_equal_and_skewed_as_asked():
  y = _labels()
  s = shards.class_skewed_shards(y, num_shards=3, num_classes=5, dominant_per_shard=2,
                                 dominant_fraction=0.7, shard_size=30, seed=0)
  assert s.shape == (3, 30) and len(np.unique(s)) == 90  # no example in two shards
  dom = shards.dominant_classes(3, 5, 2)
  assert dom.tolist() == [[0, 1], [2, 3], [4, 0]]
  for row, d in zip(s, dom):
    counts = np.bincount(y[row], minlength=5)
    # 70% of 30 = 21 over the 2 dominant classes, 9 over the other 3 (largest remainders)
    assert sorted(counts[d].tolist()) == [10, 11] and counts.sum() == 30
    assert counts[np.setdiff1d(np.arange(5), d)].tolist() == [3, 3, 3]
  again = shards.class_skewed_shards(y, num_shards=3, num_classes=5, dominant_per_shard=2,
                                     dominant_fraction=0.7, shard_size=30, seed=0)
  np.testing.assert_array_equal(s, again)


def test_default_size_is_the_largest_that_fits():
  y = _labels()
  s = shards.class_skewed_shards(y, num_shards=2, num_classes=5, dominant_per_shard=1,
                                 dominant_fraction=0.9)
  n = s.shape[1]
  assert len(np.unique(s)) == s.size
  # class 0 dominates shard 0: 90% of the shard must come from its 40 examples
  assert 0.9 * n <= 40 + 1 and n > 30
  with pytest.raises(ValueError, match="need 4[0-9] examples of class 0, the pool has 40"):
    shards.class_skewed_shards(y, num_shards=2, num_classes=5, dominant_per_shard=1,
                               dominant_fraction=0.9, shard_size=n + 5)


def test_bad_arguments_are_named():
  y = _labels()
  with pytest.raises(ValueError, match="dominant_fraction must be in"):
    shards.class_skewed_shards(y, num_shards=2, num_classes=5, dominant_fraction=1.5)
  with pytest.raises(ValueError, match="num_shards must be an integer >= 1"):
    shards.class_skewed_shards(y, num_shards=0, num_classes=5)
  with pytest.raises(ValueError, match="must lie in"):
    shards.class_skewed_shards(y, num_shards=2, num_classes=3)


def test_each_member_reads_only_its_shard_in_its_own_order():
  x = np.arange(200, dtype=np.float32)[:, None]
  y = _labels()
  s = shards.class_skewed_shards(y, num_shards=2, num_classes=5, shard_size=50, seed=3)
  batch_fn, spe = shards.shard_batch_fn(x, y, s, seed=7, batch_size=8)
  assert spe == 6
  ref = data.member_batch_indices(7, 1, num_examples=50, batch_size=8, num_members=2)
  b = batch_fn(spe + 2)  # epoch 1, row 2
  assert b["x"].shape == (2, 8, 1)
  for k in range(2):
    np.testing.assert_array_equal(b["x"][k, :, 0], s[k][ref[2, k]])
    np.testing.assert_array_equal(b["y"][k], y[s[k][ref[2, k]]])
