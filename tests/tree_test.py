import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import tree as tree_lib


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 2))), "bias": jnp.asarray(rng.normal(size=(2,)))},
          "b": [jnp.asarray(rng.normal(size=(4,)))]}


def test_stack_unstack_index_roundtrip():
  trees = [_tree(i) for i in range(3)]
  stacked = tree_lib.stack(trees)
  assert tree_lib.num_members(stacked) == 3
  assert stacked["a"]["kernel"].shape == (3, 3, 2)
  for i, t in enumerate(tree_lib.unstack(stacked)):
    chex.assert_trees_all_equal(t, trees[i])
  chex.assert_trees_all_equal(tree_lib.index(stacked, -1), trees[2])
  chex.assert_trees_all_equal(tree_lib.take(stacked, [2, 0]), tree_lib.stack([trees[2], trees[0]]))
  with pytest.raises(IndexError):
    tree_lib.index(stacked, 3)
  chex.assert_trees_all_equal(tree_lib.take(stacked, np.array([-1])), tree_lib.stack([trees[2]]))
  for bad in ([3], [0, -4]):  # a bare JAX gather would clamp these to member 2 / 0
    with pytest.raises(IndexError, match=r"out of range for 3 members"):
      tree_lib.take(stacked, bad)
  for bad in ([], [0.0, 1.0], [[0, 1]]):
    with pytest.raises(ValueError, match="non-empty 1-d sequence of ints"):
      tree_lib.take(stacked, bad)
  jitted = jax.jit(lambda idx: tree_lib.take(stacked, idx))(jnp.array([1, 2]))
  chex.assert_trees_all_equal(jitted, tree_lib.stack([trees[1], trees[2]]))


def test_weighted_sum_mean_interpolate_against_numpy():
  trees = [_tree(i) for i in range(4)]
  stacked = tree_lib.stack(trees)
  w = np.array([0.1, 0.2, 0.3, 0.4])
  got = tree_lib.weighted_sum(stacked, w)
  want = {"a": {"kernel": sum(w[i] * np.asarray(trees[i]["a"]["kernel"]) for i in range(4)),
                "bias": sum(w[i] * np.asarray(trees[i]["a"]["bias"]) for i in range(4))},
          "b": [sum(w[i] * np.asarray(trees[i]["b"][0]) for i in range(4))]}
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  chex.assert_trees_all_close(tree_lib.mean(stacked), tree_lib.weighted_sum(stacked, np.full(4, 0.25)), rtol=1e-6)
  mid = tree_lib.interpolate(trees[0], trees[1], 0.25)
  np.testing.assert_allclose(mid["b"][0], 0.75 * np.asarray(trees[0]["b"][0]) + 0.25 * np.asarray(trees[1]["b"][0]), rtol=1e-6)
  with pytest.raises(ValueError, match=r"shape \(4,\)"):
    tree_lib.weighted_sum(stacked, np.ones(3))


def test_mismatched_trees_give_named_errors():
  a = _tree(0)
  b = {"a": {"kernel": jnp.zeros((3, 2))}, "b": [jnp.zeros(4)]}
  with pytest.raises(ValueError, match="missing in 1: \\['a/bias'\\]"):
    tree_lib.stack([a, b])
  c = _tree(1)
  c["a"]["kernel"] = jnp.zeros((3, 5))
  with pytest.raises(ValueError, match="'a/kernel': \\(3, 2\\) vs \\(3, 5\\)"):
    tree_lib.stack([a, c])
  with pytest.raises(ValueError, match="empty"):
    tree_lib.stack([])
  with pytest.raises(ValueError, match="leading member axis"):
    tree_lib.num_members({"x": jnp.zeros((2, 3)), "y": jnp.zeros((3,))})


def test_path_mask_and_partition_labels():
  t = {"params": {"Dense_0": {"kernel": 1, "bias": 2}, "head": {"kernel": 3, "bias": 4}}}
  mask = tree_lib.path_mask(t, "^params/head/")
  assert mask == {"params": {"Dense_0": {"kernel": False, "bias": False},
                             "head": {"kernel": True, "bias": True}}}
  labels = tree_lib.partition_labels(t, [("head/kernel", "train"), ("bias", "nodecay")], "frozen")
  assert labels == {"params": {"Dense_0": {"kernel": "frozen", "bias": "nodecay"},
                               "head": {"kernel": "train", "bias": "nodecay"}}}


def test_finite_members_flags_nan_member():
  stacked = tree_lib.stack([_tree(i) for i in range(3)])
  stacked["a"]["bias"] = stacked["a"]["bias"].at[1, 0].set(jnp.nan)
  np.testing.assert_array_equal(tree_lib.finite_members(stacked), [True, False, True])
  assert not bool(tree_lib.all_finite(stacked))
  assert bool(tree_lib.all_finite(tree_lib.index(stacked, 0)))


def test_concat_joins_member_axes_in_order():
  a, b = tree_lib.stack([_tree(0), _tree(1)]), tree_lib.stack([_tree(2)])
  joined = tree_lib.concat([a, b])
  assert tree_lib.num_members(joined) == 3
  for i, t in enumerate([_tree(0), _tree(1), _tree(2)]):
    chex.assert_trees_all_equal(tree_lib.index(joined, i), t)
  bad = tree_lib.stack([{"a": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(2)},
                         "b": [jnp.zeros(4)]}])
  with pytest.raises(ValueError, match="a/kernel"):
    tree_lib.concat([a, bad])
  with pytest.raises(ValueError, match="structure"):
    tree_lib.concat([a, {"a": a["a"]}])
