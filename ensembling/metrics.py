"""Metrics for classifiers and ensembles, on NumPy/JAX arrays.

The calibration metrics (NLL, ECE, Brier) take probabilities `probs_BxC` (checked: rows
non-negative and summing to 1, with a hint when they look like logits); accuracy and
top-k accuracy take probabilities or any per-class scores (only the order matters).
Labels must be integers in [0, C). They return Python floats, ready for JSON.
"""

from __future__ import annotations

import functools

import numpy as np

from ensembling import checks

_EPS = 1e-12


def check_probs(probs_BxC, *, what: str = "probs", atol: float = 1e-3) -> np.ndarray:
  """`probs_BxC` as float64 after checking it holds probabilities, one row per example.

  Rows must be finite, non-negative and sum to 1 (within `atol`); arrays that look like
  logits get a hint to apply a softmax first.
  """
  probs = np.asarray(probs_BxC, np.float64)
  if probs.ndim != 2:
    raise ValueError(f"{what} must be (B, C) probabilities, got shape {probs.shape}.")
  _check_finite_rows(probs, f"{what} has")
  sums = probs.sum(axis=1)
  if (probs < 0).any() or not np.allclose(sums, 1.0, atol=atol):
    hint = (" They look like logits: apply a softmax first (`ensemble.members_probs`), or use "
            "`report.ensemble_report`, which takes logits.")
    raise ValueError(f"{what} must be probabilities (non-negative rows summing to 1); got "
                     f"min {probs.min():.4g}, row sums {sums.min():.4g}..{sums.max():.4g}.{hint}")
  return probs


def _check_finite_rows(a_NxD: np.ndarray, subject: str) -> None:
  """A ValueError "<subject> NaN or inf in row(s) [...] of N." if any row is not finite."""
  bad = np.flatnonzero(~np.isfinite(a_NxD).all(axis=1))
  if len(bad):
    raise ValueError(f"{subject} NaN or inf in row(s) {bad[:5].tolist()}"
                     f"{' ...' if len(bad) > 5 else ''} of {len(a_NxD)}.")


def _check(probs, labels, *, scores_ok: bool = False):
  from ensembling.data.core import check_labels
  if scores_ok:  # only the order within a row matters: any finite scores will do
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2:
      raise ValueError(f"scores must be (B, C), got shape {probs.shape}.")
    _check_finite_rows(probs, "scores have")
  else:
    probs = check_probs(probs)
  labels = np.asarray(labels)
  if labels.shape != (probs.shape[0],):
    raise ValueError(f"Expected probs (B, C) and labels (B,), got {probs.shape} and {labels.shape}.")
  return probs, check_labels(labels, num_classes=probs.shape[1])


def accuracy(probs_BxC, labels_B) -> float:
  """Fraction of rows whose highest score is the label (probabilities or any scores)."""
  probs, labels = _check(probs_BxC, labels_B, scores_ok=True)
  return float(np.mean(probs.argmax(-1) == labels))


def top_k_accuracy(probs_BxC, labels_B, *, k: int) -> float:
  """Fraction of rows whose label is among the k highest scores (any scores)."""
  probs, labels = _check(probs_BxC, labels_B, scores_ok=True)
  k = checks.integer(k, name="k (at most the number of classes)", high=probs.shape[1])
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
  num_bins = checks.integer(num_bins, name="num_bins")
  probs, labels = _check(probs_BxC, labels_B)
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bin_ids = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
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
  _check_finite_rows(q, "query embeddings have")
  _check_finite_rows(x, "index embeddings have")
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


# --- Out-of-distribution detection: AUROC, AUPR, FPR at a TPR ------------------------
#
# Binary detection metrics with the argument order of scikit-learn's
# `roc_auc_score(y_true, y_score)`. For OOD detection we follow torch-uncertainty
# (`ClassificationRoutine`: in-distribution targets 0, OOD targets 1, score = -confidence
# or an uncertainty) and uncertainty-baselines (`ood_labels = 1 - is_in_distribution`,
# `ood_scores = 1 - max prob`): OOD is the positive class (label 1) and a higher score
# means "more OOD". The scores in `ensembling.uncertainty` all follow that sign.


def _check_binary(labels_N, scores_N):
  labels = np.asarray(labels_N)
  scores = np.asarray(scores_N, np.float64)
  if labels.ndim != 1 or scores.shape != labels.shape:
    raise ValueError(f"Expected labels (N,) and scores (N,), got {labels.shape} and "
                     f"{scores.shape}.")
  if labels.dtype != bool and not np.isin(labels, (0, 1)).all():
    raise ValueError(f"labels must be 0/1 (1 = positive, e.g. OOD), got values "
                     f"{np.unique(labels)[:10].tolist()}.")
  if not np.isfinite(scores).all():
    raise ValueError("scores contain NaN or infinite values.")
  labels = labels.astype(bool)
  n_pos = int(labels.sum())
  if n_pos == 0 or n_pos == len(labels):
    which = "negative (0)" if n_pos == 0 else "positive (1)"
    raise ValueError(f"labels are all {which}: detection metrics need both classes "
                     f"(got {len(labels)} examples).")
  return labels, scores


def _binary_curve(labels: np.ndarray, scores: np.ndarray):
  """Cumulative (fps, tps) at each distinct threshold, highest threshold first.

  Threshold t predicts "positive" for score >= t; tied scores enter together, so entry
  i counts every example whose score is >= the i-th largest distinct score (as
  scikit-learn's `_binary_clf_curve`).
  """
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], labels[order]
  last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
  tps = np.cumsum(y)[last_of_tie].astype(np.float64)
  fps = (last_of_tie + 1) - tps
  return fps, tps


def auroc(labels_N, scores_N) -> float:
  """Area under the ROC curve, ties handled as scikit-learn's `roc_auc_score`.

  The ROC curve has one point per distinct score (plus the origin) and the area is the
  trapezoid rule over those points, so a tie between a positive and a negative counts
  1/2 (the Mann-Whitney U statistic over n_pos * n_neg).

  Args:
    labels_N: 1 (or True) for the positive class (OOD in our use), 0 for the negative
      (in-distribution).
    scores_N: higher = more likely positive (more OOD).

  Returns:
    A float in [0, 1]; 0.5 is chance, 1 separates the classes perfectly.

  >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
  0.75
  """
  fps, tps = _binary_curve(*_check_binary(labels_N, scores_N))
  fpr = np.r_[0.0, fps / fps[-1]]
  tpr = np.r_[0.0, tps / tps[-1]]
  return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def aupr(labels_N, scores_N) -> float:
  """Area under the precision-recall curve as average precision (scikit-learn's
  `average_precision_score`): AP = sum_n (R_n - R_{n-1}) P_n over distinct thresholds
  from the highest down, with R_0 = 0 (a step function, no interpolation).

  Args:
    labels_N: 1 for the positive class (OOD: this is "AUPR-Out" / AUPR with OOD as
      positive), 0 for the negative.
    scores_N: higher = more likely positive.

  Returns:
    A float in (0, 1]; a random score gives about the positive fraction.

  >>> aupr([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
  0.8333333333333333
  """
  fps, tps = _binary_curve(*_check_binary(labels_N, scores_N))
  precision = tps / (tps + fps)
  recall = tps / tps[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(labels_N, scores_N, *, tpr: float = 0.95) -> float:
  """False-positive rate at the first threshold whose true-positive rate reaches `tpr`.

  Thresholds are the distinct scores taken from the highest down (predict positive for
  score >= t). With TPR(t) and FPR(t) the rates at threshold t, the result is
  FPR(t*) where t* is the largest t with TPR(t) >= tpr; since both rates only grow as
  t falls, this is also min{FPR(t) : TPR(t) >= tpr}. Tied scores are never split.
  `fpr_at_tpr(labels, scores)` is "FPR95" with OOD as positive: the fraction of
  in-distribution inputs flagged when 95% of OOD inputs are caught. (torch-uncertainty's
  `FPR95` takes the point with TPR closest to 0.95 instead, which can lie below it.)

  Args:
    labels_N: 1 for the positive class (OOD), 0 for the negative.
    scores_N: higher = more likely positive.
    tpr: the true-positive rate to reach, in (0, 1].

  Returns:
    A float in [0, 1]; lower is better.

  >>> fpr_at_tpr([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], tpr=0.95)
  0.5
  """
  if not 0.0 < tpr <= 1.0:
    raise ValueError(f"tpr must be in (0, 1], got {tpr}.")
  fps, tps = _binary_curve(*_check_binary(labels_N, scores_N))
  first = int(np.argmax(tps / tps[-1] >= tpr))  # exists: the last point has TPR = 1
  return float(fps[first] / fps[-1])
