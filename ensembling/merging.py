"""Merging fine-tuned models into one set of weights.

Methods that combine the task vectors `delta_i = theta_i - base` of K models fine-tuned
from one `base`:

- `task_arithmetic` (Ilharco et al. 2023, "Editing models with task arithmetic"):
  base + scale * sum_i delta_i;
- `ties` (Yadav et al. 2023, "TIES-Merging"): trim each task vector to its largest
  entries, elect a sign per entry, average only the entries that agree with it;
- `dare` (Yu et al. 2024, "Language models are Super Mario"): drop entries of each task
  vector at random and rescale the rest, then task arithmetic or TIES's election;
- `model_stock` (Jang et al. 2024, "Model Stock"): per leaf, interpolate between the
  average of the fine-tuned models and the base with a ratio set by the angle between
  their task vectors;

and methods that need no base but statistics of each model on its data:

- `fisher_merge` (Matena & Raffel 2022, "Merging models with Fisher-weighted
  averaging"), with `diagonal_fisher` to compute the Fishers (`classifier_log_likelihood`
  gives it a classifier's log-likelihood);
- `regmean` (Jin et al. 2023, "Dataless knowledge fusion by merging weights of language
  models"), with `gram_matrices` and `dense_inputs` to compute the Gram matrices.

Conventions: `models` is a list of pytrees with the structure of `base`, or one stacked
pytree (member axis first). Hyperparameters are keyword-only. Every function returns one
new pytree of jax arrays with the structure and dtypes of one model.

Memory: merging streams leaf by leaf on the host (numpy views of the inputs, no stacking
of the models and no flat concatenation of all parameters); the temporaries are a few
arrays of the size of one leaf. TIES's `trim="global"` needs one threshold per task
vector over all its parameters: it is found exactly by a two-pass radix select over the
float32 bit patterns of |delta| (histograms of the high and then the low 16 bits), leaf
by leaf, so no K x P copy is made either. benchmarks/merging_memory.py measures the
peak. The functions run eagerly (they are not meant to be traced by `jax.jit`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ensembling import tree as tree_lib

PyTree = Any
TRIMS = ("leaf", "global")
FISHER_LABELS = ("true", "sampled", "expected")


# --------------------------------------------------------------------------- input

class _Models:
  """Leaf-by-leaf access to K models given as a list of pytrees or one stacked pytree."""

  def __init__(self, models: PyTree | Sequence[PyTree], *, what: str = "models"):
    self.what = what
    if isinstance(models, (list, tuple)):
      if len(models) == 0:
        raise ValueError(f"Expected at least one of the {what}, got an empty list.")
      tree_lib.check_same_structure(list(models), what=what)
      self.stacked = False
      self.k = len(models)
      self.template = models[0]
      self._leaves = [jax.tree.leaves(m) for m in models]
      self.shapes = [np.shape(x) for x in self._leaves[0]]
      self.dtypes = [np.asarray(x).dtype for x in self._leaves[0]]
    else:
      if not jax.tree.leaves(models):
        raise ValueError(f"The {what} have no array leaves.")
      self.stacked = True
      try:
        self.k = tree_lib.num_members(models)
      except ValueError as e:
        raise ValueError(f"{e} (the {what} are not a list, so they are read as one stacked "
                         "tree with the member axis first)") from None
      if self.k == 0:
        raise ValueError(f"Expected at least one of the {what}; the member axis has size 0.")
      self.template = models
      self._leaves = jax.tree.leaves(models)
      self.shapes = [np.shape(x)[1:] for x in self._leaves]
      self.dtypes = [np.asarray(x).dtype for x in self._leaves]
    self.names = [n for n, _ in tree_lib.named_leaves(self.template)]
    self.treedef = jax.tree.structure(self.template)

  def __len__(self) -> int:
    return len(self.names)

  def leaf(self, j: int) -> list[np.ndarray]:
    """Leaf j of every model, as K numpy arrays (views of the inputs where possible)."""
    if self.stacked:
      x = np.asarray(self._leaves[j])
      return [x[i] for i in range(self.k)]
    return [np.asarray(ls[j]) for ls in self._leaves]

  def unflatten(self, leaves: Sequence[Any]) -> PyTree:
    return jax.tree.unflatten(self.treedef, list(leaves))


def _stacked_note(ms: _Models) -> str:
  return (" (models is not a list, so it is read as one stacked tree with the member "
          "axis first)" if ms.stacked else "")


def _check_float(name: str, dtype, who: str) -> None:
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"Merging needs floating point leaves; '{name}' of {who} is {dtype}.")


def _check_finite_models(ms: _Models, *, what: str | None = None) -> None:
  what = what or ms.what
  for j, name in enumerate(ms.names):
    _check_float(name, ms.dtypes[j], what)
    for i, x in enumerate(ms.leaf(j)):
      if not np.isfinite(x).all():
        raise ValueError(f"{what[:-1] if what.endswith('s') else what} {i} has NaN or "
                         f"inf values at '{name}'.")


def _prepare(base: PyTree, models: PyTree | Sequence[PyTree]) -> tuple[list, _Models]:
  """Validates `base` and `models`; returns (base leaves as numpy, models accessor)."""
  ms = _Models(models)
  tree_lib.check_same_structure([base, ms.template], what="trees (0: base, 1: models)",
                                check_shapes=False)
  base_named = tree_lib.named_leaves(base)
  base_leaves = []
  for j, (name, b) in enumerate(base_named):
    b = np.asarray(b)
    if b.shape != tuple(ms.shapes[j]):
      raise ValueError(f"base and the models differ in shape at '{name}': {b.shape} vs "
                       f"{tuple(ms.shapes[j])}{_stacked_note(ms)}.")
    _check_float(name, b.dtype, "base")
    if not np.isfinite(b).all():
      raise ValueError(f"base has NaN or inf values at '{name}'.")
    base_leaves.append(b)
  _check_finite_models(ms)
  return base_leaves, ms


def _check_density(density: float) -> float:
  density = float(density)
  if not 0.0 < density <= 1.0:
    raise ValueError(f"density must be in (0, 1], got {density}.")
  return density


def _work_dtype(dtype) -> np.dtype:
  return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _as(x: np.ndarray, dt: np.dtype) -> np.ndarray:
  return x.astype(dt, copy=False)


def _out(x: np.ndarray, dtype) -> jax.Array:
  return jnp.asarray(x.astype(dtype, copy=False))


def _key(key) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  return key


# --------------------------------------------------------------------------- task arithmetic

def task_arithmetic(base: PyTree, models: PyTree | Sequence[PyTree], *, scale: float
                    ) -> PyTree:
  """Task arithmetic: `base + scale * sum_i (theta_i - base)`.

  Ilharco et al. (2023), "Editing models with task arithmetic". With `scale = 1/K` this
  is the plain average of the models.

  Args:
    base: the pre-trained weights the models were fine-tuned from.
    models: K fine-tuned pytrees (a list, or one stacked pytree, member axis first).
    scale: the scaling coefficient lambda of the summed task vectors.

  Returns:
    The merged pytree (jax arrays, dtypes of `base`).

  >>> import jax.numpy as jnp
  >>> base = {"w": jnp.zeros(2)}
  >>> models = [{"w": jnp.array([1., 2.])}, {"w": jnp.array([3., 0.])}]
  >>> task_arithmetic(base, models, scale=0.5)["w"].tolist()
  [2.0, 1.0]
  """
  base_leaves, ms = _prepare(base, models)
  out = []
  for j, b in enumerate(base_leaves):
    dt = _work_dtype(b.dtype)
    b32 = _as(b, dt)
    acc = np.zeros(b.shape, dt)
    tmp = np.empty(b.shape, dt)
    for t in ms.leaf(j):
      np.subtract(_as(t, dt), b32, out=tmp)
      acc += tmp
    del tmp
    acc *= scale
    acc += b32
    out.append(_out(acc, b.dtype))
    del acc
  return ms.unflatten(out)


# --------------------------------------------------------------------------- TIES

def _keep_count(density: float, n: int) -> int:
  """How many entries of n a trim at `density` keeps: floor(density * n), at least 1."""
  return max(1, min(n, int(math.floor(density * n + 1e-6))))


def _abs32(d: np.ndarray) -> np.ndarray:
  a = np.abs(d)
  return a if a.dtype == np.float32 else a.astype(np.float32)


def _select_bin(counts: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For each row r, the bin b holding the k[r]-th largest value; and that value's rank
  within bin b counted from its top (1-based)."""
  above = np.cumsum(counts[:, ::-1], axis=1)  # above[r, m]: count in the top m+1 bins
  idx = np.array([np.searchsorted(above[r], k[r]) for r in range(len(k))])
  nb = counts.shape[1]
  b = nb - 1 - idx
  rank = k - (above[np.arange(len(k)), idx] - counts[np.arange(len(k)), b])
  return b, rank


def _kth_largest(chunks: Callable[[], Iterable[list[np.ndarray]]], k: np.ndarray
                 ) -> np.ndarray:
  """The exact k[r]-th largest value of each of R streams of non-negative float32 chunks.

  `chunks()` yields lists of R arrays (one piece of each stream) and is called twice:
  a radix select on the float32 bit patterns, which order like the values for
  non-negative floats. Pass 1 histograms the high 16 bits, pass 2 the low 16 bits of
  the entries in the selected high bin. Memory: two histograms per stream.
  """
  r_count = len(k)
  hi = np.zeros((r_count, 1 << 16), np.int64)
  for parts in chunks():
    for r, a in enumerate(parts):
      hi[r] += np.bincount((a.reshape(-1).view(np.uint32) >> 16).astype(np.intp),
                           minlength=1 << 16)
  hb, rank = _select_bin(hi, k)
  lo = np.zeros((r_count, 1 << 16), np.int64)
  for parts in chunks():
    for r, a in enumerate(parts):
      bits = a.reshape(-1).view(np.uint32)
      sel = bits[(bits >> 16) == hb[r]]
      lo[r] += np.bincount((sel & 0xFFFF).astype(np.intp), minlength=1 << 16)
  lb, _ = _select_bin(lo, rank)
  return ((hb.astype(np.uint32) << 16) | lb.astype(np.uint32)).view(np.float32)


def _trim_thresholds(base_leaves, ms: _Models, density: float, trim: str) -> np.ndarray:
  """(L, K) magnitude thresholds: entry kept iff float32 |delta| >= threshold."""
  num_leaves, k = len(base_leaves), ms.k
  thr = np.zeros((num_leaves, k), np.float32)
  if density >= 1.0:
    return thr

  def abs_deltas(j):
    b = base_leaves[j]
    dt = _work_dtype(b.dtype)
    return [_abs32(_as(t, dt) - _as(b, dt)) for t in ms.leaf(j)]

  if trim == "leaf":
    for j, b in enumerate(base_leaves):
      parts = abs_deltas(j)
      thr[j] = _kth_largest(lambda: [parts], np.full((k,), _keep_count(density, b.size)))
      del parts
  else:
    total = sum(b.size for b in base_leaves)
    kk = np.full((k,), _keep_count(density, total))
    thr[:] = _kth_largest(lambda: (abs_deltas(j) for j in range(num_leaves)), kk)[None]
  return thr


def _elect_and_average(b32: np.ndarray, deltas: Callable[[], Iterable[np.ndarray]],
                       scale: float) -> np.ndarray:
  """base + scale * disjoint mean of the deltas that agree with the elected sign.

  The elected sign of an entry is + where the sum of the (sparsified) deltas is >= 0
  and - elsewhere; an entry of delta_i agrees when it is non-zero with that sign.
  Entries where no delta agrees keep the base value. `deltas()` is called twice.
  """
  total = np.zeros(b32.shape, b32.dtype)
  for d in deltas():
    total += d
  positive = total >= 0
  num = total  # reuse the buffer
  num.fill(0)
  cnt = np.zeros(b32.shape, b32.dtype)
  for d in deltas():
    agree = np.where(positive, d > 0, d < 0)
    d *= agree
    num += d
    cnt += agree
    del agree
  del positive
  np.maximum(cnt, 1, out=cnt)
  num /= cnt
  del cnt
  num *= scale
  num += b32
  return num


def ties(base: PyTree, models: PyTree | Sequence[PyTree], *, density: float,
         scale: float = 1.0, trim: str = "leaf") -> PyTree:
  """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

  1. Trim: each task vector `delta_i = theta_i - base` keeps its `k` entries of
     largest magnitude, the others set to 0; `k = max(1, floor(density * n))` of
     the n entries of each leaf (`trim="leaf"`, per tensor as mergekit does) or of all
     the parameters of the task vector (`trim="global"`, as in the TIES paper).
     Magnitudes are compared in float32; entries tied with the k-th largest are all kept.
  2. Elect: the sign of each entry is the sign of the sum of the trimmed vectors
     (+ where the sum is exactly 0, as mergekit does; the paper's code takes the sign
     of the total sum there).
  3. Disjoint merge: the mean over the vectors whose trimmed entry is non-zero and has
     the elected sign; entries where none agrees stay at base.
  Result: `base + scale * merged`.

  Args:
    base: the pre-trained weights.
    models: K fine-tuned pytrees (a list, or one stacked pytree, member axis first).
    density: the fraction of each task vector kept, in (0, 1] (the paper's k%).
    scale: the scaling coefficient lambda of the merged task vector.
    trim: "leaf" (per tensor) or "global" (over the whole task vector).

  Returns:
    The merged pytree (jax arrays, dtypes of `base`).

  >>> import jax.numpy as jnp
  >>> base = {"w": jnp.zeros(3)}
  >>> models = [{"w": jnp.array([1., -2., 0.5])}, {"w": jnp.array([3., 1., -0.5])}]
  >>> ties(base, models, density=1.0)["w"].tolist()  # signs: +, -, + (tie)
  [2.0, -2.0, 0.5]
  """
  density = _check_density(density)
  if trim not in TRIMS:
    raise ValueError(f"Unknown trim {trim!r}; use one of {TRIMS}.")
  base_leaves, ms = _prepare(base, models)
  thr = _trim_thresholds(base_leaves, ms, density, trim)
  out = []
  for j, b in enumerate(base_leaves):
    dt = _work_dtype(b.dtype)
    b32 = _as(b, dt)
    thetas = ms.leaf(j)

    def trimmed(j=j, b32=b32, thetas=thetas, dt=dt):
      for i, t in enumerate(thetas):
        d = _as(t, dt) - b32
        if density < 1.0:
          d *= _abs32(d) >= thr[j, i]
        yield d

    out.append(_out(_elect_and_average(b32, trimmed, scale), b.dtype))
  return ms.unflatten(out)


# --------------------------------------------------------------------------- DARE

def dare_key(key, model: int, leaf: int) -> jax.Array:
  """The key of DARE's dropout mask for one model's leaf (leaves in tree order)."""
  return jax.random.fold_in(jax.random.fold_in(_key(key), model), leaf)


def dare(key, base: PyTree, models: PyTree | Sequence[PyTree], *, density: float,
         rescale: bool = True, sign_election: bool = False, scale: float = 1.0) -> PyTree:
  """DARE, drop and rescale (Yu et al. 2024, "Language models are Super Mario").

  Each entry of each task vector `delta_i = theta_i - base` is kept with probability
  `density` (independently; mask `jax.random.bernoulli(dare_key(key, i, l), density,
  shape)` for model i and leaf l in tree order) and dropped otherwise; the kept entries
  are divided by `density` when `rescale`, so each entry's expectation is unchanged.
  The sparsified vectors are then combined by task arithmetic,
  `base + scale * sum_i delta_i'`, or with `sign_election` by TIES's sign election and
  disjoint mean (mergekit's "dare_ties"), `base + scale * disjoint_mean(delta')`.

  Args:
    key: a jax PRNG key or an int seed.
    base: the pre-trained weights.
    models: K fine-tuned pytrees (a list, or one stacked pytree, member axis first).
    density: the keep probability p = 1 - drop rate, in (0, 1].
    rescale: divide the kept entries by `density`.
    sign_election: combine with TIES's sign election and disjoint mean instead of a sum.
    scale: the scaling coefficient of the combined task vector.

  Returns:
    The merged pytree (jax arrays, dtypes of `base`).

  >>> import jax, jax.numpy as jnp
  >>> base, models = {"w": jnp.zeros(3)}, [{"w": jnp.ones(3)}, {"w": jnp.ones(3)}]
  >>> dare(jax.random.key(0), base, models, density=1.0)["w"].tolist()
  [2.0, 2.0, 2.0]
  """
  density = _check_density(density)
  base_leaves, ms = _prepare(base, models)
  out = []
  for j, b in enumerate(base_leaves):
    dt = _work_dtype(b.dtype)
    b32 = _as(b, dt)
    thetas = ms.leaf(j)

    def dropped(j=j, b32=b32, thetas=thetas, dt=dt):
      for i, t in enumerate(thetas):
        d = _as(t, dt) - b32
        if density < 1.0:
          d *= np.asarray(jax.random.bernoulli(dare_key(key, i, j), density, d.shape))
          if rescale:
            d /= dt.type(density)
        yield d

    if sign_election:
      res = _elect_and_average(b32, dropped, scale)
    else:
      res = np.zeros(b.shape, dt)
      for d in dropped():
        res += d
        del d
      res *= scale
      res += b32
    out.append(_out(res, b.dtype))
    del res
  return ms.unflatten(out)


# --------------------------------------------------------------------------- Model Stock

def _stock_ratio(norms2: np.ndarray, dots: np.ndarray) -> tuple[float, float]:
  """(mean cosine, t) from the squared norms (N,) and dot products (N, N) of the deltas.

  The mean is over the pairs where both deltas are non-zero (NaN, and t = 1, when there
  is no such pair); the cosine is clipped to [0, 1] before t = N cos / (1 + (N - 1) cos).
  """
  n = len(norms2)
  cosines = [dots[i, j] / math.sqrt(norms2[i] * norms2[j])
             for i in range(n) for j in range(i + 1, n) if norms2[i] > 0 and norms2[j] > 0]
  if not cosines:
    return float("nan"), 1.0
  mean_cos = float(np.mean(cosines))
  cos = min(1.0, max(0.0, mean_cos))
  return mean_cos, n * cos / (1 + (n - 1) * cos)


def model_stock(base: PyTree, models: PyTree | Sequence[PyTree], *,
                return_ratios: bool = False) -> PyTree | tuple[PyTree, dict[str, float]]:
  """Model Stock (Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned
  models").

  Per leaf, with N >= 2 fine-tuned models and task vectors `delta_i = theta_i - base`:

      cos(theta) = mean over pairs i < j of <delta_i, delta_j> / (|delta_i| |delta_j|)
      t = N cos(theta) / (1 + (N - 1) cos(theta))
      merged = t * mean_i(theta_i) + (1 - t) * base

  t is the paper's interpolation ratio between the average of the fine-tuned models and
  the pre-trained weights (its eq. for N models with one common angle; the mean of the
  pairwise cosines as the common angle, as mergekit does). Departures, for the cases
  the paper's geometry excludes: pairs where a delta is exactly zero have no angle and
  are left out of the mean; a leaf with no such pair gets t = 1 (the plain average,
  which equals the base when every delta is zero); a negative mean cosine is clipped
  to 0 (t = 0, the base), which avoids the pole at cos = -1/(N - 1).

  Args:
    base: the pre-trained weights.
    models: N >= 2 fine-tuned pytrees (a list, or one stacked pytree, member axis first).
    return_ratios: also return {leaf name: t}.

  Returns:
    The merged pytree (jax arrays, dtypes of `base`), and the ratios if asked.

  >>> import jax.numpy as jnp
  >>> base = {"w": jnp.zeros(2)}
  >>> models = [{"w": jnp.array([1., 0.])}, {"w": jnp.array([0., 1.])}]  # cos = 0
  >>> model_stock(base, models)["w"].tolist()
  [0.0, 0.0]
  """
  base_leaves, ms = _prepare(base, models)
  if ms.k < 2:
    raise ValueError(f"model_stock needs at least 2 fine-tuned models, got {ms.k}.")
  out, ratios = [], {}
  for j, b in enumerate(base_leaves):
    dt = _work_dtype(b.dtype)
    b32 = _as(b, dt)
    thetas = ms.leaf(j)
    # Pairwise dot products one delta pair at a time (no K deltas held at once).
    norms2 = np.zeros((ms.k,))
    dots = np.zeros((ms.k, ms.k))
    di = np.empty(b.shape, dt)
    dj = np.empty(b.shape, dt)
    for i in range(ms.k):
      np.subtract(_as(thetas[i], dt), b32, out=di)
      norms2[i] = float(np.vdot(di, di))
      for k2 in range(i + 1, ms.k):
        np.subtract(_as(thetas[k2], dt), b32, out=dj)
        dots[i, k2] = float(np.vdot(di, dj))
    del di, dj
    _, t = _stock_ratio(norms2, dots)
    ratios[ms.names[j]] = t
    acc = np.zeros(b.shape, dt)
    for th in thetas:
      acc += _as(th, dt)
    acc *= t / ms.k
    acc += (1 - t) * b32
    out.append(_out(acc, b.dtype))
    del acc
  merged = ms.unflatten(out)
  return (merged, ratios) if return_ratios else merged


# --------------------------------------------------------------------------- Fisher

def fisher_merge(models: PyTree | Sequence[PyTree], fishers: PyTree | Sequence[PyTree], *,
                 eps: float = 1e-8) -> PyTree:
  """Fisher-weighted averaging (Matena & Raffel 2022), with diagonal Fishers.

  Per entry: `sum_i F_i theta_i / sum_i F_i`, where each Fisher is floored at `eps`
  (`F_i <- max(F_i, eps)`), so entries where every Fisher is ~0 fall back to the plain
  average. Per-model coefficients lambda_i of the paper are `lambda_i * F_i` passed as
  the Fishers.

  Args:
    models: K pytrees (a list, or one stacked pytree, member axis first).
    fishers: K diagonal Fishers with the models' structure (a list, or stacked), >= 0;
      e.g. from `diagonal_fisher`.
    eps: the floor of the Fishers (> 0).

  Returns:
    The merged pytree (jax arrays, dtypes of the models).

  >>> import jax.numpy as jnp
  >>> models = [{"w": jnp.array([0., 0.])}, {"w": jnp.array([4., 4.])}]
  >>> fishers = [{"w": jnp.array([1., 3.])}, {"w": jnp.array([3., 1.])}]
  >>> fisher_merge(models, fishers)["w"].tolist()
  [3.0, 1.0]
  """
  if not eps > 0:
    raise ValueError(f"eps must be > 0, got {eps}.")
  ms = _Models(models)
  fs = _Models(fishers, what="fishers")
  if fs.k != ms.k:
    raise ValueError(f"Got {fs.k} Fishers for {ms.k} models.")
  tree_lib.check_same_structure([ms.template, fs.template],
                                what="trees (0: models, 1: fishers)", check_shapes=False)
  _check_finite_models(ms)
  for j, name in enumerate(ms.names):
    if tuple(fs.shapes[j]) != tuple(ms.shapes[j]):
      raise ValueError(f"The Fishers' shape at '{name}' is {tuple(fs.shapes[j])}, the "
                       f"models' {tuple(ms.shapes[j])}.")
    for i, f in enumerate(fs.leaf(j)):
      if not np.isfinite(f).all():
        raise ValueError(f"fisher {i} has NaN or inf values at '{name}'.")
      if (f < 0).any():
        raise ValueError(f"fisher {i} has negative values at '{name}'; a diagonal "
                         "Fisher is >= 0.")
  out = []
  for j, shape in enumerate(ms.shapes):
    dt = _work_dtype(ms.dtypes[j])
    num = np.zeros(shape, dt)
    den = np.zeros(shape, dt)
    for t, f in zip(ms.leaf(j), fs.leaf(j)):
      w = np.maximum(_as(f, dt), dt.type(eps))
      den += w
      w *= _as(t, dt)
      num += w
      del w
    num /= den
    del den
    out.append(_out(num, ms.dtypes[j]))
    del num
  return ms.unflatten(out)


def _num_examples(x) -> int:
  return int(np.shape(jax.tree.leaves(x)[0])[0])


def diagonal_fisher(log_likelihood_fn: Callable[[PyTree, Any, Any], jax.Array],
                    params: PyTree, batches: Iterable[tuple[Any, Any]], *,
                    labels: str = "true", key=None, num_classes: int | None = None
                    ) -> PyTree:
  """The diagonal Fisher: mean over examples of squared per-example gradients.

  `F = (1/N) sum_n E_y [(d/d params) log p(y | x_n; params)]^2` with the expectation
  over y given by `labels`:

  - "true": y is the example's label from `batches` (the *empirical* Fisher);
  - "sampled": one y per example sampled from the model's predictive distribution,
    `jax.random.categorical(jax.random.fold_in(key, b), log p(. | x))` for batch b
    (an unbiased one-sample estimate of the Fisher);
  - "expected": the exact expectation over the `num_classes` classes,
    `sum_c p(c | x) g_c^2` (the Fisher Matena & Raffel compute for classifiers;
    `num_classes` backward passes per example).

  For "sampled" and "expected" the labels given to `log_likelihood_fn` are int32 class
  indices (B,), and `log p(. | x)` is obtained by calling it once per class.
  Per-example gradients are `jax.vmap`ped over a batch, so memory grows with batch
  size x parameters.

  Args:
    log_likelihood_fn: `(params, x, y) -> (B,)` per-example log-likelihoods
      log p(y | x) of a batch (close over BatchNorm statistics etc.).
    params: where the Fisher is evaluated (the differentiated pytree).
    batches: an iterable of (x, y) batches (y is not used unless labels="true").
    labels: "true", "sampled" or "expected", as above.
    key: a jax PRNG key or an int seed, for labels="sampled".
    num_classes: the number of classes, for "sampled" and "expected".

  Returns:
    A pytree like `params` (float32 jax arrays).

  >>> import jax, jax.numpy as jnp
  >>> ll = lambda p, x, y: -0.5 * (x * p["w"] - y) ** 2  # Gaussian, unit variance
  >>> x, y = jnp.array([1., 2.]), jnp.array([0., 0.])
  >>> diagonal_fisher(ll, {"w": jnp.array(1.)}, [(x, y)])["w"].item()  # mean (x^2 w)^2
  8.5
  """
  if labels not in FISHER_LABELS:
    raise ValueError(f"Unknown labels {labels!r}; use one of {FISHER_LABELS}.")
  if labels != "true" and not num_classes:
    raise ValueError(f"labels={labels!r} needs num_classes.")
  if labels == "sampled" and key is None:
    raise ValueError("labels='sampled' needs a key.")

  def per_example_grads(p, x, y):  # one gradient per example, stacked
    def one(xi, yi):
      single = jax.tree.map(lambda a: a[None], (xi, yi))
      return jax.grad(lambda q: log_likelihood_fn(q, *single)[0])(p)
    g = jax.vmap(one)(x, y)
    return jax.tree.map(lambda a: a.astype(jnp.float32), g)

  def class_logp(p, x, b):
    ys = jnp.arange(num_classes, dtype=jnp.int32)
    return jax.vmap(lambda c: log_likelihood_fn(p, x, jnp.full((b,), c, jnp.int32)),
                    out_axes=1)(ys)  # (B, C)

  @jax.jit
  def step(p, x, y, k):
    if labels == "true":
      g = per_example_grads(p, x, y)
      return jax.tree.map(lambda a: jnp.sum(a ** 2, axis=0), g)
    b = _num_examples(x)
    logp = class_logp(p, x, b)
    if labels == "sampled":
      ys = jax.random.categorical(k, logp, axis=-1).astype(jnp.int32)
      g = per_example_grads(p, x, ys)
      return jax.tree.map(lambda a: jnp.sum(a ** 2, axis=0), g)
    probs = jax.nn.softmax(logp, axis=-1)  # normalise, in case logp is not
    def per_class(acc, c):
      g = per_example_grads(p, x, jnp.full((b,), c, jnp.int32))
      w = probs[:, c]
      return jax.tree.map(lambda s, a: s + jnp.tensordot(w, a ** 2, axes=1), acc, g), None
    zero = jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), p)
    acc, _ = jax.lax.scan(per_class, zero, jnp.arange(num_classes))
    return acc

  base_key = _key(key) if key is not None else jax.random.key(0)
  total, count = None, 0
  for bi, (x, y) in enumerate(batches):
    s = step(params, x, y, jax.random.fold_in(base_key, bi))
    total = s if total is None else jax.tree.map(jnp.add, total, s)
    count += _num_examples(x)
  if count == 0:
    raise ValueError("diagonal_fisher got no batches.")
  return jax.tree.map(lambda a: a / count, total)


def classifier_log_likelihood(model, **apply_kwargs) -> Callable[[PyTree, Any, Any], jax.Array]:
  """`(params, x, y) -> (B,)` log p(y | x) of a classifier: a `diagonal_fisher` input.

  log_softmax of the logits of `models.as_model(model).apply({"params": params}, x,
  train=False)` at the labels `y` (int, (B,)). For models with BatchNorm, close over
  the statistics with a lambda of your own.

  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> net = nn.Dense(3)
  >>> p = net.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
  >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
  >>> ll = classifier_log_likelihood(net)(p, x, y)
  >>> bool(jnp.allclose(ll, jax.nn.log_softmax(net.apply({"params": p}, x))[jnp.arange(4), y]))
  True
  """
  from ensembling.models.contract import as_model
  m = as_model(model)
  apply_kwargs = {"train": False, **apply_kwargs}

  def log_likelihood(params, x, y):
    out, _ = m.apply({"params": params}, x, **apply_kwargs)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, jnp.asarray(y, jnp.int32)[:, None], axis=1)[:, 0]

  return log_likelihood


# --------------------------------------------------------------------------- RegMean

def _reduce_off_diagonal(g: np.ndarray, alpha: float) -> np.ndarray:
  """alpha * G + (1 - alpha) * diag(G): off-diagonal entries scaled by alpha."""
  if alpha == 1.0:
    return g
  out = alpha * g
  out[np.diag_indices_from(out)] = np.diag(g)
  return out


def regmean(models: PyTree | Sequence[PyTree], grams: Sequence[Mapping[str, Any]], *,
            alpha: float = 1.0) -> PyTree:
  """RegMean (Jin et al. 2023): merge linear layers to match their outputs on data.

  For each kernel W (in, out) with a Gram matrix, the merged kernel minimises
  `sum_i |X_i W - X_i W_i|^2` over the layer inputs X_i of model i:

      W* = (sum_i G_i)^-1 sum_i G_i W_i,   G_i = X_i^T X_i,

  where, with `alpha < 1`, the off-diagonal entries of every G_i are multiplied by
  alpha (the paper's regularisation towards the plain average). Kernels of more than
  two dimensions (..., out) are read as (prod(...), out) with a Gram of that size
  (e.g. a convolution over im2col patches). Input units whose summed Gram diagonal is
  zero (never active on the data; their rows and columns are then zero) take the plain
  average of their kernel rows; the rest is solved exactly (float64). Every other leaf
  (biases, normalisation, leaves without a Gram) is averaged.

  Args:
    models: K pytrees (a list, or one stacked pytree, member axis first).
    grams: K dicts (one per model, same keys) mapping a kernel's "a/b/c" path in the
      model tree (`tree.named_leaves`) to its (in, in) input Gram, e.g. from
      `gram_matrices`.
    alpha: scale of the off-diagonal Gram entries, in [0, 1]; 1 is the exact solution,
      0 a per-input-unit weighting (diagonal Grams).

  Returns:
    The merged pytree (jax arrays, dtypes of the models).

  >>> import numpy as np, jax.numpy as jnp
  >>> models = [{"k": jnp.array([[1.], [0.]])}, {"k": jnp.array([[0.], [1.]])}]
  >>> grams = [{"k": np.diag([1., 0.])}, {"k": np.diag([0., 1.])}]  # each sees one input
  >>> regmean(models, grams)["k"].ravel().tolist()
  [1.0, 1.0]
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
  ms = _Models(models)
  grams = list(grams) if not isinstance(grams, Mapping) else [grams]
  if len(grams) != ms.k:
    raise ValueError(f"Got {len(grams)} Gram dicts for {ms.k} models.")
  _check_finite_models(ms)
  index = {n: j for j, n in enumerate(ms.names)}
  keys = set(grams[0])
  for i, g in enumerate(grams):
    if set(g) != keys:
      raise ValueError(f"Gram dicts of models 0 and {i} have different keys; only in 0: "
                       f"{sorted(keys - set(g))[:5]}, only in {i}: "
                       f"{sorted(set(g) - keys)[:5]}.")
  for name in sorted(keys):
    if name not in index:
      raise ValueError(f"Gram for '{name}', which is not a leaf of the models; leaves are "
                       f"{ms.names[:8]}{'...' if len(ms.names) > 8 else ''}.")
    shape = tuple(ms.shapes[index[name]])
    if len(shape) < 2:
      raise ValueError(f"Gram for '{name}' of shape {shape}: RegMean needs a kernel "
                       "(..., in, out).")
    m = int(np.prod(shape[:-1]))
    for i, g in enumerate(grams):
      gs = np.shape(g[name])
      if gs != (m, m):
        raise ValueError(f"Gram of model {i} for '{name}' has shape {gs}; the kernel "
                         f"{shape} needs ({m}, {m}).")
      if not np.isfinite(np.asarray(g[name])).all():
        raise ValueError(f"Gram of model {i} for '{name}' has NaN or inf values.")
  out = []
  for j, name in enumerate(ms.names):
    shape, dtype = tuple(ms.shapes[j]), ms.dtypes[j]
    thetas = ms.leaf(j)
    if name not in keys:
      dt = _work_dtype(dtype)
      acc = np.zeros(shape, dt)
      for t in thetas:
        acc += _as(t, dt)
      acc /= ms.k
      out.append(_out(acc, dtype))
      continue
    m = int(np.prod(shape[:-1]))
    s = np.zeros((m, m))
    r = np.zeros((m, shape[-1]))
    for t, g in zip(thetas, grams):
      gi = _reduce_off_diagonal(np.asarray(g[name], np.float64), alpha)
      s += gi
      r += gi @ np.asarray(t, np.float64).reshape(m, -1)
    w = np.zeros((m, shape[-1]))
    for t in thetas:
      w += np.asarray(t, np.float64).reshape(m, -1)
    w /= ms.k
    act = np.diag(s) > 0
    if act.any():
      sa, ra = s[np.ix_(act, act)], r[act]
      try:
        w[act] = np.linalg.solve(sa, ra)
      except np.linalg.LinAlgError:
        warnings.warn(f"RegMean: the summed Gram of '{name}' is singular; using the "
                      "least-squares solution (consider alpha < 1).", RuntimeWarning,
                      stacklevel=2)
        w[act] = np.linalg.lstsq(sa, ra, rcond=None)[0]
    out.append(_out(w.reshape(shape), dtype))
  return ms.unflatten(out)


def gram_matrices(inputs_fn: Callable[[PyTree, Any], Mapping[str, jax.Array]],
                  params: PyTree, batches: Iterable[Any]) -> dict[str, np.ndarray]:
  """The input Gram matrices `X^T X` of linear layers, summed over batches.

  Args:
    inputs_fn: `(params, x) -> {kernel path: layer input (B, ..., in)}` for one batch
      (leading axes are flattened into rows), e.g. `dense_inputs(model)`.
    params: the model's weights (whatever `inputs_fn` takes).
    batches: an iterable of inputs x (or of (x, y) tuples; y is ignored).

  Returns:
    {kernel path: (in, in) float64 numpy Gram}, the sum over all examples (not the mean,
    as in the RegMean paper, so models with more data weigh more).

  >>> import numpy as np
  >>> fn = lambda p, x: {"k": x}
  >>> gram_matrices(fn, None, [np.array([[1., 2.]]), np.array([[3., 0.]])])["k"].tolist()
  [[10.0, 2.0], [2.0, 4.0]]
  """
  @jax.jit
  def batch_grams(p, x):
    acts = inputs_fn(p, x)
    out = {}
    for name, a in acts.items():
      a = jnp.reshape(a, (-1, jnp.shape(a)[-1])).astype(jnp.float32)
      out[name] = jnp.dot(a.T, a, precision=jax.lax.Precision.HIGHEST)
    return out

  total: dict[str, np.ndarray] = {}
  for batch in batches:
    x = batch[0] if isinstance(batch, tuple) else batch
    for name, g in batch_grams(params, x).items():
      g = np.asarray(g, np.float64)
      total[name] = total[name] + g if name in total else g
  if not total:
    raise ValueError("gram_matrices got no batches (or inputs_fn returned no layers).")
  return total


def dense_inputs(model: nn.Module, **apply_kwargs) -> Callable[[PyTree, Any], dict]:
  """An `inputs_fn` for `gram_matrices`: the input of every `nn.Dense` of a Linen model.

  Works for `models.MLP` (Dense_i and head, with or without BatchNorm) and any Linen
  model built from `nn.Dense` (intercepted with `flax.linen.intercept_methods`). A
  Dense called several times contributes the rows of every call.

  Args:
    model: the Linen module.
    **apply_kwargs: passed to `model.apply` (e.g. `train=False`).

  Returns:
    `fn(tree, x) -> {"params/<module path>/kernel": (B, in)}` when `tree` holds Flax
    variables ({"params": ..., ...}), or keys without the "params/" prefix when `tree`
    is the bare params.

  >>> import jax, jax.numpy as jnp
  >>> from ensembling import models
  >>> mlp = models.MLP(widths=(3,), num_classes=2)
  >>> v = mlp.init(jax.random.key(0), jnp.ones((1, 4)))
  >>> {k: a.shape for k, a in dense_inputs(mlp)(v, jnp.ones((5, 4))).items()}
  {'params/Dense_0/kernel': (5, 4), 'params/head/kernel': (5, 3)}
  """
  def fn(tree, x):
    is_vars = isinstance(tree, Mapping) and "params" in tree
    variables = tree if is_vars else {"params": tree}
    prefix = "params/" if is_vars else ""
    captured: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
        a = args[0]
        a = jnp.reshape(a, (-1, a.shape[-1]))
        name = prefix + "/".join(context.module.path) + "/kernel"
        captured[name] = (jnp.concatenate([captured[name], a]) if name in captured else a)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(variables, x, **apply_kwargs)
    return captured

  return fn
