"""OOD detection metrics (AUROC, AUPR, FPR@TPR) against scikit-learn."""

import numpy as np
import pytest
from sklearn import metrics as skm

from ensembling import metrics


def _data(seed, n=300, pos_frac=0.3, decimals=None):
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < pos_frac).astype(int)
  scores = rng.normal(size=n) + 0.8 * labels
  if decimals is not None:  # coarse rounding: many ties, also across the two classes
    scores = np.round(scores, decimals)
  return labels, scores


def _sk_fpr_at_tpr(labels, scores, tpr):
  fpr_c, tpr_c, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
  return fpr_c[np.argmax(tpr_c >= tpr)]


CASES = [(s, d) for s in range(4) for d in (None, 1, 0)]


@pytest.mark.parametrize("seed,decimals", CASES)
def test_auroc_aupr_match_sklearn(seed, decimals):
  labels, scores = _data(seed, decimals=decimals)
  if decimals is not None:
    assert len(np.unique(scores)) < len(scores) // 3  # the case really has ties
  assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores),
                                                        abs=1e-12)
  assert metrics.aupr(labels, scores) == pytest.approx(
      skm.average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed,decimals", CASES)
@pytest.mark.parametrize("tpr", [0.95, 0.5, 0.8, 1.0])
def test_fpr_at_tpr_matches_roc_curve(seed, decimals, tpr):
  labels, scores = _data(seed, decimals=decimals)
  got = metrics.fpr_at_tpr(labels, scores, tpr=tpr)
  assert got == pytest.approx(_sk_fpr_at_tpr(labels, scores, tpr), abs=1e-12)
  # The same point on scikit-learn's default (thinned) curve: the minimal FPR with TPR >= tpr.
  fpr_c, tpr_c, _ = skm.roc_curve(labels, scores)
  assert got == pytest.approx(fpr_c[tpr_c >= tpr].min(), abs=1e-12)


def test_fpr_at_tpr_by_counting():
  labels, scores = _data(7, n=120, decimals=1)
  best = 1.0
  for t in np.unique(scores):  # brute force over every threshold: predict positive if >= t
    pred = scores >= t
    tpr = (pred & (labels == 1)).sum() / (labels == 1).sum()
    fpr = (pred & (labels == 0)).sum() / (labels == 0).sum()
    if tpr >= 0.95:
      best = min(best, fpr)
  assert metrics.fpr_at_tpr(labels, scores) == pytest.approx(best, abs=1e-12)


def test_auroc_is_mann_whitney_with_half_ties():
  labels, scores = _data(3, n=80, decimals=0)
  pos, neg = scores[labels == 1], scores[labels == 0]
  u = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
  assert metrics.auroc(labels, scores) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_perfect_inverted_and_constant_scores():
  labels = np.array([0, 0, 0, 1, 1])
  s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
  assert metrics.auroc(labels, s) == 1.0
  assert metrics.aupr(labels, s) == 1.0
  assert metrics.fpr_at_tpr(labels, s) == 0.0
  assert metrics.auroc(labels, -s) == 0.0
  assert metrics.fpr_at_tpr(labels, -s) == 1.0
  const = np.zeros(5)  # a score that cannot separate: one threshold, everything positive
  assert metrics.auroc(labels, const) == 0.5
  assert metrics.aupr(labels, const) == pytest.approx(2 / 5)
  assert metrics.fpr_at_tpr(labels, const) == 1.0


def test_bool_labels_equal_int_labels():
  labels, scores = _data(5, n=50)
  for f in (metrics.auroc, metrics.aupr, metrics.fpr_at_tpr):
    assert f(labels.astype(bool), scores) == f(labels, scores)


@pytest.mark.parametrize("labels", [np.zeros(6, int), np.ones(6, int)])
def test_one_class_raises(labels):
  for f in (metrics.auroc, metrics.aupr, metrics.fpr_at_tpr):
    with pytest.raises(ValueError, match="both classes"):
      f(labels, np.arange(6.0))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="0/1"):
    metrics.auroc([0, 2, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="Expected labels"):
    metrics.aupr([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="NaN"):
    metrics.auroc([0, 1], [0.1, np.nan])
  with pytest.raises(ValueError, match="tpr"):
    metrics.fpr_at_tpr([0, 1], [0.1, 0.2], tpr=0.0)
