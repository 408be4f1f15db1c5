"""Permutation alignment of independently trained networks (Git Re-Basin weight matching).

Hidden units of a network can be permuted without changing its function. Two networks
trained from different seeds are, as a rule, not averageable as they are, but after
permuting the units of one to match the other they often are (Ainsworth et al. 2023,
"Git Re-Basin", weight matching; the algorithm follows samuela/git-re-basin).

- `PermutationSpec` says which axis of which leaf each permutation acts on. Leaves are
  named by their "a/b/c" paths in the tree you pass (Flax variables
  `{"params": ..., "batch_stats": ...}` or bare params). `chain_spec` derives it
  from a chain of layers (kernel `(..., in, out)`, bias, and the normalisation layer
  after it); `mlp_permutation_spec` and `cnn_permutation_spec` read the layer names
  of our `MLP` and `CNN` from the tree.
- `weight_matching(key, spec, params_a, params_b, max_iter=)` finds permutations of
  `params_b` that maximise the inner product with `params_a`, one permutation at a
  time with `scipy.optimize.linear_sum_assignment`, in random order, until no
  permutation changes.
- `apply_permutation(spec, perm, tree)` permutes every leaf the spec names, BatchNorm
  running statistics included (`batch_stats/...` leaves of the same module).
- `interpolation_curve` / `barrier` measure the loss or accuracy barrier along
  `tree.interpolate(a, b, alpha)`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from ensembling import tree as tree_lib

PyTree = Any
Permutation = dict[str, np.ndarray]


class PermutationSpec(NamedTuple):
  """Which axes of which leaves each permutation acts on.

  Attributes:
    perm_to_axes: permutation name -> [(leaf name, axis), ...].
    axes_to_perm: leaf name -> one permutation name (or None) per axis of the leaf,
      or of its view when the leaf is in `views`.
    views: leaf name -> the shape to view the leaf as while permuting (e.g. a dense
      kernel after a flatten, (H*W*C, out) viewed as (H*W, C, out)).
  """
  perm_to_axes: dict[str, list[tuple[str, int]]]
  axes_to_perm: dict[str, tuple[str | None, ...]]
  views: dict[str, tuple[int, ...]] = {}


def make_spec(axes_to_perm: Mapping[str, Sequence[str | None]],
              views: Mapping[str, Sequence[int]] | None = None) -> PermutationSpec:
  """A `PermutationSpec` from its leaf -> axes table."""
  perm_to_axes: dict[str, list[tuple[str, int]]] = {}
  for name, axes in axes_to_perm.items():
    for axis, p in enumerate(axes):
      if p is not None:
        perm_to_axes.setdefault(p, []).append((name, axis))
  return PermutationSpec(perm_to_axes, {k: tuple(v) for k, v in axes_to_perm.items()},
                         {k: tuple(v) for k, v in (views or {}).items()})


def _modules(tree: PyTree) -> dict[str, list[tuple[str, str]]]:
  """module name (the path's second-to-last part) -> [(leaf path, leaf name)]."""
  out: dict[str, list[tuple[str, str]]] = {}
  for path, _ in tree_lib.named_leaves(tree):
    parts = path.split("/")
    if len(parts) >= 2:
      out.setdefault(parts[-2], []).append((path, parts[-1]))
  return out


def chain_spec(tree: PyTree, layers: Sequence[str], *,
               norms: Mapping[str, str] | None = None) -> PermutationSpec:
  """The spec of a chain of dense/conv layers whose hidden units may be permuted.

  Layer i has a `kernel` of shape (..., in, out) and maybe a `bias` (out,); its output
  units get permutation `P_<layer>` (the last layer's outputs are not permuted). The
  next layer's kernel is permuted on its input axis; when that input axis is a
  multiple of the previous width (a flatten of H x W x C), the kernel is viewed as
  (H*W, C, out). Every leaf of a normalisation module `norms[layer]` (scale, bias,
  running mean and var, in any collection) is permuted with its layer.

  Args:
    tree: Flax variables or params of one model (used for names and shapes).
    layers: module names in order, e.g. ["Dense_0", "Dense_1", "head"].
    norms: layer module name -> the normalisation module right after it.

  Returns:
    A `PermutationSpec`.
  """
  norms = dict(norms or {})
  mods = _modules(tree)
  shapes = {n: np.shape(x) for n, x in tree_lib.named_leaves(tree)}
  for m in list(layers) + list(norms.values()):
    if m not in mods:
      raise ValueError(f"Module {m!r} not found in the tree; modules are {sorted(mods)}.")
  axes: dict[str, tuple] = {}
  views: dict[str, tuple] = {}
  prev, prev_width = None, None
  for i, m in enumerate(layers):
    leaves = dict((leaf, path) for path, leaf in mods[m])
    if "kernel" not in leaves:
      raise ValueError(f"Layer {m!r} has no 'kernel' leaf (has {sorted(leaves)}).")
    kpath = leaves["kernel"]
    kshape = shapes[kpath]
    out_p = f"P_{m}" if i < len(layers) - 1 else None
    k_axes = [None] * len(kshape)
    k_axes[-1] = out_p
    if prev is not None:
      fan_in = kshape[-2]
      if fan_in == prev_width:
        k_axes[-2] = prev
      elif len(kshape) == 2 and fan_in % prev_width == 0:
        views[kpath] = (fan_in // prev_width, prev_width, kshape[-1])
        k_axes = [None, prev, out_p]
      else:
        raise ValueError(f"Layer {m!r} takes {fan_in} inputs; the previous layer gives "
                         f"{prev_width} (not a flatten of it either).")
    axes[kpath] = tuple(k_axes)
    if "bias" in leaves:
      axes[leaves["bias"]] = (out_p,)
    if m in norms and out_p is not None:
      for path, _ in mods[norms[m]]:
        axes[path] = (out_p,)
    prev, prev_width = out_p, kshape[-1]
  return make_spec(axes, views)


def _numbered(mods, pattern: str) -> list[str]:
  rx = re.compile(pattern)
  found = [(tuple(int(g) for g in rx.fullmatch(m).groups()), m) for m in mods if rx.fullmatch(m)]
  return [m for _, m in sorted(found)]


def mlp_permutation_spec(tree: PyTree) -> PermutationSpec:
  """The spec of `models.MLP` (layers Dense_0, Dense_1, ..., head), read from `tree`."""
  mods = _modules(tree)
  dense = _numbered(mods, r"Dense_(\d+)")
  if not dense or "head" not in mods:
    raise ValueError(f"Not an MLP tree (need Dense_i and head); modules are {sorted(mods)}.")
  return chain_spec(tree, dense + ["head"])


def cnn_permutation_spec(tree: PyTree) -> PermutationSpec:
  """The spec of `models.CNN` (conv{s}_{j} each followed by bn{s}_{j}, then head).

  ELU, max pooling and dropout act per channel, so they commute with permutations.
  """
  mods = _modules(tree)
  convs = _numbered(mods, r"conv(\d+)_(\d+)")
  if not convs or "head" not in mods:
    raise ValueError(f"Not a CNN tree (need conv{{s}}_{{j}} and head); modules are {sorted(mods)}.")
  norms = {c: "bn" + c[4:] for c in convs if "bn" + c[4:] in mods}
  return chain_spec(tree, convs + ["head"], norms=norms)


def perm_sizes(spec: PermutationSpec, tree: PyTree) -> dict[str, int]:
  """The length of every permutation, read from the leaves of `tree`."""
  shapes = {n: np.shape(x) for n, x in tree_lib.named_leaves(tree)}
  sizes = {}
  for p, entries in spec.perm_to_axes.items():
    name, axis = entries[0]
    if name not in shapes:
      raise ValueError(f"Leaf {name!r} of the spec is not in the tree.")
    sizes[p] = spec.views.get(name, shapes[name])[axis]
  return sizes


def identity_permutation(spec: PermutationSpec, tree: PyTree) -> Permutation:
  return {p: np.arange(n) for p, n in perm_sizes(spec, tree).items()}


def random_permutation(key, spec: PermutationSpec, tree: PyTree) -> Permutation:
  """A uniformly random permutation for every permutation of the spec."""
  rng = np.random.default_rng(_seed_of(key))
  return {p: rng.permutation(n) for p, n in perm_sizes(spec, tree).items()}


def _seed_of(key) -> int:
  if isinstance(key, (int, np.integer)):
    return int(key)
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def _permute(spec: PermutationSpec, perm: Permutation, name: str, x, *,
             except_axis: int | None = None):
  axes = spec.axes_to_perm.get(name)
  if axes is None:
    return x
  xp = jnp if isinstance(x, jax.Array) else np
  shape = np.shape(x)
  if name in spec.views:
    x = xp.reshape(x, spec.views[name])
  if len(axes) != np.ndim(x):
    raise ValueError(f"Spec gives {len(axes)} axes for '{name}' of shape {np.shape(x)}.")
  for axis, p in enumerate(axes):
    if p is None or axis == except_axis:
      continue
    if len(perm[p]) != np.shape(x)[axis]:
      raise ValueError(f"Permutation {p!r} has length {len(perm[p])} but '{name}' axis "
                       f"{axis} has size {np.shape(x)[axis]}.")
    x = xp.take(x, xp.asarray(perm[p]), axis=axis)
  return xp.reshape(x, shape) if except_axis is None else x


def apply_permutation(spec: PermutationSpec, perm: Permutation, tree: PyTree) -> PyTree:
  """Permutes every leaf that the spec names; other leaves are returned unchanged.

  For unit i of permutation P, the new unit i is the old unit `perm[P][i]`, on every
  axis P acts on (outputs of one layer, inputs of the next, BatchNorm scale, bias,
  running mean and variance).
  """
  missing = sorted(set(spec.perm_to_axes) - set(perm))
  if missing:
    raise ValueError(f"perm lacks permutation(s) {missing}.")
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _permute(spec, perm, tree_lib.path_str(path), x), tree)


def _matchable(name: str) -> bool:
  return not name.startswith("batch_stats") and "/batch_stats/" not in name


def weight_matching(key, spec: PermutationSpec, params_a: PyTree, params_b: PyTree, *,
                    max_iter: int = 100, init_perm: Permutation | None = None,
                    include: Callable[[str], bool] = _matchable) -> Permutation:
  """Permutations of `params_b` that best match `params_a` (Git Re-Basin, weight matching).

  Coordinate ascent: in a random order, each permutation P is set to the linear
  assignment that maximises sum over leaves on P of <a, permuted b> with the other
  permutations held fixed; stops after an iteration in which nothing improves.

  Args:
    key: a jax PRNG key or an int seed (the order of permutations in each iteration).
    spec: the `PermutationSpec` of both trees.
    params_a: the reference tree.
    params_b: the tree to permute (same structure).
    max_iter: the most iterations over all permutations.
    init_perm: start here (default: identities).
    include: which leaves (by name) take part in the matching; by default all but
      BatchNorm running statistics (which are permuted, not matched).

  Returns:
    {permutation name: int array}; `apply_permutation(spec, perm, params_b)` is then
    aligned with `params_a`.
  """
  tree_lib.check_same_structure([params_a, params_b], what="trees")
  a = {n: np.asarray(x, np.float64) for n, x in tree_lib.named_leaves(params_a)}
  b = {n: np.asarray(x, np.float64) for n, x in tree_lib.named_leaves(params_b)}
  sizes = perm_sizes(spec, params_a)
  perm = {p: np.asarray(v) for p, v in (init_perm or identity_permutation(spec, params_a)).items()}
  rng = np.random.default_rng(_seed_of(key))
  names = sorted(sizes)
  for _ in range(max_iter):
    progress = False
    for p in (names[i] for i in rng.permutation(len(names))):
      n = sizes[p]
      cost = np.zeros((n, n))
      for name, axis in spec.perm_to_axes[p]:
        if not include(name):
          continue
        wa = a[name].reshape(spec.views[name]) if name in spec.views else a[name]
        wb = _permute(spec, perm, name, b[name], except_axis=axis)
        wa = np.moveaxis(wa, axis, 0).reshape((n, -1))
        wb = np.moveaxis(wb, axis, 0).reshape((n, -1))
        cost += wa @ wb.T
      _, ci = linear_sum_assignment(cost, maximize=True)
      old = cost[np.arange(n), perm[p]].sum()
      new = cost[np.arange(n), ci].sum()
      if new > old + 1e-12 * max(1.0, abs(old)):
        perm[p] = ci
        progress = True
    if not progress:
      break
  return perm


def align_to_reference(key, spec: PermutationSpec, reference: PyTree,
                       others: Sequence[PyTree], *, max_iter: int = 100) -> list[PyTree]:
  """Each of `others` permuted by weight matching to `reference`."""
  keys = jax.random.split(key if not isinstance(key, int) else jax.random.key(key),
                          max(len(others), 1))
  out = []
  for k, tree in zip(keys, others):
    perm = weight_matching(k, spec, reference, tree, max_iter=max_iter)
    out.append(apply_permutation(spec, perm, tree))
  return out


# --------------------------------------------------------------------------- barriers

def interpolation_curve(eval_fn: Callable[[PyTree], Mapping[str, float]], tree_a: PyTree,
                        tree_b: PyTree, alphas: Sequence[float]) -> dict[str, np.ndarray]:
  """`eval_fn(interpolate(a, b, alpha))` for every alpha: {metric: (len(alphas),)}."""
  rows = [dict(eval_fn(tree_lib.interpolate(tree_a, tree_b, float(al)))) for al in alphas]
  return {k: np.asarray([float(r[k]) for r in rows]) for k in rows[0]}


def barrier(values: Sequence[float], alphas: Sequence[float], *,
            higher_is_better: bool = False) -> float:
  """The largest gap between a curve and the straight line joining its end points.

  For a loss: max_alpha [v(alpha) - ((1 - alpha) v(0) + alpha v(1))]; for an accuracy
  (`higher_is_better`) the sign is flipped, so a barrier is always >= 0 when the
  middle is worse. `alphas` must start at 0 and end at 1.
  """
  v = np.asarray(values, np.float64)
  al = np.asarray(alphas, np.float64)
  if al[0] != 0 or al[-1] != 1 or v.shape != al.shape:
    raise ValueError("barrier needs values at alphas running from 0 to 1.")
  line = (1 - al) * v[0] + al * v[-1]
  gap = (line - v) if higher_is_better else (v - line)
  return float(gap.max())
