"""Metrics for classifiers and ensembles, on NumPy/JAX arrays.

All classification metrics take probabilities `probs_BxC` (rows sum to 1) and integer
`labels_B`; they return Python floats so they can go straight into JSON.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def _check(probs, labels):
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  if probs.ndim != 2 or labels.shape != (probs.shape[0],):
    raise ValueError(f"Expected probs (B, C) and labels (B,), got {probs.shape} and {labels.shape}.")
  return probs, labels


def accuracy(probs_BxC, labels_B) -> float:
  probs, labels = _check(probs_BxC, labels_B)
  return float(np.mean(probs.argmax(-1) == labels))


def top_k_accuracy(probs_BxC, labels_B, *, k: int) -> float:
  probs, labels = _check(probs_BxC, labels_B)
  topk = np.argsort(-probs, axis=-1)[:, :k]
  return float(np.mean((topk == labels[:, None]).any(-1)))


def nll(probs_BxC, labels_B) -> float:
  """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
  probs, labels = _check(probs_BxC, labels_B)
  p = probs[np.arange(len(labels)), labels]
  return float(-np.mean(np.log(np.clip(p, _EPS, 1.0))))


def ece(probs_BxC, labels_B, *, num_bins: int = 15) -> float:
  """Expected calibration error with `num_bins` equal-width confidence bins.

  Bins are (lo, hi]; ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|.
  """
  probs, labels = _check(probs_BxC, labels_B)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bin_ids = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
  counts = np.bincount(bin_ids, minlength=num_bins)
  conf_sum = np.bincount(bin_ids, weights=conf, minlength=num_bins)
  acc_sum = np.bincount(bin_ids, weights=correct, minlength=num_bins)
  return float(np.sum(np.abs(acc_sum - conf_sum)) / len(labels))


def brier(probs_BxC, labels_B) -> float:
  """Mean over examples of sum_c (p_c - onehot_c)^2 (multi-class Brier score)."""
  probs, labels = _check(probs_BxC, labels_B)
  onehot = np.eye(probs.shape[1])[labels]
  return float(np.mean(np.sum((probs - onehot) ** 2, axis=-1)))


def classification_metrics(probs_BxC, labels_B, *, num_bins: int = 15) -> dict[str, float]:
  """accuracy, nll, ece and brier in one dict."""
  return {
      "accuracy": accuracy(probs_BxC, labels_B),
      "nll": nll(probs_BxC, labels_B),
      "ece": ece(probs_BxC, labels_B, num_bins=num_bins),
      "brier": brier(probs_BxC, labels_B),
  }


def disagreement_matrix(preds_KxB) -> np.ndarray:
  """D[i, j] = fraction of examples that members i and j classify differently.

  `preds_KxB` holds class predictions (ints); pass `probs.argmax(-1)` for probabilities.
  """
  preds = np.asarray(preds_KxB)
  if preds.ndim != 2:
    raise ValueError(f"Expected predictions of shape (K, B), got {preds.shape}.")
  return (preds[:, None, :] != preds[None, :, :]).mean(-1)


def mean_disagreement(preds_KxB) -> float:
  """Average of the off-diagonal entries of `disagreement_matrix` (0 for one member)."""
  d = disagreement_matrix(preds_KxB)
  k = d.shape[0]
  return float(d.sum() / (k * (k - 1))) if k > 1 else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values share the mean of the ranks they occupy."""
  values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  first = np.cumsum(counts) - counts  # 0-based position where each distinct value starts
  return (first + (counts + 1) / 2.0)[inverse.reshape(-1)]


def spearman(x_N, y_N) -> float:
  """Spearman's rank correlation: Pearson correlation of the average ranks (ties averaged).

  Returns NaN when either input is constant. Raises on shape mismatch or NaN inputs.
  """
  x = np.asarray(x_N, np.float64)
  y = np.asarray(y_N, np.float64)
  if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
    raise ValueError(f"spearman expects two 1-d arrays of the same length >= 2, got "
                     f"{x.shape} and {y.shape}.")
  if np.isnan(x).any() or np.isnan(y).any():
    raise ValueError("spearman got NaN values.")
  rx, ry = _average_ranks(x), _average_ranks(y)
  rx -= rx.mean()
  ry -= ry.mean()
  denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return float((rx * ry).sum() / denom) if denom > 0 else float("nan")
