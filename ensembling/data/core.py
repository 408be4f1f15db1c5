"""Splits, the config-driven `load`, and per-member batch orders."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Splits:
  """Train / validation / test arrays. `x_*` are float32, `y_*` int32 labels."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  name: str = ""

  def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
    key = {"train": "train", "validation": "val", "val": "val", "test": "test"}.get(which)
    if key is None:
      raise ValueError(f"Unknown split {which!r}; use train, validation or test.")
    return getattr(self, f"x_{key}"), getattr(self, f"y_{key}")

  def describe(self) -> str:
    return (f"{self.name}: train {self.x_train.shape}, val {self.x_val.shape}, "
            f"test {self.x_test.shape}, {self.num_classes} classes")


def carve_validation(x: np.ndarray, y: np.ndarray, *, size: int | float, seed: int):
  """Splits (x, y) into (train, validation) with a seeded permutation.

  `size` is a count (int >= 1) or a fraction in (0, 1).
  """
  n = len(x)
  k = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
  if not 0 <= k < n:
    raise ValueError(f"validation size {size} is out of range for {n} training examples.")
  perm = np.random.default_rng(seed).permutation(n)
  val, train = perm[:k], perm[k:]
  return (x[train], y[train]), (x[val], y[val])


def make_splits(train, test, *, num_classes: int, validation_size, seed: int,
                name: str, standardize: bool = True) -> Splits:
  (xtr, ytr), (xva, yva) = carve_validation(*train, size=validation_size, seed=seed)
  xte, yte = test
  xtr, xva, xte = (np.asarray(a, np.float32) for a in (xtr, xva, xte))
  if standardize:  # one scalar mean/std from the training split, as is usual for images
    mu, sd = float(xtr.mean()), float(xtr.std()) + 1e-8
    xtr, xva, xte = ((a - mu) / sd for a in (xtr, xva, xte))
  as_int = lambda a: np.asarray(a, np.int32)
  return Splits(xtr, as_int(ytr), xva, as_int(yva), xte, as_int(yte),
                num_classes=num_classes, name=name)


def split_classes(splits: Splits, *, held_out) -> tuple[Splits, Splits]:
  """(seen, unseen): every split restricted to the classes kept / held out.

  The open-set retrieval protocol: models are trained on `seen`, and retrieval is
  measured on classes they never saw (queries = `unseen.x_test`, index =
  `unseen.x_train`). Labels are renumbered 0..C-1 in each part, in increasing order of
  the original class ids.
  """
  held = sorted({int(c) for c in held_out})
  if not held:
    raise ValueError("held_out is empty: name at least one class to hold out.")
  bad = [c for c in held if not 0 <= c < splits.num_classes]
  if bad:
    raise ValueError(f"held_out classes {bad} are not in 0..{splits.num_classes - 1}.")
  kept = [c for c in range(splits.num_classes) if c not in held]
  if not kept:
    raise ValueError("held_out names every class: nothing is left to train on.")

  def part(classes, tag):
    lut = np.full(splits.num_classes, -1, np.int32)
    lut[classes] = np.arange(len(classes), dtype=np.int32)
    arrays = []
    for which in ("train", "val", "test"):
      x, y = splits.split(which)
      m = np.isin(y, classes)
      arrays += [x[m], lut[y[m]]]
    return Splits(*arrays, num_classes=len(classes), name=f"{splits.name} ({tag} {classes})")

  return part(kept, "classes"), part(held, "held-out classes")


def load(data_config: Mapping[str, Any], *, seed: int = 0) -> Splits:
  """Loads the dataset that `config.data` names.

  Keys: `name` (digits | fashion_mnist | mnist | 20newsgroups | any tfds name with
  source=tfds; 20newsgroups also reads `max_features`),
  `source` (builtin | idx | tfds; optional), `dir`, `validation_size`, and `limit_train`
  (keep only the first N training examples after the split; 0 keeps all).
  """
  from ensembling.data import images, tfds_source  # local: keeps import cheap

  cfg = dict(data_config)
  name = cfg.get("name", "digits")
  source = cfg.get("source", "") or ("tfds" if name not in images.BUILTIN else "builtin")
  val_size = cfg.get("validation_size", 0.1)
  if name == "20newsgroups":  # TF-IDF vectors read from the bydate tar.gz
    from ensembling.data import newsgroups
    kw = {k: cfg[k] for k in ("max_features",) if cfg.get(k)}
    splits = newsgroups.load_newsgroups(cfg.get("dir", ""), validation_size=val_size,
                                        seed=seed, **kw)
  elif source == "tfds":
    splits = tfds_source.load_tfds(name, data_dir=cfg.get("dir") or None,
                                   validation_size=val_size, seed=seed)
  elif source in ("builtin", "idx"):
    if name not in images.BUILTIN:
      raise ValueError(f"Unknown dataset {name!r}; built-in ones are {sorted(images.BUILTIN)} "
                       "(set data.source='tfds' for a tfds dataset).")
    splits = images.BUILTIN[name](cfg.get("dir", ""), validation_size=val_size, seed=seed)
  else:
    raise ValueError(f"Unknown data.source {source!r}; use builtin, idx or tfds.")
  limit = int(cfg.get("limit_train", 0) or 0)
  if limit:
    splits = dataclasses.replace(splits, x_train=splits.x_train[:limit],
                                 y_train=splits.y_train[:limit])
  return splits


def num_steps_per_epoch(num_examples: int, batch_size: int) -> int:
  steps = num_examples // batch_size
  if steps == 0:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples.")
  return steps


def member_batch_indices(seed: int, epoch: int, *, num_examples: int, batch_size: int,
                         num_members: int) -> np.ndarray:
  """Per-member shuffled batch indices for one epoch, shape (steps, K, batch_size).

  Each member gets its own permutation, different for every (seed, epoch); the last
  incomplete batch is dropped. No Python loop over members: one argsort of a (K, N)
  random matrix.
  """
  rng = np.random.default_rng([seed, epoch])
  perms = np.argsort(rng.random((num_members, num_examples)), axis=1)
  steps = num_steps_per_epoch(num_examples, batch_size)
  perms = perms[:, : steps * batch_size].reshape(num_members, steps, batch_size)
  return np.ascontiguousarray(perms.transpose(1, 0, 2)).astype(np.int32)
