"""Metrics for classifiers and ensembles, on NumPy/JAX arrays.

All classification metrics take probabilities `probs_BxC` (rows sum to 1) and integer
`labels_B`; they return Python floats so they can go straight into JSON.
"""

from __future__ import annotations

import functools

import numpy as np

_EPS = 1e-12


def check_probs(probs_BxC, *, what: str = "probs", atol: float = 1e-3) -> np.ndarray:
  """`probs_BxC` as float64 after checking it holds probabilities, one row per example.

  Rows must be finite, non-negative and sum to 1 (within `atol`); arrays that look like
  logits get a hint to apply a softmax first.
  """
  probs = np.asarray(probs_BxC, np.float64)
  if probs.ndim != 2:
    raise ValueError(f"{what} must be (B, C) probabilities, got shape {probs.shape}.")
  bad_rows = np.flatnonzero(~np.isfinite(probs).all(axis=1))
  if len(bad_rows):
    raise ValueError(f"{what} has NaN or inf in row(s) {bad_rows[:5].tolist()}"
                     f"{' ...' if len(bad_rows) > 5 else ''} of {len(probs)}.")
  sums = probs.sum(axis=1)
  if (probs < 0).any() or not np.allclose(sums, 1.0, atol=atol):
    hint = (" They look like logits: apply a softmax first (`ensemble.members_probs`), or use "
            "`report.ensemble_report`, which takes logits.")
    raise ValueError(f"{what} must be probabilities (non-negative rows summing to 1); got "
                     f"min {probs.min():.4g}, row sums {sums.min():.4g}..{sums.max():.4g}.{hint}")
  return probs


def _check(probs, labels):
  from ensembling.data.core import check_labels
  probs = check_probs(probs)
  labels = np.asarray(labels)
  if labels.shape != (probs.shape[0],):
    raise ValueError(f"Expected probs (B, C) and labels (B,), got {probs.shape} and {labels.shape}.")
  return probs, check_labels(labels, num_classes=probs.shape[1])


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


def mean_precision_at_k(query_emb_QxD, query_labels_Q, index_emb_NxD, index_labels_N, *,
                        k: int = 5, batch_size: int = 1024,
                        exclude_self: bool = False) -> float:
  """mP@k of retrieval by cosine similarity (seed 000, Eq. 4; GLDv2's mAP@k).

  For each query q the k most cosine-similar index items are retrieved (ties: lower
  index first); rel_q(j) = 1 if the j-th has the query's class, P_q(j) is the
  precision of the first j, m_q the number of index items of the query's class, and

      mP@k = 1/Q sum_q 1/min(m_q, k) sum_{j<=k} P_q(j) rel_q(j).

  Queries whose class has no index item (m_q = 0) are left out of Q.

  Args:
    query_emb_QxD, query_labels_Q: query embeddings (any norm) and classes.
    index_emb_NxD, index_labels_N: the searched set.
    k: cut-off (5 for mP@5).
    batch_size: queries per similarity block (memory: batch_size x N floats).
    exclude_self: the query set IS the index set (same order); item i is not
      retrieved for query i and does not count in m_i.

  Returns:
    A float in [0, 1].
  """
  import jax.numpy as jnp

  q = np.asarray(query_emb_QxD, np.float32)
  ql = np.asarray(query_labels_Q)
  x = np.asarray(index_emb_NxD, np.float32)
  xl = np.asarray(index_labels_N)
  if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
    raise ValueError(f"Expected query (Q, D) and index (N, D) embeddings, got {q.shape} and "
                     f"{x.shape}.")
  if ql.shape != (len(q),) or xl.shape != (len(x),):
    raise ValueError(f"Labels must have shapes ({len(q)},) and ({len(x)},), got {ql.shape} "
                     f"and {xl.shape}.")
  if exclude_self and len(q) != len(x):
    raise ValueError("exclude_self needs the query set to be the index set (same length).")
  kk = k + 1 if exclude_self else k
  if not 1 <= kk <= len(x):
    raise ValueError(f"k={k} is out of range for an index of {len(x)} items.")
  from ensembling.losses import l2_normalize
  q, x = (l2_normalize(a).astype(np.float32) for a in (q, x))
  classes, counts = np.unique(xl, return_counts=True)
  m = np.zeros(len(q), np.int64)
  known = np.isin(ql, classes)
  m[known] = counts[np.searchsorted(classes, ql[known])]
  if exclude_self:
    m -= 1

  top_k = _top_k_fn(kk)
  x_j = jnp.asarray(x)
  retrieved = []
  for s in range(0, len(q), batch_size):
    idx = np.asarray(top_k(jnp.asarray(q[s:s + batch_size]), x_j))
    if exclude_self:  # drop the query itself wherever it landed (else the k+1-th)
      own = idx == np.arange(s, s + len(idx))[:, None]
      own[~own.any(1), -1] = True
      idx = idx[~own].reshape(len(idx), k)
    retrieved.append(idx)
  idx = np.concatenate(retrieved)
  rel = (xl[idx] == ql[:, None]).astype(np.float64)
  precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
  valid = m > 0
  if not valid.any():
    raise ValueError("No query has a relevant item in the index (m_q = 0 for all).")
  ap = (precision * rel).sum(1)[valid] / np.minimum(m[valid], k)
  return float(ap.mean())


@functools.lru_cache(maxsize=8)
def _top_k_fn(k: int):
  import jax
  return jax.jit(lambda a, b: jax.lax.top_k(a @ b.T, k)[1])

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
