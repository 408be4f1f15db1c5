"""Disjoint, class-skewed shards of a training set, and per-member batches over them.

For experts that each see their own data (AME, federated-style merging): shard k is
dominated by a few classes and shares no example with any other shard.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ensembling import checks
from ensembling.data.core import batch_indices_fn, check_labels


def dominant_classes(num_shards: int, num_classes: int, per_shard: int) -> np.ndarray:
  """(K, d) classes dominating each shard: shard k takes k*d, ..., k*d + d - 1 (mod C).

  >>> dominant_classes(3, 10, 2).tolist()
  [[0, 1], [2, 3], [4, 5]]
  """
  k = np.arange(num_shards)[:, None] * per_shard + np.arange(per_shard)[None, :]
  return (k % num_classes).astype(np.int32)


def _class_counts(size: int, num_classes: int, dom: np.ndarray, frac: float) -> np.ndarray:
  """(C,) counts summing to `size`: `frac` of it split over `dom`, the rest over the others."""
  share = np.zeros(num_classes)
  others = np.setdiff1d(np.arange(num_classes), dom)
  share[dom] = frac / len(dom)
  if len(others):
    share[others] = (1.0 - frac) / len(others)
  else:
    share[dom] = 1.0 / len(dom)
  raw = share * size
  counts = np.floor(raw).astype(int)
  rest = size - counts.sum()  # largest remainders, ties by class index
  counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
  return counts


def class_skewed_shards(labels, *, num_shards: int, num_classes: int,
                        dominant_per_shard: int = 2, dominant_fraction: float = 0.8,
                        shard_size: int | None = None, seed: int = 0) -> np.ndarray:
  """K disjoint shards of equal size, each dominated by a few classes.

  Shard k draws `dominant_fraction` of its examples evenly from its classes
  `dominant_classes(K, C, d)[k]` and the rest evenly from the other classes, without
  replacement from per-class pools shuffled by `seed`; no example is in two shards.

  Args:
    labels: (N,) integer labels of the pool to shard.
    num_shards: K >= 1.
    num_classes: C.
    dominant_per_shard: d, 1 <= d <= C.
    dominant_fraction: share of a shard from its d classes, in [0, 1].
    shard_size: examples per shard; None: the largest size the pool allows.
    seed: the shuffle.

  Returns:
    (K, shard_size) int indices into `labels`, each row in a shuffled order.

  >>> y = np.repeat(np.arange(4), 10)
  >>> s = class_skewed_shards(y, num_shards=2, num_classes=4, dominant_per_shard=1,
  ...                         dominant_fraction=0.4, shard_size=10)
  >>> [np.bincount(y[r], minlength=4).tolist() for r in s]
  [[4, 2, 2, 2], [2, 4, 2, 2]]
  """
  y = check_labels(labels, num_classes=num_classes)
  num_shards = checks.integer(num_shards, name="num_shards")
  if not 1 <= dominant_per_shard <= num_classes:
    raise ValueError(f"dominant_per_shard must be in [1, {num_classes}], got "
                     f"{dominant_per_shard}.")
  if not 0.0 <= dominant_fraction <= 1.0:
    raise ValueError(f"dominant_fraction must be in [0, 1], got {dominant_fraction}.")
  dom = dominant_classes(num_shards, num_classes, dominant_per_shard)
  avail = np.bincount(y, minlength=num_classes)

  def demand(size):
    return sum(_class_counts(size, num_classes, d, dominant_fraction) for d in dom)

  if shard_size is None:
    size = len(y) // num_shards
    while size > 0 and (demand(size) > avail).any():
      size -= max(1, size // 200)
    if size <= 0:
      raise ValueError("The pool is too small for any shard of that skew.")
  else:
    size = int(shard_size)
    if size < 1:
      raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    short = np.flatnonzero(demand(size) > avail)
    if len(short):
      c = int(short[0])
      raise ValueError(f"{num_shards} shards of {size} need {int(demand(size)[c])} examples of "
                       f"class {c}, the pool has {int(avail[c])}; use a smaller shard_size "
                       "(or None for the largest that fits).")
  rng = np.random.default_rng(seed)
  pools = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
  used = np.zeros(num_classes, int)
  out = np.empty((num_shards, size), np.int64)
  for k, d in enumerate(dom):
    counts = _class_counts(size, num_classes, d, dominant_fraction)
    take = [pools[c][used[c]:used[c] + n] for c, n in enumerate(counts)]
    used += counts
    out[k] = rng.permutation(np.concatenate(take))
  return out


def shard_batch_fn(x: np.ndarray, y: np.ndarray, shards_KxN: np.ndarray, *, seed: int,
                   batch_size: int) -> tuple[Callable[[int], dict], int]:
  """`batch_fn(step) -> {"x": (K, B, ...), "y": (K, B)}`: member k reads only shard k.

  Each member shuffles its own shard every epoch (`data.batch_indices_fn`, a pure
  function of the step, so `train.fit` resumes exactly). Returns (batch_fn, steps per
  epoch).
  """
  shards = np.asarray(shards_KxN)
  if shards.ndim != 2:
    raise ValueError(f"shards must be (K, N) indices, got shape {shards.shape}.")
  checks.paired(x, y)
  k, n = shards.shape
  indices, spe = batch_indices_fn(seed, num_examples=n, batch_size=batch_size, num_members=k)
  rows = np.arange(k)[:, None]

  def batch_fn(step: int) -> dict:
    idx = shards[rows, indices(step)]
    return {"x": x[idx], "y": y[idx]}

  return batch_fn, spe
