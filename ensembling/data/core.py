"""Splits, the config-driven `load`, and per-member batch orders."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import numpy as np

from ensembling import checks

DATA_KEYS = ("name", "source", "dir", "validation_size", "limit_train", "max_features",
             "split_seed")
SOURCES = ("", "builtin", "idx", "tfds")
ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist",
           "20-newsgroups": "20newsgroups"}


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


def validation_count(size, num_examples: int) -> int:
  """How many examples `validation_size` holds out of `num_examples`.

  0 means no validation split; a fraction in (0, 1) is rounded to a count; an integral
  value >= 2 is a count (configs store counts as floats: 5000.0 is 5000). 1 is refused as
  ambiguous (one example, or all of them as a fraction), as is anything else.
  """
  if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
    raise ValueError(f"validation_size must be a number, got {size!r}.")
  if size == 0:
    return 0
  if 0 < size < 1:
    k = int(round(size * num_examples))
  elif size >= 2 and float(size).is_integer():
    k = int(size)
  else:
    raise ValueError(f"validation_size={size!r}: use 0 (no validation split), a fraction in "
                     "(0, 1), or a count >= 2.")
  if not 0 <= k < num_examples:
    raise ValueError(f"validation_size={size!r} leaves no training examples of {num_examples}.")
  return k


def carve_validation(x: np.ndarray, y: np.ndarray, *, size: int | float, seed: int):
  """Splits (x, y) into (train, validation) with a seeded permutation (see `validation_count`)."""
  n = len(x)
  k = validation_count(size, n)
  perm = np.random.default_rng(seed).permutation(n)
  val, train = perm[:k], perm[k:]
  return (x[train], y[train]), (x[val], y[val])


def check_labels(y, *, num_classes: int, what: str = "labels") -> np.ndarray:
  """`y` as int32 after checking every label is an integer in [0, num_classes).

  >>> check_labels([0, 2, 1], num_classes=3)
  array([0, 2, 1], dtype=int32)
  """
  y = np.asarray(y)
  if y.ndim != 1:
    raise ValueError(f"{what} must be 1-d, got shape {y.shape}.")
  if y.size and not np.issubdtype(y.dtype, np.integer):
    frac = ~np.isfinite(y) | (np.mod(np.nan_to_num(y, nan=0.5), 1) != 0)
    if frac.any():
      raise ValueError(f"{what} must be integer classes, got values like "
                       f"{y[frac][:3].tolist()}.")
  bad = (y < 0) | (y >= num_classes)
  if y.size and bad.any():
    raise ValueError(f"{what} must lie in [0, {num_classes}); found "
                     f"{np.unique(y[bad])[:5].tolist()} ({int(bad.sum())} examples).")
  return y.astype(np.int32)


def make_splits(train, test, *, num_classes: int, validation_size, seed: int,
                name: str, standardize: bool = True) -> Splits:
  """Carves a validation split from `train`, standardises, and checks every label."""
  check_labels(train[1], num_classes=num_classes, what=f"{name} train labels")
  check_labels(test[1], num_classes=num_classes, what=f"{name} test labels")
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


def check_data_config(data_config: Mapping[str, Any]) -> dict[str, Any]:
  """The data config with its name resolved, or a ValueError naming what is wrong.

  Checks the keys (`DATA_KEYS`), the source, the dataset name (built-in ones unless
  `source="tfds"`; close matches are suggested), `validation_size` and `limit_train`.
  """
  from ensembling.data import images
  cfg = dict(data_config)
  unknown = sorted(set(cfg) - set(DATA_KEYS))
  if unknown:
    hints = {k: difflib.get_close_matches(k, DATA_KEYS, n=1) for k in unknown}
    raise ValueError("Unknown data key(s) " + ", ".join(
        f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        + f"; known: {list(DATA_KEYS)}.")
  source = cfg.get("source", "") or ""
  if source not in SOURCES:
    raise ValueError(f"Unknown data.source {source!r}; use one of {SOURCES[1:]} (or '').")
  name = ALIASES.get(cfg.get("name", "digits"), cfg.get("name", "digits"))
  known = sorted(images.BUILTIN) + ["20newsgroups"]
  if source != "tfds" and name not in known:
    close = difflib.get_close_matches(name, known + list(ALIASES), n=2)
    raise ValueError(f"Unknown dataset {name!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)"
                                                    if close else "")
                     + f"; built-in: {known}. For a tfds dataset prepared on disk set "
                     "data.source='tfds'.")
  limit = cfg.get("limit_train", 0) or 0
  checks.integer(limit, name="data.limit_train", low=0)
  validation_count(cfg.get("validation_size", 0.1), 10**9)  # the rule, not the range
  split_seed = cfg.get("split_seed", -1)
  checks.integer(split_seed, name="data.split_seed (-1: the run's seed)", low=-1)
  cfg["name"] = name
  return cfg


def load(data_config: Mapping[str, Any], *, seed: int = 0) -> Splits:
  """Loads the dataset that `config.data` names (checked by `check_data_config` first).

  Keys: `name` (digits | fashion_mnist (or fashion-mnist) | mnist | 20newsgroups | any tfds
  name with source=tfds; 20newsgroups also reads `max_features`), `source` (builtin |
  idx | tfds; optional), `dir`, `validation_size` (0: none; a fraction in (0, 1); a count
  >= 2), `limit_train` (keep only the first N training examples after the split;
  0 keeps all) and `split_seed` (the seed of the validation split instead of `seed`;
  -1 or absent: `seed`), so that runs of different seeds can share one split.
  """
  from ensembling.data import images, tfds_source  # local: keeps import cheap

  cfg = check_data_config(data_config)
  if cfg.get("split_seed", -1) >= 0:
    seed = cfg["split_seed"]
  name = cfg["name"]
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
  else:
    splits = images.BUILTIN[name](cfg.get("dir", ""), validation_size=val_size, seed=seed)
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


def batch_indices_fn(seed: int, *, num_examples: int, batch_size: int, num_members: int):
  """(`indices(step) -> (K, batch_size)` example indices, steps per epoch).

  Step t reads row t mod S of epoch t // S's `member_batch_indices`: a pure function of
  the step (one epoch's orders are computed once and cached), so a resumed run sees the
  same batches.
  """
  steps_per_epoch = num_steps_per_epoch(num_examples, batch_size)
  cache: dict[int, np.ndarray] = {}

  def indices(step: int) -> np.ndarray:
    epoch, s = divmod(int(step), steps_per_epoch)
    if epoch not in cache:
      cache.clear()
      cache[epoch] = member_batch_indices(seed, epoch, num_examples=num_examples,
                                          batch_size=batch_size, num_members=num_members)
    return cache[epoch][s]

  return indices, steps_per_epoch


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
