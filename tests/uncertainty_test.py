"""Uncertainty scores against explicit loops, and the OOD report."""

import math

import numpy as np
import pytest

from ensembling import metrics, uncertainty


def _probs(seed, k=4, n=30, c=5, scale=2.0, zeros=False):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(k, n, c)) * scale
  p = np.exp(logits - logits.max(-1, keepdims=True))
  if zeros:  # exact zeros: classes some members rule out (0 log 0 and the KL floor)
    p[rng.random(p.shape) < 0.2] = 0.0
    p[..., 0] += 1e-3
  return p / p.sum(-1, keepdims=True)


def _h(q):
  return -sum(x * math.log(x) for x in q if x > 0)


def _loop_scores(p):
  k, n, _ = p.shape
  out = {name: np.zeros(n) for name in uncertainty.ENSEMBLE_SCORES}
  for i in range(n):
    mean = [sum(p[m, i, c] for m in range(k)) / k for c in range(p.shape[2])]
    out["one_minus_max_probability"][i] = 1 - max(mean)
    out["predictive_entropy"][i] = _h(mean)
    out["expected_entropy"][i] = sum(_h(p[m, i]) for m in range(k)) / k
    out["mutual_information"][i] = _h(mean) - out["expected_entropy"][i]
    kls, dis = [], []
    for a in range(k):
      for b in range(k):
        if a != b:
          kls.append(sum(p[a, i, c] * (math.log(p[a, i, c]) - math.log(max(p[b, i, c], 1e-12)))
                         for c in range(p.shape[2]) if p[a, i, c] > 0))
          dis.append(float(np.argmax(p[a, i]) != np.argmax(p[b, i])))
    out["expected_pairwise_kl"][i] = np.mean(kls) if kls else 0.0
    out["pairwise_disagreement"][i] = np.mean(dis) if dis else 0.0
  return out


@pytest.mark.parametrize("seed,k,zeros", [(0, 4, False), (1, 2, False), (2, 5, True),
                                          (3, 3, True)])
def test_ensemble_scores_match_loops(seed, k, zeros):
  p = _probs(seed, k=k, zeros=zeros)
  want = _loop_scores(p)
  got = uncertainty.uncertainty_scores(p)
  assert set(got) == set(uncertainty.ENSEMBLE_SCORES)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert got[name].shape == (p.shape[1],)
  np.testing.assert_allclose(uncertainty.max_probability(p), 1 - want["one_minus_max_probability"],
                             atol=1e-12)


def test_single_model_scores():
  p = _probs(4, k=1)[0]                                 # (N, C)
  got = uncertainty.uncertainty_scores(p)
  assert set(got) == set(uncertainty.SINGLE_MODEL_SCORES)
  np.testing.assert_allclose(got["predictive_entropy"], [_h(row) for row in p], rtol=1e-12)
  np.testing.assert_allclose(got["one_minus_max_probability"], 1 - p.max(-1), rtol=1e-12)
  # A single model is an ensemble of one: the ensemble terms vanish.
  np.testing.assert_allclose(uncertainty.expected_entropy(p), got["predictive_entropy"])
  for fn in (uncertainty.expected_pairwise_kl, uncertainty.pairwise_disagreement):
    np.testing.assert_array_equal(fn(p), 0.0)
  np.testing.assert_allclose(uncertainty.mutual_information(p), 0.0, atol=1e-15)
  # (1, N, C) is the same model: same scores.
  for name, s in uncertainty.uncertainty_scores(p[None]).items():
    np.testing.assert_array_equal(s, got[name])


def test_identical_members_have_no_epistemic_uncertainty():
  p = np.repeat(_probs(5, k=1), 3, axis=0)
  np.testing.assert_allclose(uncertainty.mutual_information(p), 0.0, atol=1e-12)
  np.testing.assert_allclose(uncertainty.expected_pairwise_kl(p), 0.0, atol=1e-12)
  np.testing.assert_array_equal(uncertainty.pairwise_disagreement(p), 0.0)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match=r"\(N, C\) or \(K, N, C\)"):
    uncertainty.predictive_entropy(np.full((5,), 0.2))
  with pytest.raises(ValueError, match="logits"):
    uncertainty.predictive_entropy(np.random.default_rng(0).normal(size=(4, 3)))
  nan = _probs(2, k=3)
  nan[2, 1, 0] = np.nan  # not "logits?": the member with the NaN is named
  with pytest.raises(ValueError, match=r"Member\(s\) \[2\] of 3 have NaN or inf"):
    uncertainty.mutual_information(nan)
  with pytest.raises(ValueError, match="same model"):
    uncertainty.ood_report(_probs(0, k=3), _probs(1, k=2))
  with pytest.raises(ValueError, match="same model"):
    uncertainty.ood_report(_probs(0, k=1)[0], _probs(1, k=1))
  with pytest.raises(ValueError, match="same model"):
    uncertainty.ood_report(_probs(0, c=5), _probs(1, c=4))


@pytest.mark.parametrize("k", [None, 3])
def test_ood_report_equals_metrics_on_concatenated_scores(k):
  p_in = _probs(7, k=k or 1, n=40, scale=3.0)
  p_out = _probs(8, k=k or 1, n=25, scale=1.0)          # flatter: more uncertain
  if k is None:
    p_in, p_out = p_in[0], p_out[0]
  report = uncertainty.ood_report(p_in, p_out)
  names = uncertainty.SINGLE_MODEL_SCORES if k is None else uncertainty.ENSEMBLE_SCORES
  assert set(report) == set(names)
  labels = np.r_[np.zeros(40), np.ones(25)].astype(int)
  for name, fn in names.items():
    s = np.r_[fn(p_in), fn(p_out)]
    assert report[name] == {"auroc": metrics.auroc(labels, s), "aupr": metrics.aupr(labels, s),
                            "fpr95": metrics.fpr_at_tpr(labels, s)}


def test_ood_report_sign_ood_is_positive():
  confident = np.eye(4)[np.arange(20) % 4] * 0.97 + 0.03 / 4
  flat = np.full((10, 4), 0.25)
  r = uncertainty.ood_report(confident, flat)
  for v in r.values():  # flat (OOD) predictions score higher on every score
    assert v == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
  swapped = uncertainty.ood_report(flat, confident)["predictive_entropy"]
  assert swapped["auroc"] == 0.0 and swapped["fpr95"] == 1.0
