"""Metrics against explicit NumPy loops."""

import math

import numpy as np
import pytest

from ensembling import ensemble, metrics


def _probs(seed, b=200, c=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, c)) * 3
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True), rng.integers(0, c, size=b)


def test_accuracy_nll_brier_loops():
  p, y = _probs(0)
  acc = sum(int(np.argmax(p[i]) == y[i]) for i in range(len(y))) / len(y)
  nll = -sum(math.log(p[i, y[i]]) for i in range(len(y))) / len(y)
  brier = sum(sum((p[i, c] - (c == y[i])) ** 2 for c in range(p.shape[1])) for i in range(len(y))) / len(y)
  assert metrics.accuracy(p, y) == pytest.approx(acc)
  assert metrics.nll(p, y) == pytest.approx(nll)
  assert metrics.brier(p, y) == pytest.approx(brier)
  top2 = sum(int(y[i] in np.argsort(-p[i])[:2]) for i in range(len(y))) / len(y)
  assert metrics.top_k_accuracy(p, y, k=2) == pytest.approx(top2)


def test_ece_matches_explicit_binning():
  p, y = _probs(1, b=500)
  n_bins = 15
  total = 0.0
  for b in range(n_bins):
    lo, hi = b / n_bins, (b + 1) / n_bins
    idx = [i for i in range(len(y)) if (lo < p[i].max() <= hi) or (b == 0 and p[i].max() == 0)]
    if not idx:
      continue
    acc = np.mean([np.argmax(p[i]) == y[i] for i in idx])
    conf = np.mean([p[i].max() for i in idx])
    total += len(idx) / len(y) * abs(acc - conf)
  assert metrics.ece(p, y, num_bins=n_bins) == pytest.approx(total, abs=1e-12)


def test_ece_is_zero_for_perfectly_calibrated_one_hot():
  y = np.arange(10) % 3
  p = np.eye(3)[y]
  assert metrics.ece(p, y) == 0.0
  assert metrics.brier(p, y) == 0.0


def test_disagreement_matrix_loop():
  rng = np.random.default_rng(2)
  preds = rng.integers(0, 3, size=(4, 50))
  d = metrics.disagreement_matrix(preds)
  for i in range(4):
    for j in range(4):
      assert d[i, j] == pytest.approx(np.mean([preds[i, n] != preds[j, n] for n in range(50)]))
  assert np.allclose(np.diag(d), 0) and np.allclose(d, d.T)
  off = [d[i, j] for i in range(4) for j in range(4) if i != j]
  assert metrics.mean_disagreement(preds) == pytest.approx(np.mean(off))


def test_shape_errors():
  with pytest.raises(ValueError, match="probs"):
    metrics.accuracy(np.ones((3, 2)), np.ones(4, int))
  with pytest.raises(ValueError, match="\\(K, B\\)"):
    metrics.disagreement_matrix(np.ones(3))


def test_ensemble_combinations_against_loops():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 6, 3)).astype(np.float32)
  sm = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  want = sum(sm(logits[k]) for k in range(4)) / 4
  np.testing.assert_allclose(ensemble.average_probs(logits), want, rtol=1e-5)
  w = np.array([1.0, 0.0, 0.0, 3.0])
  np.testing.assert_allclose(ensemble.average_probs(logits, w),
                             (sm(logits[0]) + 3 * sm(logits[3])) / 4, rtol=1e-5)
  np.testing.assert_allclose(ensemble.average_logits(logits), logits.mean(0), rtol=1e-6)
  votes = np.zeros((6, 3))
  for k in range(4):
    for b in range(6):
      votes[b, logits[k, b].argmax()] += 0.25
  np.testing.assert_allclose(ensemble.vote(logits), votes)
  cum = ensemble.cumulative_average_probs(logits)
  np.testing.assert_allclose(cum[1], (sm(logits[0]) + sm(logits[1])) / 2, rtol=1e-5)
  with pytest.raises(ValueError, match="\\(K, B, C\\)"):
    ensemble.average_probs(logits[0])


def test_inputs_are_checked_at_the_door():
  p, y = _probs(3, b=20, c=3)
  logits = np.log(p)
  with pytest.raises(ValueError, match="look like logits"):
    metrics.nll(logits, y)
  with pytest.raises(ValueError, match="look like logits"):
    metrics.ece(p * 4.0, y)
  for bad, match in (([-1] + [0] * 19, r"found \[-1\]"), ([7] + [0] * 19, r"\[0, 3\); found \[7\]"),
                     ([0.5] + [0] * 19, "integer classes")):
    with pytest.raises(ValueError, match=match):
      metrics.accuracy(p, np.asarray(bad))
  for k in (0, 4, 2.0, True):  # 3 classes: k = 4 would score every row correct
    with pytest.raises(ValueError, match=rf"k \(at most the number of classes\) must be an integer in \[1, 3\], got {k!r}"):
      metrics.top_k_accuracy(p, y, k=k)
  assert metrics.top_k_accuracy(p, y, k=3) == 1.0  # every label is among all 3 classes
  for n in (0, -2, 1.5):
    with pytest.raises(ValueError, match=rf"num_bins must be an integer >= 1, got {n!r}"):
      metrics.ece(p, y, num_bins=n)
  nan = p.copy()
  nan[4] = np.nan
  with pytest.raises(ValueError, match=r"NaN or inf in row\(s\) \[4\]"):
    metrics.accuracy(nan, y)
  lg = np.stack([logits, logits])
  with pytest.raises(ValueError, match="non-negative"):
    ensemble.average_probs(lg, [2.0, -1.0])
  with pytest.raises(ValueError, match=r"shape \(2,\), got \(3,\)"):
    ensemble.average_probs(lg, [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match=r"Member\(s\) \[1\] of 2 have NaN"):
    ensemble.average_probs(np.stack([logits, np.full_like(logits, np.nan)]))
  np.testing.assert_allclose(ensemble.average_probs(lg, [3.0, 1.0]), p, rtol=1e-5)
