"""Permutation alignment of independently trained networks (Git Re-Basin weight matching).

Hidden units of a network can be permuted without changing its function. Two networks
trained from different seeds are, as a rule, not averageable as they are, but after
permuting the units of one to match the other they often are (Ainsworth et al. 2023,
"Git Re-Basin", weight matching; the algorithm follows samuela/git-re-basin).

- `PermutationSpec` says which axis of which leaf each permutation acts on. Leaves are
  named by their "a/b/c" paths in the tree you pass (Flax variables
  `{"params": ..., "batch_stats": ...}` or bare params). `chain_spec` derives it
  from a chain of layers (kernel `(..., in, out)`, bias, and the normalisation layer
  after it); `mlp_permutation_spec`, `cnn_permutation_spec` and
  `resnet_permutation_spec` read the layer names of our `MLP` (with or without
  BatchNorm), `CNN` and `ResNet` from the tree.
- `weight_matching(key, spec, params_a, params_b, max_iter=)` finds permutations of
  `params_b` that maximise the inner product with `params_a`, one permutation at a
  time with `scipy.optimize.linear_sum_assignment`, in random order, until no
  permutation changes.
- `activation_matching(spec, acts_a, acts_b)` matches the units of each permutation by
  the correlation of their activations on the same data (`collect_activations`,
  `mlp_activations`, `resnet_activations` gather them).
- `merge_many(key, spec, models, max_iter=)` (MergeMany) aligns K models to each other:
  each in turn is weight-matched to the mean of the others, until a full round changes
  no permutation. `align_models(key, spec, models, method=)` runs any of the four
  (`ALIGN_METHODS`: naive, weight matching or activation matching to a reference,
  MergeMany), so that the aligned models' average is the merge.
- `apply_permutation(spec, perm, tree)` permutes every leaf the spec names, BatchNorm
  running statistics included (`batch_stats/...` leaves of the same module).
- `interpolation_curve` / `barrier` measure the loss or accuracy barrier along
  `tree.interpolate(a, b, alpha)`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

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
  """The spec of `models.MLP` (layers Dense_0, Dense_1, ..., head), read from `tree`.

  With `batch_norm=True` each `bn_i` (scale and bias in params, running mean and var in
  batch_stats) is permuted with the outputs of `Dense_i`; weight matching then matches
  the BatchNorm scale and bias too (the running statistics are permuted, not matched).

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> v = models.MLP(widths=(4,), num_classes=2, batch_norm=True).init(
  ...     jax.random.key(0), jnp.ones((1, 3)))
  >>> sorted(mlp_permutation_spec(v).perm_to_axes["P_Dense_0"])
  ... # doctest: +NORMALIZE_WHITESPACE
  [('batch_stats/bn_0/mean', 0), ('batch_stats/bn_0/var', 0), ('params/Dense_0/bias', 0),
   ('params/Dense_0/kernel', 1), ('params/bn_0/bias', 0), ('params/bn_0/scale', 0),
   ('params/head/kernel', 0)]
  """
  mods = _modules(tree)
  dense = _numbered(mods, r"Dense_(\d+)")
  if not dense or "head" not in mods:
    raise ValueError(f"Not an MLP tree (need Dense_i and head); modules are {sorted(mods)}.")
  norms = {d: "bn_" + d[len("Dense_"):] for d in dense if "bn_" + d[len("Dense_"):] in mods}
  return chain_spec(tree, dense + ["head"], norms=norms)


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


_RESNET_BLOCK = re.compile(r"stage(\d+)_block(\d+)")
_RESNET_BLOCK_MODULES = {"conv1", "bn1", "conv2", "bn2", "proj", "bn_proj"}


def resnet_permutation_spec(tree: PyTree) -> PermutationSpec:
  """The spec of `models.ResNet`, read from `tree` (any depth and width multiplier).

  A residual stream adds a block's input to its output, so every layer that writes to
  one stream must share its permutation: the stem and `bn_stem` and, in every block of
  stage 0, `conv2`/`bn2` write to `P_res0`; a block with a projection shortcut (the
  first block of each later stage) starts a new stream `P_res<s>`, written by its
  `conv2`/`bn2` and `proj`/`bn_proj` and by `conv2`/`bn2` of the stage's other blocks;
  each block reads its input stream in `conv1` (and `proj`). Inside a block, the
  outputs of `conv1`/`bn1` have their own permutation `P_stage<s>_block<b>_inner`. The
  head reads the last stream (global average pooling and ReLU act per channel). This
  is the structure of the Git Re-Basin authors' ResNet-20 spec.

  Args:
    tree: Flax variables (`{"params", "batch_stats"}`) or bare params of a `ResNet`.

  Returns:
    A `PermutationSpec` (BatchNorm running statistics included).

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> v = models.ResNet(blocks_per_stage=1, widths=(2, 4)).init(
  ...     jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  >>> sorted(resnet_permutation_spec(v).perm_to_axes)
  ['P_res0', 'P_res1', 'P_stage0_block0_inner', 'P_stage1_block0_inner']
  """
  top: dict[str, list[str]] = {}
  blocks: dict[tuple[int, int], dict[str, list[str]]] = {}
  for path, _ in tree_lib.named_leaves(tree):
    parts = path.split("/")
    at = next((i for i, q in enumerate(parts) if _RESNET_BLOCK.fullmatch(q)), None)
    if at is not None and at + 2 < len(parts):
      sb = tuple(int(g) for g in _RESNET_BLOCK.fullmatch(parts[at]).groups())
      module = parts[at + 1]
      if module not in _RESNET_BLOCK_MODULES:
        raise ValueError(f"Unexpected module {module!r} in ResNet block {parts[at]!r} "
                         f"('{path}').")
      blocks.setdefault(sb, {}).setdefault(module, []).append(path)
    elif len(parts) >= 2:
      top.setdefault(parts[-2], []).append(path)
  if not blocks or not {"stem", "bn_stem", "head"} <= set(top):
    raise ValueError("Not a ResNet tree (need stem, bn_stem, stage<s>_block<b>, head); "
                     f"top-level modules are {sorted(top)}.")
  extra = sorted(set(top) - {"stem", "bn_stem", "head"})
  if extra:
    raise ValueError(f"Unexpected ResNet modules {extra}.")
  axes: dict[str, tuple] = {}

  def conv(paths, p_in, p_out):
    for path in paths:
      axes[path] = (None, None, p_in, p_out) if path.endswith("/kernel") else (p_out,)

  def norm(paths, p):
    for path in paths:
      axes[path] = (p,)

  stream = "P_res0"
  conv(top["stem"], None, stream)
  norm(top["bn_stem"], stream)
  for (s, b) in sorted(blocks):
    mods = blocks[(s, b)]
    missing = sorted({"conv1", "bn1", "conv2", "bn2"} - set(mods))
    if missing or ("proj" in mods) != ("bn_proj" in mods):
      raise ValueError(f"ResNet block stage{s}_block{b} lacks {missing or ['proj/bn_proj']}.")
    inner = f"P_stage{s}_block{b}_inner"
    out = stream
    if "proj" in mods:  # a projection shortcut starts a new residual stream
      out = f"P_res{s}" if f"P_res{s}" != stream else f"P_res{s}_block{b}"
      conv(mods["proj"], stream, out)
      norm(mods["bn_proj"], out)
    conv(mods["conv1"], stream, inner)
    norm(mods["bn1"], inner)
    conv(mods["conv2"], inner, out)
    norm(mods["bn2"], out)
    stream = out
  for path in top["head"]:
    axes[path] = (stream, None) if path.endswith("/kernel") else (None,)
  return make_spec(axes)


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


def activation_align_to_reference(spec: PermutationSpec,
                                  activations_fn: Callable[[PyTree, Any], Mapping[str, Any]],
                                  reference: PyTree, others: Sequence[PyTree],
                                  batches: Sequence[Any], *, similarity: str = "correlation"
                                  ) -> list[PyTree]:
  """Each of `others` permuted by activation matching to `reference` on `batches`.

  `collect_activations(activations_fn, tree, batches)` of every model (the same
  batches, so the rows are the same examples), then `activation_matching(spec,
  acts_reference, acts_other, similarity=)` and `apply_permutation`.

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> mlp = models.MLP(widths=(6,), num_classes=2)
  >>> v = mlp.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> spec = mlp_permutation_spec(v)
  >>> shuffled = apply_permutation(spec, random_permutation(1, spec, v), v)
  >>> back, = activation_align_to_reference(spec, mlp_activations(mlp), v, [shuffled],
  ...                                       [jax.random.normal(jax.random.key(2), (50, 3))])
  >>> bool(jnp.allclose(back["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel"]))
  True
  """
  batches = list(batches)
  acts_ref = collect_activations(activations_fn, reference, batches)
  out = []
  for tree in others:
    perm = activation_matching(spec, acts_ref, collect_activations(activations_fn, tree, batches),
                               similarity=similarity)
    out.append(apply_permutation(spec, perm, tree))
  return out


ALIGN_METHODS = ("naive", "weight_matching", "activation_matching", "merge_many")


def align_models(key, spec: PermutationSpec, models: Sequence[PyTree], *, method: str,
                 reference: int = 0, activations_fn: Callable | None = None,
                 batches: Sequence[Any] | None = None, max_iter: int = 100) -> list[PyTree]:
  """K models brought into one permutation by `method` (their average is then a merge).

  "naive": unchanged; "weight_matching": each model weight-matched to
  `models[reference]` (`align_to_reference`); "activation_matching": the same by
  `activation_align_to_reference` on `batches` (needs `activations_fn`);
  "merge_many": `merge_many(key, spec, models).models` (no reference).

  Returns:
    The K aligned models, in input order (the reference unchanged).
  """
  if method not in ALIGN_METHODS:
    raise ValueError(f"Unknown alignment method {method!r}; use one of {ALIGN_METHODS}.")
  models = list(models)
  if not 0 <= reference < len(models):
    raise ValueError(f"reference {reference} is not one of the {len(models)} models.")
  ref, others = models[reference], models[:reference] + models[reference + 1:]
  if method == "naive":
    return models
  if method == "merge_many":
    return merge_many(key, spec, models, max_iter=max_iter).models
  if method == "weight_matching":
    aligned = align_to_reference(key, spec, ref, others, max_iter=max_iter)
  else:
    if activations_fn is None or not batches:
      raise ValueError("activation_matching needs an activations_fn and batches.")
    aligned = activation_align_to_reference(spec, activations_fn, ref, others, batches)
  return aligned[:reference] + [ref] + aligned[reference:]


def _compose(first: Permutation, then: Permutation) -> Permutation:
  """The permutation equal to applying `first`, then `then`."""
  return {p: np.asarray(first[p])[np.asarray(then[p])] for p in first}


def _is_identity(perm: Permutation) -> bool:
  return all(np.array_equal(v, np.arange(len(v))) for v in perm.values())


class MergeManyResult(NamedTuple):
  """What `merge_many` returns.

  Attributes:
    models: the input models, each permuted (`apply_permutation(spec, perms[i],
      input_i)`), in input order.
    mean: their plain average (the merged model).
    perms: for each model, the permutation from the input to the aligned model.
    rounds: the full rounds run.
    converged: whether the last round changed no permutation.
  """
  models: list
  mean: PyTree
  perms: list
  rounds: int
  converged: bool


def merge_many(key, spec: PermutationSpec, models: PyTree | Sequence[PyTree], *,
               max_iter: int = 100, matching_max_iter: int = 100,
               include: Callable[[str], bool] = _matchable) -> MergeManyResult:
  """MergeMany (Ainsworth et al. 2023, "Git Re-Basin"): align K models to each other.

  Aligns K >= 2 models to a common permutation: in each round, every model in a random
  order is weight-matched to the mean of the other K - 1 (already permuted) models and
  permuted accordingly; stops after a full round in which no permutation changed (or
  after `max_iter` rounds).

  Args:
    key: a jax PRNG key or an int seed (visiting orders and weight-matching keys).
    spec: the `PermutationSpec` of the models.
    models: K pytrees (a list, or one stacked pytree, member axis first).
    max_iter: the most rounds over all models.
    matching_max_iter: `max_iter` of each `weight_matching`.
    include: which leaves take part in the matching (see `weight_matching`).

  Returns:
    A `MergeManyResult` (aligned models, their mean, the permutations, rounds, converged).

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> v = models.MLP(widths=(5,), num_classes=2).init(jax.random.key(0), jnp.ones((1, 3)))
  >>> spec = mlp_permutation_spec(v)
  >>> copies = [apply_permutation(spec, random_permutation(i, spec, v), v) for i in range(3)]
  >>> res = merge_many(0, spec, copies)
  >>> res.converged, bool(jnp.allclose(res.models[0]["params"]["head"]["kernel"],
  ...                                  res.models[2]["params"]["head"]["kernel"]))
  (True, True)
  """
  models = list(models) if isinstance(models, (list, tuple)) else tree_lib.unstack(models)
  if len(models) < 2:
    raise ValueError(f"merge_many needs at least 2 models, got {len(models)}.")
  tree_lib.check_same_structure(models, what="models")
  k = len(models)
  rng = np.random.default_rng(_seed_of(key))
  aligned = list(models)
  perms = [identity_permutation(spec, m) for m in models]
  add = lambda a, b: jax.tree.map(lambda x, y: x + y, a, b)
  rounds, converged = 0, False
  while rounds < max_iter:
    rounds += 1
    changed = False
    total = functools.reduce(add, aligned)  # recomputed per round: no drift
    for i in rng.permutation(k):
      others = jax.tree.map(lambda t, x: (t - x) / (k - 1), total, aligned[i])
      q = weight_matching(int(rng.integers(2**31 - 1)), spec, others, aligned[i],
                          max_iter=matching_max_iter, include=include)
      if _is_identity(q):
        continue
      changed = True
      new = apply_permutation(spec, q, aligned[i])
      total = jax.tree.map(lambda t, x, y: t - x + y, total, aligned[i], new)
      aligned[i] = new
      perms[i] = _compose(perms[i], q)
    if not changed:
      converged = True
      break
  mean = jax.tree.map(lambda t: t / k, functools.reduce(add, aligned))
  return MergeManyResult(aligned, mean, perms, rounds, converged)


# --------------------------------------------------------------------------- activations

def collect_activations(activations_fn: Callable[[PyTree, Any], Mapping[str, Any]],
                        params: PyTree, batches: Iterable[Any]) -> dict[str, np.ndarray]:
  """Runs `activations_fn` over batches; returns {name: (N, units)} numpy arrays.

  Args:
    activations_fn: `(params, x) -> {permutation name: activations (B, ..., units)}`;
      leading axes (batch, and e.g. spatial positions of a convolution) become rows.
      Traceable by `jax.jit`; e.g. `mlp_activations(model)`.
    params: the model's variables (whatever `activations_fn` takes).
    batches: an iterable of inputs x (or of (x, y) tuples; y is ignored).

  Returns:
    {permutation name: (rows, units) float32 array}, rows concatenated over batches.

  >>> import numpy as np
  >>> fn = lambda p, x: {"P": x * p}
  >>> collect_activations(fn, 2.0, [np.ones((2, 3)), (np.ones((1, 3)), None)])["P"].shape
  (3, 3)
  """
  fn = jax.jit(activations_fn)
  parts: dict[str, list[np.ndarray]] = {}
  for batch in batches:
    x = batch[0] if isinstance(batch, tuple) else batch
    for name, a in fn(params, x).items():
      a = np.asarray(a, np.float32)
      parts.setdefault(name, []).append(a.reshape(-1, a.shape[-1]))
  if not parts:
    raise ValueError("collect_activations got no batches (or activations_fn returned none).")
  return {name: np.concatenate(p) for name, p in parts.items()}


def mlp_activations(model, *, pre_activation: bool = False, **apply_kwargs
                    ) -> Callable[[PyTree, Any], dict]:
  """An `activations_fn` for `models.MLP`: each hidden layer's units, by permutation name.

  Returns `fn(variables, x) -> {"P_Dense_i": (B, width_i)}` (the names of
  `mlp_permutation_spec`): relu(bn_i(Dense_i(h))) per hidden layer (with or without
  BatchNorm), or with `pre_activation` the Dense_i outputs (no units are dead there,
  which can make ReLU activations of rarely active units tie). Captured with
  `flax.linen.intercept_methods`; `variables` may also be the bare params.

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> mlp = models.MLP(widths=(3, 2), num_classes=2)
  >>> v = mlp.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> {k: a.shape for k, a in mlp_activations(mlp)(v, jnp.ones((5, 4))).items()}
  {'P_Dense_0': (5, 3), 'P_Dense_1': (5, 2)}
  """
  import flax.linen as nn

  def fn(tree, x):
    variables = tree if isinstance(tree, Mapping) and "params" in tree else {"params": tree}
    captured: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and len(context.module.path) == 1:
        captured[context.module.path[0]] = out
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, x, **apply_kwargs)
    out = {}
    for m in _numbered(captured, r"Dense_(\d+)"):
      i = m[len("Dense_"):]
      h = captured[m]
      if not pre_activation:
        h = jax.nn.relu(captured.get(f"bn_{i}", h))
      out[f"P_{m}"] = h
    return out

  return fn


def resnet_activations(model, spec: PermutationSpec, **apply_kwargs
                       ) -> Callable[[PyTree, Any], dict]:
  """An `activations_fn` for `models.ResNet`: the units of every permutation of `spec`.

  For `P_stage<s>_block<b>_inner`: relu(bn1(conv1(x))) of that block. For a residual
  stream (`P_res<s>`): every tensor written to the stream, i.e. relu(bn_stem(stem(x)))
  for the first stream and the output relu(x + y) of each block whose `bn2` is on the
  stream, their rows (examples x positions) concatenated, so that a unit's correlation
  is measured over all the layers that share its permutation. Captured with
  `flax.linen.intercept_methods`; the names come from `spec`
  (`resnet_permutation_spec` of the same tree).

  Args:
    model: the `models.ResNet`.
    spec: its `resnet_permutation_spec`.
    **apply_kwargs: passed to `model.apply` (default inference mode, train=False).

  Returns:
    `fn(variables, x) -> {permutation name: (rows, units)}`.

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> net = models.ResNet(blocks_per_stage=1, widths=(2, 4))
  >>> v = net.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  >>> acts = resnet_activations(net, resnet_permutation_spec(v))(v, jnp.ones((3, 8, 8, 1)))
  >>> {k: a.shape for k, a in sorted(acts.items())}  # doctest: +NORMALIZE_WHITESPACE
  {'P_res0': (384, 2), 'P_res1': (48, 4), 'P_stage0_block0_inner': (192, 2),
   'P_stage1_block0_inner': (48, 4)}
  """
  import flax.linen as nn

  def perm_of(*parts):
    suffix = "/" + "/".join(parts) + "/scale"
    found = [axes[0] for name, axes in spec.axes_to_perm.items()
             if ("/" + name).endswith(suffix)]
    if len(found) != 1:
      raise ValueError(f"The spec has no single BatchNorm scale '{suffix[1:]}' (found "
                       f"{len(found)}): pass the resnet_permutation_spec of this model.")
    return found[0]

  def fn(tree, x):
    variables = tree if isinstance(tree, Mapping) and "params" in tree else {"params": tree}
    captured: dict[tuple, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      path = tuple(context.module.path)
      if context.method_name == "__call__" and (
          path == ("bn_stem",) or (len(path) == 1 and _RESNET_BLOCK.fullmatch(path[0]))
          or (len(path) == 2 and _RESNET_BLOCK.fullmatch(path[0]) and path[1] == "bn1")):
        captured[path] = out
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, x, **apply_kwargs)
    if ("bn_stem",) not in captured:
      raise ValueError("resnet_activations found no 'bn_stem': not a models.ResNet.")
    rows: dict[str, list] = {}
    add = lambda p, a: rows.setdefault(p, []).append(jnp.reshape(a, (-1, a.shape[-1])))
    add(perm_of("bn_stem"), jax.nn.relu(captured[("bn_stem",)]))
    blocks = sorted((tuple(int(g) for g in _RESNET_BLOCK.fullmatch(p[0]).groups()), p[0])
                    for p in captured if len(p) == 1 and p[0] != "bn_stem")
    for _, b in blocks:
      add(perm_of(b, "bn1"), jax.nn.relu(captured[(b, "bn1")]))
      add(perm_of(b, "bn2"), captured[(b,)])
    return {p: jnp.concatenate(a) if len(a) > 1 else a[0] for p, a in rows.items()}

  return fn


def activation_matching(spec: PermutationSpec, acts_a: Mapping[str, Any],
                        acts_b: Mapping[str, Any], *, similarity: str = "correlation",
                        eps: float = 1e-8) -> Permutation:
  """Permutations of model b that match its units to model a's by their activations.

  For each permutation P, with activations A, B (rows: the same examples in both
  models; columns: P's units), the cost of matching unit i of a with unit j of b is
  their Pearson correlation over the rows (`similarity="correlation"`, as in Git
  Re-Basin's activation matching; a unit constant over the data correlates 0 with
  everything) or the mean inner product E[a_i b_j] ("inner"); the matching is the
  linear assignment maximising the total (`scipy.optimize.linear_sum_assignment`).
  Permutations are solved independently (no coordinate descent is needed).

  Args:
    spec: the `PermutationSpec`; every permutation needs activations.
    acts_a: {permutation name: (rows, units)} of the reference model (see
      `collect_activations`).
    acts_b: the same for the model to permute, on the same rows.
    similarity: "correlation" or "inner".
    eps: added to the standard deviations (correlation).

  Returns:
    {permutation name: int array}; `apply_permutation(spec, perm, params_b)` aligns b.

  >>> import numpy as np
  >>> spec = make_spec({"w": ("P",)})
  >>> a = np.random.default_rng(0).normal(size=(50, 4))
  >>> activation_matching(spec, {"P": a}, {"P": a[:, [2, 0, 3, 1]]})["P"].tolist()
  [1, 3, 0, 2]
  """
  if similarity not in ("correlation", "inner"):
    raise ValueError(f"Unknown similarity {similarity!r}; use 'correlation' or 'inner'.")
  names = set(spec.perm_to_axes)
  for which, acts in (("acts_a", acts_a), ("acts_b", acts_b)):
    missing, extra = sorted(names - set(acts)), sorted(set(acts) - names)
    if missing or extra:
      raise ValueError(f"{which} must have one entry per permutation of the spec; "
                       f"missing {missing}, not in the spec {extra}.")
  perm = {}
  for p in sorted(names):
    a = np.asarray(acts_a[p], np.float64)
    b = np.asarray(acts_b[p], np.float64)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    if a.shape != b.shape:
      raise ValueError(f"Activations for {p!r} have shapes {a.shape} (a) and {b.shape} (b).")
    if similarity == "correlation":
      a = (a - a.mean(0)) / (a.std(0) + eps)
      b = (b - b.mean(0)) / (b.std(0) + eps)
    cost = a.T @ b / len(a)
    _, ci = linear_sum_assignment(cost, maximize=True)
    perm[p] = ci
  return perm


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
