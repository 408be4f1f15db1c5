"""SICK entailment (Marelli et al., LREC 2014): sentence pairs with a 3-way label.

Read from the SemEval-2014 Task 1 files in the shared data folder
(`sick/semeval2014/SICK_{train,trial,test_annotated}.txt`, see its README): tab-separated,
no header, columns pair_ID, sentence_A, sentence_B, relatedness_score,
entailment_judgment. `data.sts.read_sick` reads the same files for relatedness (SICK-R);
this reader keeps the entailment label instead.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

LABELS = ("NEUTRAL", "ENTAILMENT", "CONTRADICTION")
FILES = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


@dataclasses.dataclass(frozen=True)
class EntailmentPairs:
  """Sentence pairs and their labels (indices into `LABELS`)."""
  sentences_a: tuple[str, ...]
  sentences_b: tuple[str, ...]
  labels: np.ndarray  # (N,) int32

  def __len__(self) -> int:
    return len(self.labels)


def read_sick_entailment(split: str = "train", *, root: str) -> EntailmentPairs:
  """SICK entailment pairs of one SemEval-2014 split (train 4500 | trial 500 | test 4927).

  Args:
    split: "train", "trial" or "test".
    root: the folder holding `sick/` (`configlib.SHARED_DATA`).

  Returns:
    `EntailmentPairs` in file order.
  """
  if split not in FILES:
    raise ValueError(f"Unknown SICK split {split!r}; use one of {sorted(FILES)}.")
  path = os.path.join(root, "sick", "semeval2014", FILES[split])
  if not os.path.exists(path):
    raise FileNotFoundError(f"SICK file not found: {path}")
  a, b, labels = [], [], []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f.read().splitlines()):
      if not line:
        continue
      fields = line.split("\t")
      if len(fields) != 5:
        raise ValueError(f"{path}:{i + 1}: expected 5 tab-separated fields, got {len(fields)}.")
      if fields[4] not in LABELS:
        raise ValueError(f"{path}:{i + 1}: unknown entailment label {fields[4]!r}; "
                         f"expected one of {LABELS}.")
      a.append(fields[1])
      b.append(fields[2])
      labels.append(LABELS.index(fields[4]))
  return EntailmentPairs(tuple(a), tuple(b), np.asarray(labels, np.int32))


def entailment_splits(root: str, *, seed: int, train: int = 0, stack: int = 0, test: int = 0
                      ) -> dict[str, tuple[tuple[list[str], list[str]], np.ndarray]]:
  """{"train" (SICK train), "stack" (trial), "test"}: ((sentences_a, sentences_b), labels),
  each a seeded random subset of the given size (0: the whole split)."""
  rng = np.random.default_rng(int(seed))
  out = {}
  for name, split, limit in (("train", "train", train), ("stack", "trial", stack),
                             ("test", "test", test)):
    p = read_sick_entailment(split, root=root)
    idx = rng.permutation(len(p))[:int(limit) or None]
    out[name] = (([p.sentences_a[i] for i in idx], [p.sentences_b[i] for i in idx]),
                 p.labels[idx])
  return out
