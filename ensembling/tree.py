"""Arithmetic on pytrees of ensemble members.

Conventions: a *stacked* tree holds K members along a leading axis of every leaf
(``params_K``); a *list* of trees holds one member per entry. Every function here is
pure and returns new trees.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def path_str(path) -> str:
  """Turns a `jax.tree_util` key path into an "a/b/c" name (`keystr(simple=True)`)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
  """Returns [("a/b/c", leaf), ...] in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), x) for p, x in leaves]


def check_same_structure(trees: Sequence[PyTree], *, what: str = "members",
                         check_shapes: bool = True) -> None:
  """Raises ValueError naming the first difference between `trees`.

  Args:
    trees: a non-empty sequence of pytrees that must share structure (and shapes).
    what: the noun used in error messages ("ingredients", "members", ...).
    check_shapes: also require identical leaf shapes.
  """
  if len(trees) == 0:
    raise ValueError(f"Expected at least one of the {what}, got an empty list.")
  ref_struct = jax.tree_util.tree_structure(trees[0])
  ref_named = named_leaves(trees[0])
  for i, t in enumerate(trees[1:], start=1):
    struct = jax.tree_util.tree_structure(t)
    if struct != ref_struct:
      ref_names = {n for n, _ in ref_named}
      names = {n for n, _ in named_leaves(t)}
      missing = sorted(ref_names - names)[:5]
      extra = sorted(names - ref_names)[:5]
      raise ValueError(
          f"{what} 0 and {i} have different tree structures; "
          f"missing in {i}: {missing}, extra in {i}: {extra}.")
    if check_shapes:
      for (name, a), (_, b) in zip(ref_named, named_leaves(t)):
        if np.shape(a) != np.shape(b):
          raise ValueError(
              f"{what} 0 and {i} differ in shape at '{name}': "
              f"{np.shape(a)} vs {np.shape(b)}.")


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks a list of identically shaped trees along a new leading member axis."""
  trees = list(trees)
  check_same_structure(trees)
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def concat(stacked_trees: Sequence[PyTree]) -> PyTree:
  """Joins stacked trees along their member axes: K_1 + K_2 + ... members, in order.

  >>> concat([{"w": jnp.zeros((2, 3))}, {"w": jnp.ones((1, 3))}])["w"].shape
  (3, 3)
  """
  trees = list(stacked_trees)
  check_same_structure(trees, what="stacked trees", check_shapes=False)
  first = named_leaves(trees[0])
  for i, t in enumerate(trees):
    num_members(t)  # every leaf has the member axis, of one size
    for (name, a), (_, b) in zip(first, named_leaves(t)):
      sa, sb = (np.shape(a)[1:], a.dtype), (np.shape(b)[1:], b.dtype)
      if sa != sb:
        raise ValueError(f"stacked trees 0 and {i} differ at '{name}' after the member axis: "
                         f"{sa[0]} {sa[1]} vs {sb[0]} {sb[1]}.")
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def num_members(stacked: PyTree) -> int:
  """The size of the leading member axis (checked equal across leaves)."""
  leaves = jax.tree.leaves(stacked)
  if not leaves:
    raise ValueError("Cannot count members of an empty tree.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f"Leaves disagree on the leading member axis (sizes {sorted(map(str, sizes))}).")
  return sizes.pop()


def index(stacked: PyTree, i: int) -> PyTree:
  """Member `i` of a stacked tree."""
  k = num_members(stacked)
  if not -k <= i < k:
    raise IndexError(f"Member index {i} out of range for {k} members.")
  return jax.tree.map(lambda x: x[i], stacked)


def take(stacked: PyTree, indices) -> PyTree:
  """The members at `indices` (a non-empty sequence of ints in [-K, K)), still stacked.

  Indices are checked here because a JAX gather clamps out-of-range ones silently
  (traced indices, under `jax.jit`, cannot be checked and are taken as they are).
  """
  k = num_members(stacked)
  if isinstance(indices, jax.core.Tracer):
    return jax.tree.map(lambda x: x[indices], stacked)
  idx = np.asarray(indices)
  if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"indices must be a non-empty 1-d sequence of ints, got {indices!r}.")
  out = idx[(idx < -k) | (idx >= k)]
  if out.size:
    raise IndexError(f"Member indices {out.tolist()} out of range for {k} members.")
  idx = jnp.asarray(idx, dtype=jnp.int32)
  return jax.tree.map(lambda x: x[idx], stacked)


def unstack(stacked: PyTree) -> list[PyTree]:
  """The inverse of `stack`: a list with one tree per member."""
  return [index(stacked, i) for i in range(num_members(stacked))]


def as_stacked(members: PyTree | Sequence[PyTree]) -> PyTree:
  """Accepts either a list of trees or an already stacked tree; returns stacked."""
  if isinstance(members, (list, tuple)):
    return stack(members)
  num_members(members)  # validates the member axis
  return members


def interpolate(tree_a: PyTree, tree_b: PyTree, alpha) -> PyTree:
  """(1 - alpha) * a + alpha * b, leafwise."""
  check_same_structure([tree_a, tree_b], what="trees")
  return jax.tree.map(lambda a, b: (1 - alpha) * a + alpha * b, tree_a, tree_b)


def weighted_sum(stacked: PyTree, weights) -> PyTree:
  """sum_k weights[k] * member_k; weights has shape (K,)."""
  w = jnp.asarray(weights)
  k = num_members(stacked)
  if w.shape != (k,):
    raise ValueError(f"weights must have shape ({k},), got {w.shape}.")
  return jax.tree.map(
      lambda x: jnp.tensordot(w.astype(jnp.result_type(x, w)), x, axes=1).astype(x.dtype),
      stacked)


def mean(stacked: PyTree) -> PyTree:
  """The equal-weight average of the stacked members."""
  return jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), stacked)


def broadcast(tree: PyTree, num: int) -> PyTree:
  """Repeats one tree `num` times along a new leading member axis."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + jnp.shape(x)), tree)


def path_mask(tree: PyTree, patterns: str | Iterable[str]) -> PyTree:
  """A tree of bools: True where the leaf's "a/b/c" name matches any regex.

  Patterns use `re.search`, so "Dense_2" matches "params/Dense_2/kernel" and
  "^params/head/" anchors at the start.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  regexes = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(r.search(path_str(p)) for r in regexes), tree)


def partition_labels(tree: PyTree, rules: Sequence[tuple[str, str]],
                     default: str) -> PyTree:
  """Labels each leaf with the first rule (regex, label) whose regex matches.

  The result feeds `optax.partition` (a.k.a. `multi_transform`).
  """
  compiled = [(re.compile(p), label) for p, label in rules]

  def label(path, _):
    name = path_str(path)
    for r, lab in compiled:
      if r.search(name):
        return lab
    return default

  return jax.tree_util.tree_map_with_path(label, tree)


def transplant(source: PyTree, target: PyTree, *, exclude: str | Iterable[str] = ()) -> PyTree:
  """`target` with every leaf that `source` has at the same path and shape copied in.

  For fine-tuning: `transplant(pretrained, fresh_init, exclude="^params/head/")` keeps a
  new model's freshly initialised head (other classes) and takes everything else from the
  pre-trained model. Leaves of `target` missing from `source`, of another shape, or
  matching an `exclude` regex keep their values.

  >>> import jax.numpy as jnp
  >>> src = {"body": jnp.ones(2), "head": jnp.ones(3)}
  >>> dst = {"body": jnp.zeros(2), "head": jnp.zeros(5)}
  >>> {k: v.tolist() for k, v in transplant(src, dst).items()}
  {'body': [1.0, 1.0], 'head': [0.0, 0.0, 0.0, 0.0, 0.0]}
  """
  patterns = [exclude] if isinstance(exclude, str) else list(exclude)
  regexes = [re.compile(p) for p in patterns]
  have = dict(named_leaves(source))

  def take(path, leaf):
    name = path_str(path)
    src = have.get(name)
    if src is None or np.shape(src) != np.shape(leaf) or any(r.search(name) for r in regexes):
      return leaf
    return jnp.asarray(src, dtype=jnp.asarray(leaf).dtype)

  return jax.tree_util.tree_map_with_path(take, target)


def all_finite(tree: PyTree) -> jax.Array:
  """A scalar bool: every leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def finite_members(stacked: PyTree) -> np.ndarray:
  """A (K,) bool array: which members have only finite leaves."""
  k = num_members(stacked)
  ok = np.ones((k,), dtype=bool)
  for x in jax.tree.leaves(stacked):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.inexact):
      ok &= np.isfinite(x.reshape(k, -1)).all(axis=1)
  return ok


def count_params(tree: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def map_members(fn: Callable, stacked: PyTree, *args, **kwargs):
  """Applies `fn(member, *args)` to each member with `jax.vmap`."""
  return jax.vmap(lambda m: fn(m, *args, **kwargs))(stacked)
