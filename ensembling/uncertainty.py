"""Uncertainty scores for out-of-distribution detection, and the OOD report.

Every score takes probabilities, either one model's `probs_NxC` or an ensemble's
`probs_KxNxC` (member axis first, as `ensemble.members_probs` returns them), and
returns a NumPy float64 array of shape (N,) where HIGHER means MORE UNCERTAIN (more
likely out-of-distribution), so it feeds `metrics.auroc(labels, score)` directly with
OOD as the positive class. The one exception is `max_probability`, the confidence
itself (higher = more in-distribution); its OOD score is `one_minus_max_probability`.

With p_k the members' predictive distributions, p = mean_k p_k and
H(q) = -sum_c q_c log q_c (natural log, 0 log 0 = 0):

  predictive_entropy   H(p)                       total uncertainty
  expected_entropy     mean_k H(p_k)              aleatoric part
  mutual_information   H(p) - mean_k H(p_k)       epistemic part (member disagreement)
  expected_pairwise_kl mean_{i != j} KL(p_i || p_j)
  pairwise_disagreement  fraction of member pairs whose top classes differ

For a single model (N, C), or K = 1, the ensemble terms vanish: expected_entropy equals
predictive_entropy and the last three are 0.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ensembling import metrics, tree

_KL_EPS = 1e-12


def _members(probs) -> np.ndarray:
  """(N, C) -> (1, N, C); (K, N, C) unchanged; checks they are probabilities."""
  p = np.asarray(probs, np.float64)
  if p.ndim == 2:
    p = p[None]
  if p.ndim != 3 or 0 in p.shape:
    raise ValueError(f"Expected probabilities of shape (N, C) or (K, N, C), got "
                     f"{np.shape(probs)}.")
  finite = tree.finite_members(p)
  if not finite.all():
    raise ValueError(f"Member(s) {np.flatnonzero(~finite).tolist()} of {len(finite)} have NaN "
                     "or inf probabilities.")
  if (p < 0).any() or not np.allclose(p.sum(-1), 1.0, atol=1e-3):
    raise ValueError("Expected probabilities (non-negative, rows summing to 1); got "
                     "something else (logits? apply softmax first).")
  return p


def _entropy(p: np.ndarray) -> np.ndarray:
  """Entropy over the last axis, 0 log 0 = 0."""
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def max_probability(probs) -> np.ndarray:
  """Confidence max_c p_c of the (mean) prediction: HIGHER = LESS OOD.

  This is the maximum softmax probability (MSP) baseline of Hendrycks & Gimpel (2017);
  for OOD scores use `one_minus_max_probability` (or negate it).

  Args:
    probs: (N, C) or (K, N, C) probabilities; members are averaged first.

  Returns:
    (N,) float64 in [1/C, 1].

  >>> max_probability([[0.7, 0.3], [0.5, 0.5]]).tolist()
  [0.7, 0.5]
  """
  return _members(probs).mean(0).max(-1)


def one_minus_max_probability(probs) -> np.ndarray:
  """1 - max_c p_c of the (mean) prediction: higher = more OOD (uncertainty-baselines'
  `ood_scores = 1 - reduce_max(probs)`).

  Args:
    probs: (N, C) or (K, N, C) probabilities.

  Returns:
    (N,) float64 in [0, 1 - 1/C].
  """
  return 1.0 - max_probability(probs)


def predictive_entropy(probs) -> np.ndarray:
  """Entropy of the mean prediction, H(mean_k p_k): higher = more OOD.

  Args:
    probs: (N, C) or (K, N, C) probabilities.

  Returns:
    (N,) float64 in [0, log C] (nats).

  >>> round(float(predictive_entropy([[[1.0, 0.0]], [[0.0, 1.0]]])[0]), 6)  # log 2
  0.693147
  """
  return _entropy(_members(probs).mean(0))


def expected_entropy(probs) -> np.ndarray:
  """Mean of the members' entropies, mean_k H(p_k): higher = more OOD.

  Args:
    probs: (N, C) or (K, N, C) probabilities.

  Returns:
    (N,) float64 in [0, log C]; equals `predictive_entropy` for one model.

  >>> expected_entropy([[[1.0, 0.0]], [[0.0, 1.0]]]).tolist()  # confident members
  [0.0]
  """
  return _entropy(_members(probs)).mean(0)


def mutual_information(probs) -> np.ndarray:
  """H(mean_k p_k) - mean_k H(p_k), the members' disagreement in nats (the BALD score,
  the epistemic part of the predictive entropy): higher = more OOD.

  Args:
    probs: (N, C) or (K, N, C) probabilities.

  Returns:
    (N,) float64, >= 0 up to rounding; 0 for one model.

  >>> round(float(mutual_information([[[1.0, 0.0]], [[0.0, 1.0]]])[0]), 6)
  0.693147
  """
  p = _members(probs)
  return _entropy(p.mean(0)) - _entropy(p).mean(0)


def expected_pairwise_kl(probs, *, eps: float = _KL_EPS) -> np.ndarray:
  """Mean over ordered member pairs i != j of KL(p_i || p_j): higher = more OOD.

  KL(p_i || p_j) = sum_c p_ic (log p_ic - log max(p_jc, eps)), with 0 log 0 = 0; the
  floor `eps` keeps a class that member j rules out (p_jc = 0) finite. Computed in
  O(K N C) from the identity sum_{i,j} KL = K sum_i sum_c p_ic log p_ic
  - sum_c (sum_i p_ic)(sum_j log p_jc), less the diagonal.

  Args:
    probs: (N, C) or (K, N, C) probabilities.
    eps: floor on the second argument's probabilities inside the log.

  Returns:
    (N,) float64, >= 0; 0 for a single model (no pairs).

  >>> a, b = np.array([0.5, 0.5]), np.array([0.9, 0.1])
  >>> kl = lambda p, q: float(np.sum(p * np.log(p / q)))
  >>> bool(np.isclose(expected_pairwise_kl([[a], [b]])[0], (kl(a, b) + kl(b, a)) / 2))
  True
  """
  p = _members(probs)
  k = p.shape[0]
  if k == 1:
    return np.zeros(p.shape[1])
  neg_h = -_entropy(p)                                 # (K, N): sum_c p log p
  log_q = np.log(np.maximum(p, eps))                   # (K, N, C)
  total = k * neg_h.sum(0) - np.sum(p.sum(0) * log_q.sum(0), axis=-1)
  diagonal = neg_h - np.sum(p * log_q, axis=-1)        # KL(p_i || p_i): 0 unless p < eps
  return (total - diagonal.sum(0)) / (k * (k - 1))


def pairwise_disagreement(probs) -> np.ndarray:
  """Fraction of ordered member pairs i != j whose top classes differ: higher = more OOD.

  The per-example version of `metrics.mean_disagreement` (argmax ties go to the lowest
  class index).

  Args:
    probs: (N, C) or (K, N, C) probabilities.

  Returns:
    (N,) float64 in [0, 1]; 0 for a single model.

  >>> pairwise_disagreement([[[0.9, 0.1], [0.6, 0.4]], [[0.2, 0.8], [0.7, 0.3]]]).tolist()
  [1.0, 0.0]
  """
  p = _members(probs)
  k, _, c = p.shape
  if k == 1:
    return np.zeros(p.shape[1])
  counts = np.eye(c)[p.argmax(-1)].sum(0)              # (N, C): members voting for each class
  agreeing = np.sum(counts * (counts - 1), axis=-1)    # ordered pairs with the same vote
  return 1.0 - agreeing / (k * (k - 1))


SINGLE_MODEL_SCORES: dict[str, Callable[..., np.ndarray]] = {
    "one_minus_max_probability": one_minus_max_probability,
    "predictive_entropy": predictive_entropy,
}
ENSEMBLE_SCORES: dict[str, Callable[..., np.ndarray]] = {
    **SINGLE_MODEL_SCORES,
    "expected_entropy": expected_entropy,
    "mutual_information": mutual_information,
    "expected_pairwise_kl": expected_pairwise_kl,
    "pairwise_disagreement": pairwise_disagreement,
}


def uncertainty_scores(probs) -> dict[str, np.ndarray]:
  """Every applicable score (higher = more OOD), each of shape (N,).

  Args:
    probs: (N, C) for one model (the `SINGLE_MODEL_SCORES`) or (K, N, C) for an
      ensemble (the `ENSEMBLE_SCORES`; with K = 1 only the single-model ones, since the
      others are identically 0 or equal to the entropy).

  Returns:
    A dict name -> (N,) float64 array.
  """
  p = _members(probs)
  names = ENSEMBLE_SCORES if p.shape[0] > 1 else SINGLE_MODEL_SCORES
  return {name: fn(p) for name, fn in names.items()}


def ood_report(probs_in, probs_out) -> dict[str, dict[str, float]]:
  """AUROC, AUPR and FPR95 of every uncertainty score at telling OOD from in-distribution.

  In-distribution examples are the negatives (label 0) and OOD examples the positives
  (label 1), scored so that higher = more OOD (torch-uncertainty's and
  uncertainty-baselines' convention): `aupr` is therefore AUPR-Out and `fpr95` the
  fraction of in-distribution inputs flagged when 95% of the OOD inputs are.

  Args:
    probs_in: in-distribution probabilities, (N_in, C) or (K, N_in, C).
    probs_out: OOD probabilities from the same model(s): (N_out, C) or (K, N_out, C),
      same K and C as `probs_in`.

  Returns:
    {score name: {"auroc": float, "aupr": float, "fpr95": float}} over the scores of
    `uncertainty_scores`.

  >>> rng = np.random.default_rng(0)
  >>> sharp = np.eye(3)[rng.integers(0, 3, 50)] * 0.9 + 0.1 / 3
  >>> flat = np.full((40, 3), 1 / 3)
  >>> ood_report(sharp, flat)["predictive_entropy"]
  {'auroc': 1.0, 'aupr': 1.0, 'fpr95': 0.0}
  """
  p_in, p_out = _members(probs_in), _members(probs_out)
  if (np.ndim(probs_in) != np.ndim(probs_out) or p_in.shape[0] != p_out.shape[0]
      or p_in.shape[2] != p_out.shape[2]):
    raise ValueError(f"probs_in {np.shape(probs_in)} and probs_out {np.shape(probs_out)} "
                     "must come from the same model(s): same K (if any) and C.")
  s_in, s_out = uncertainty_scores(p_in), uncertainty_scores(p_out)
  labels = np.r_[np.zeros(p_in.shape[1], int), np.ones(p_out.shape[1], int)]
  report = {}
  for name in s_in:
    s = np.r_[s_in[name], s_out[name]]
    report[name] = {"auroc": metrics.auroc(labels, s), "aupr": metrics.aupr(labels, s),
                    "fpr95": metrics.fpr_at_tpr(labels, s, tpr=0.95)}
  return report
