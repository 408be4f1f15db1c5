"""20 Newsgroups ("bydate", the thesis's TNG) as TF-IDF vectors, read from the tar.gz.

The archive (`20newsgroups/20news-bydate-repacked.tar.gz` in the shared data folder, see its
README) holds `20news-bydate-{train,test}/<group>/<id>` files of raw latin-1 bytes.
They are read straight from the archive with `tarfile` (nothing is extracted), the
TF-IDF vocabulary is fit on the training posts only (after the validation split is
carved out), and the result is a dense float32 `Splits`.
"""

from __future__ import annotations

import os
import tarfile

import numpy as np

from ensembling import checks
from ensembling.data.core import Splits, carve_validation

ARCHIVE = "20news-bydate-repacked.tar.gz"
SPLIT_DIRS = {"train": "20news-bydate-train", "test": "20news-bydate-test"}


def read_archive(path: str) -> dict[str, tuple[list[str], list[str]]]:
  """{"train": (texts, group names), "test": (...)} from the bydate tar.gz.

  Members are read in archive order, which the README documents as sorted by name.
  """
  if os.path.isdir(path):
    path = os.path.join(path, ARCHIVE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"20 Newsgroups archive not found: {path}")
  out = {s: ([], []) for s in SPLIT_DIRS}
  by_dir = {d: s for s, d in SPLIT_DIRS.items()}
  with tarfile.open(path, "r:gz") as tf:
    for m in tf:
      if not m.isfile():
        continue
      parts = m.name.split("/")
      if len(parts) != 3 or parts[0] not in by_dir:
        raise ValueError(f"{path}: unexpected member {m.name!r}; expected "
                         "20news-bydate-{train,test}/<group>/<id>.")
      texts, groups = out[by_dir[parts[0]]]
      texts.append(tf.extractfile(m).read().decode("latin-1"))
      groups.append(parts[1])
  for s, (texts, _) in out.items():
    if not texts:
      raise ValueError(f"{path}: no {s} posts found.")
  return out


def load_newsgroups(directory: str, *, validation_size=1000, seed: int = 0,
                    max_features: int = 20000, sublinear_tf: bool = True,
                    min_df: int = 2) -> Splits:
  """TF-IDF features of 20 Newsgroups (train 11314 - validation, test 7532).

  Args:
    directory: the folder holding the archive (or the archive's path).
    validation_size: posts carved from the training split (count or fraction).
    seed: the validation split's permutation.
    max_features: vocabulary size (the most frequent terms of the training posts).
    sublinear_tf: use 1 + log(tf).
    min_df: ignore terms in fewer training posts than this.

  Returns:
    A `Splits` of dense float32 L2-normalised TF-IDF rows, labels 0..19 in sorted
    group order.
  """
  from sklearn.feature_extraction.text import TfidfVectorizer

  raw = read_archive(directory)
  names = sorted(set(raw["train"][1]))
  if sorted(set(raw["test"][1])) != names:
    raise ValueError("Train and test hold different newsgroups.")
  label = {n: i for i, n in enumerate(names)}
  texts_tr = np.array(raw["train"][0], dtype=object)
  y_tr = np.array([label[g] for g in raw["train"][1]], np.int32)
  (t_tr, y_tr), (t_va, y_va) = carve_validation(texts_tr, y_tr, size=validation_size, seed=seed)
  vec = TfidfVectorizer(max_features=max_features, sublinear_tf=sublinear_tf, min_df=min_df,
                        dtype=np.float32)
  x_tr = vec.fit_transform(list(t_tr))
  to_dense = lambda m: np.asarray(m.toarray(), np.float32)
  x_te = vec.transform(raw["test"][0])
  y_te = np.array([label[g] for g in raw["test"][1]], np.int32)
  return Splits(to_dense(x_tr), y_tr, to_dense(vec.transform(list(t_va))), y_va,
                to_dense(x_te), y_te, num_classes=len(names), name="20newsgroups")


# --------------------------------------------------------------------------- domains

# The top-level hierarchies as domains (issue 16); alt.atheism and soc.religion.christian
# form one domain, talk.religion.misc stays under talk.
DOMAINS = ("comp", "rec", "sci", "talk", "misc", "religion")


def domain_of(group: str) -> str:
  """The domain of a newsgroup name.

  >>> domain_of("comp.graphics"), domain_of("alt.atheism"), domain_of("talk.religion.misc")
  ('comp', 'religion', 'talk')
  """
  top = group.split(".")[0]
  if top in ("alt", "soc"):
    return "religion"
  if top not in DOMAINS:
    raise ValueError(f"Newsgroup {group!r} belongs to no domain; top levels are comp, rec, sci, "
                     "talk, misc, alt and soc.")
  return top


def strip_headers(post: str) -> str:
  """The body of a post: everything after the first blank line (the header block).

  Headers (Subject, From, Organization) name the sender and often the group, so a
  domain would be recognisable from them rather than from its text.

  >>> strip_headers("From: a@b\\nSubject: x\\n\\nHello\\n  world \\n")
  'Hello world'
  """
  _, sep, body = post.partition("\n\n")
  return " ".join((body if sep else post).split())


def domain_texts(raw: dict[str, tuple[list[str], list[str]]], *, train_per_domain: int,
                 test_per_domain: int, seed: int = 0, min_chars: int = 20,
                 domains: tuple[str, ...] = DOMAINS) -> dict[str, dict[str, list[str]]]:
  """{domain: {"train": texts, "test": held-out texts}} from `read_archive`'s dict.

  Training texts come from the bydate train split, held-out texts from its test split
  (a different time period: no post is in both). Headers are stripped and posts shorter
  than `min_chars` characters after stripping are dropped; each list is a seeded random
  subset of the rest (0: all of them).

  Raises:
    ValueError: an unknown domain, or a domain left with no text in a split.
  """
  unknown = sorted(set(domains) - set(DOMAINS))
  if unknown:
    raise ValueError(f"Unknown domain(s) {unknown}; choose from {DOMAINS}.")
  for name, v in (("train_per_domain", train_per_domain), ("test_per_domain", test_per_domain)):
    checks.integer(v, name=f"{name} (0: all)", low=0)
  rng = np.random.default_rng(seed)
  out = {d: {} for d in domains}
  for split, limit in (("train", train_per_domain), ("test", test_per_domain)):
    texts, groups = raw[split]
    by = {d: [] for d in domains}
    for t, g in zip(texts, groups):
      d = domain_of(g)
      body = strip_headers(t)
      if d in by and len(body) >= min_chars:
        by[d].append(body)
    for d in domains:
      if not by[d]:
        raise ValueError(f"Domain {d!r} has no {split} text (min_chars={min_chars}).")
      idx = rng.permutation(len(by[d]))[:limit or len(by[d])]
      out[d][split] = [by[d][i] for i in sorted(idx)]
  return out


def topic_splits(directory: str, *, seed: int, train: int = 0, stack: int = 0,
                 test: int = 0) -> tuple[dict[str, tuple[list[str], np.ndarray]], list[str]]:
  """Raw posts for 20-way topic classification: train / stack / test and the group names.

  `train` and `stack` (held out, e.g. for a stacking head) are disjoint seeded subsets
  of the bydate training posts (0: `stack` = 1000 and `train` = the rest), `test` a
  seeded subset of the test posts (0: all). Labels index the sorted group names.
  """
  arc = read_archive(os.path.join(directory, "20newsgroups"))
  names = sorted(set(arc["train"][1]))
  rng = np.random.default_rng(int(seed))
  pick = lambda split, idx: ([arc[split][0][i] for i in idx],
                             np.array([names.index(arc[split][1][i]) for i in idx]))
  idx = rng.permutation(len(arc["train"][0]))
  n_stack = int(stack) or 1000
  n_train = int(train) or len(idx) - n_stack
  if n_train + n_stack > len(idx):
    raise ValueError(f"train {n_train} + stack {n_stack} exceed the {len(idx)} training posts.")
  test_idx = rng.permutation(len(arc["test"][0]))[:int(test) or None]
  return {"train": pick("train", idx[:n_train]),
          "stack": pick("train", idx[n_train:n_train + n_stack]),
          "test": pick("test", test_idx)}, names
