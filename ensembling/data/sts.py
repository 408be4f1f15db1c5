"""Semantic textual similarity (STS) sets as laid out in the shared data folder (see each README).

Every reader takes `root`, the folder holding `sts12-16/`, `stsb/` and `sick/` (the
project's configs pass `configlib.SHARED_DATA`).

- STS12–STS16 (`sts12-16/STS1x-en-test/`): per subset `STS.input.<s>.txt` (sentence1 TAB
  sentence2 [TAB source1 TAB source2 for STS16]) and `STS.gs.<s>.txt` (one score or an empty
  line). Only lines with a score are kept (STS15/16 inputs have unscored lines). STS16 files
  are named `STS2016.input.*` / `STS2016.gs.*`. STS13's SMT subset has scores but no input
  file (LDC), so it is skipped, as in SentEval.
- STS-B (`stsb/sts-{train,dev,test}.csv`): tab-separated, no quoting (sentences contain
  `"`), 7 columns genre, file, year, id, score, sentence1, sentence2; some rows carry 2
  extra columns, which are ignored.
- SICK-R (`sick/semeval2014/SICK_{train,trial,test_annotated}.txt`): pair_ID, sentence_A,
  sentence_B, relatedness_score, entailment_judgment; SimCSE/SentEval score the 4927 test
  pairs.

Every reader returns `STSPairs` (sentence lists and float scores). Evaluation (Spearman
of cosine similarities against the gold scores) lives in `ensembling.text`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

STS_YEARS = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")


@dataclasses.dataclass(frozen=True)
class STSPairs:
  """Sentence pairs with gold similarity scores."""
  name: str
  sentences1: tuple[str, ...]
  sentences2: tuple[str, ...]
  scores: np.ndarray  # (N,) float64

  def __len__(self) -> int:
    return len(self.scores)


def _lines(path: str) -> list[str]:
  """Lines of a UTF-8 file without their line ends (only "\\n" splits lines)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"STS file not found: {path}")
  with open(path, encoding="utf-8", newline="") as f:
    text = f.read()
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return [line.rstrip("\r") for line in lines]


def read_sts_subset(input_path: str, gs_path: str, *, name: str = "") -> STSPairs:
  """One SemEval STS subset; lines whose gold score is empty are dropped."""
  inputs, gold = _lines(input_path), _lines(gs_path)
  if len(inputs) != len(gold):
    raise ValueError(f"{input_path} has {len(inputs)} lines but {gs_path} has {len(gold)}.")
  s1, s2, scores = [], [], []
  for i, (line, g) in enumerate(zip(inputs, gold)):
    if not g.strip():
      continue
    fields = line.split("\t")
    if len(fields) < 2:
      raise ValueError(f"{input_path}:{i + 1}: expected sentence1<TAB>sentence2, got {line!r}.")
    s1.append(fields[0])
    s2.append(fields[1])
    scores.append(float(g))
  return STSPairs(name or os.path.basename(input_path), tuple(s1), tuple(s2),
                  np.asarray(scores, np.float64))


def read_sts_year(year: str, *, root: str) -> dict[str, STSPairs]:
  """{subset: STSPairs} for one of STS12..STS16 (scored pairs only)."""
  if year not in STS_YEARS:
    raise ValueError(f"Unknown STS year {year!r}; choose one of {sorted(STS_YEARS)}.")
  folder = os.path.join(root, "sts12-16", f"{year}-en-test")
  prefix = "STS2016" if year == "STS16" else "STS"
  return {s: read_sts_subset(os.path.join(folder, f"{prefix}.input.{s}.txt"),
                             os.path.join(folder, f"{prefix}.gs.{s}.txt"), name=f"{year}/{s}")
          for s in STS_YEARS[year]}


def read_stsb(split: str = "test", *, root: str) -> STSPairs:
  """The STS Benchmark split (train | dev | test); extra trailing columns are ignored."""
  if split not in ("train", "dev", "test"):
    raise ValueError(f"Unknown STS-B split {split!r}; use train, dev or test.")
  path = os.path.join(root, "stsb", f"sts-{split}.csv")
  s1, s2, scores = [], [], []
  for i, line in enumerate(_lines(path)):
    fields = line.split("\t")  # no CSV quote handling: sentences contain '"'
    if len(fields) < 7:
      raise ValueError(f"{path}:{i + 1}: expected at least 7 tab-separated fields, got "
                       f"{len(fields)}.")
    scores.append(float(fields[4]))
    s1.append(fields[5])
    s2.append(fields[6])
  return STSPairs(f"STSBenchmark/{split}", tuple(s1), tuple(s2), np.asarray(scores, np.float64))


def read_sick(split: str = "test", *, root: str) -> STSPairs:
  """SICK relatedness from the SemEval-2014 files (train | trial | test)."""
  files = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}
  if split not in files:
    raise ValueError(f"Unknown SICK split {split!r}; use one of {sorted(files)}.")
  path = os.path.join(root, "sick", "semeval2014", files[split])
  s1, s2, scores = [], [], []
  for i, line in enumerate(_lines(path)):
    fields = line.split("\t")
    if len(fields) != 5:
      raise ValueError(f"{path}:{i + 1}: expected 5 tab-separated fields, got {len(fields)}.")
    s1.append(fields[1])
    s2.append(fields[2])
    scores.append(float(fields[3]))
  return STSPairs(f"SICKRelatedness/{split}", tuple(s1), tuple(s2),
                  np.asarray(scores, np.float64))


def load_sts_tasks(tasks=TASKS, *, root: str) -> dict[str, dict[str, STSPairs]]:
  """{task: {subset: STSPairs}} for the evaluation sets (STS-B test, SICK test)."""
  out = {}
  for task in tasks:
    if task in STS_YEARS:
      out[task] = read_sts_year(task, root=root)
    elif task == "STSBenchmark":
      out[task] = {"test": read_stsb("test", root=root)}
    elif task == "SICKRelatedness":
      out[task] = {"test": read_sick("test", root=root)}
    else:
      raise ValueError(f"Unknown STS task {task!r}; choose from {TASKS}.")
  return out


def training_sentences(*, root: str) -> list[str]:
  """Unlabelled training text: unique sentences of STS-B train and SICK train, in file order.

  Scores are never read by the training code; only these sentences are used.
  """
  seen: dict[str, None] = {}
  for pairs in (read_stsb("train", root=root), read_sick("train", root=root)):
    for a, b in zip(pairs.sentences1, pairs.sentences2):
      seen.setdefault(a.strip(), None)
      seen.setdefault(b.strip(), None)
  return [s for s in seen if s]


def subsample(pairs: STSPairs, num: int, *, seed: int = 0) -> STSPairs:
  """A fixed random subset of `num` pairs (all of them if `num` is 0 or >= len)."""
  if num <= 0 or num >= len(pairs):
    return pairs
  idx = np.sort(np.random.default_rng(seed).choice(len(pairs), size=num, replace=False))
  return STSPairs(pairs.name, tuple(pairs.sentences1[i] for i in idx),
                  tuple(pairs.sentences2[i] for i in idx), pairs.scores[idx])


def subsample_tasks(tasks: dict[str, dict[str, STSPairs]], max_pairs_per_task: int, *,
                    seed: int = 0) -> dict[str, dict[str, STSPairs]]:
  """At most `max_pairs_per_task` pairs per task, split over its subsets in proportion
  to their sizes (at least one pair each); 0 keeps everything."""
  if max_pairs_per_task <= 0:
    return tasks
  out = {}
  for task, subsets in tasks.items():
    total = sum(len(p) for p in subsets.values())
    out[task] = {name: subsample(p, max(1, round(max_pairs_per_task * len(p) / total)),
                                 seed=seed)
                 for name, p in subsets.items()}
  return out
