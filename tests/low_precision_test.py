"""low_precision.py against its definitions: the per-channel grid (NumPy reference),
RTN determinism, BSR unbiasedness with 1/sqrt(n) error, members = independent BSR draws,
full-precision leaves by path, memory, ambiguity, bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import low_precision as lp

R = np.random.default_rng(0)
PARAMS = {"Dense_0": {"kernel": jnp.asarray(R.normal(size=(6, 4)), jnp.float32),
                      "bias": jnp.asarray(R.normal(size=(4,)), jnp.float32)},
          "conv": {"kernel": jnp.asarray(R.normal(size=(3, 3, 2, 5)), jnp.float32)},
          "bn_0": {"scale": jnp.asarray(R.normal(size=(4,)), jnp.float32)}}
QUANTISED = (("Dense_0", "kernel"), ("conv", "kernel"))
KEPT = (("Dense_0", "bias"), ("bn_0", "scale"))


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree, np.float64)


def _scale_ref(w, bits):
  """A NumPy loop: per output channel (last axis), absmax / (2^(b-1) - 1)."""
  s = np.empty(w.shape[-1])
  for c in range(w.shape[-1]):
    s[c] = np.abs(w[..., c]).max() / (2 ** (bits - 1) - 1)
  return s


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_rtn_and_bsr_values_lie_on_the_per_channel_grid(bits):
  qmax = 2 ** (bits - 1) - 1
  outs = {"rtn": lp.rtn(PARAMS, bits=bits), "bsr": lp.bsr(jax.random.key(1), PARAMS, bits=bits)}
  for name, out in outs.items():
    for path in QUANTISED:
      w, q = _get(PARAMS, path), _get(out, path)
      k = q / _scale_ref(w, bits)
      np.testing.assert_allclose(k, np.round(k), atol=1e-3, err_msg=f"{name} {path}")
      assert np.abs(np.round(k)).max() <= qmax
      if name == "rtn":  # the nearest grid point (ties to even, as np.round)
        np.testing.assert_allclose(q, np.round(w / _scale_ref(w, bits)) * _scale_ref(w, bits),
                                   rtol=1e-5, atol=1e-6)
      else:  # one of the two neighbours of w
        v = w / _scale_ref(w, bits)
        assert np.all((np.abs(k - np.floor(v)) < 1e-3) | (np.abs(k - np.ceil(v)) < 1e-3))
    for path in KEPT:  # biases and norms stay in full precision by default
      np.testing.assert_array_equal(_get(out, path), _get(PARAMS, path))


def test_rtn_is_deterministic_and_bsr_is_not():
  a, b = lp.rtn(PARAMS, bits=4), lp.rtn(PARAMS, bits=4)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  c, d = (lp.bsr(jax.random.key(i), PARAMS, bits=4) for i in (0, 1))
  assert not np.array_equal(c["conv"]["kernel"], d["conv"]["kernel"])


def test_bsr_is_unbiased_with_error_shrinking_like_one_over_sqrt_n():
  w = {"kernel": jnp.asarray(R.normal(size=(32, 16)), jnp.float32)}
  draws = np.asarray(lp.members(jax.random.key(0), w, num_members=1024, bits=3)["kernel"])
  err = {n: np.sqrt(np.mean((draws[:n].mean(0) - np.asarray(w["kernel"])) ** 2))
         for n in (16, 256)}
  # RMS error of the mean of n Bernoulli roundings ~ sigma / sqrt(n): 16x the draws, 1/4.
  assert 2.5 < err[16] / err[256] < 6.5
  assert err[256] < 0.02 * np.abs(np.asarray(w["kernel"])).max()


def test_members_are_independent_bsr_draws_stacked():
  m = lp.members(jax.random.key(7), PARAMS, num_members=3, bits=4)
  keys = jax.random.split(jax.random.key(7), 3)
  for i in range(3):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), m,
                 lp.bsr(keys[i], PARAMS, bits=4))
  assert m["conv"]["kernel"].shape == (3, 3, 3, 2, 5)
  assert not np.array_equal(m["conv"]["kernel"][0], m["conv"]["kernel"][1])


def test_full_precision_leaves_are_selected_by_path():
  out = lp.rtn(PARAMS, bits=3, keep=("^conv/",))
  np.testing.assert_array_equal(out["conv"]["kernel"], PARAMS["conv"]["kernel"])
  assert not np.array_equal(out["Dense_0"]["bias"], PARAMS["Dense_0"]["bias"])  # now quantised
  mask = lp.quantised_mask(PARAMS)
  assert mask["Dense_0"] == {"kernel": True, "bias": False}
  assert not mask["bn_0"]["scale"]


def test_memory_bits_counts_weights_scales_and_kept_entries():
  bits = 4
  expected = (bits * 24 + 32 * 4) + (bits * 90 + 32 * 5) + 32 * 4 + 32 * 4
  assert lp.memory_bits(PARAMS, bits=bits) == expected
  assert lp.memory_bits(PARAMS, bits=None) == 32 * (24 + 4 + 90 + 4)


def test_ambiguity_is_mean_member_nll_minus_ensemble_nll():
  logits = R.normal(size=(3, 20, 4)).astype(np.float32)
  y = R.integers(0, 4, size=20)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  nll = lambda q: -np.mean(np.log(q[np.arange(20), y]))
  ref = np.mean([nll(q) for q in p]) - nll(p.mean(0))
  assert lp.ambiguity(logits, y) == pytest.approx(ref, rel=1e-4)
  assert ref > 0
  assert lp.ambiguity(np.stack([logits[0]] * 3), y) == pytest.approx(0.0, abs=1e-6)


def test_bad_input_is_named():
  for bits in (2, 9, 3.5, True):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[3, 8\]"):
      lp.rtn(PARAMS, bits=bits)
  with pytest.raises(ValueError, match="bits must be"):
    lp.members(jax.random.key(0), PARAMS, num_members=2, bits=1)
  nan = {**PARAMS, "conv": {"kernel": PARAMS["conv"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)}}
  with pytest.raises(ValueError, match="non-finite values at 'conv/kernel'"):
    lp.bsr(jax.random.key(0), nan, bits=4)
  with pytest.raises(ValueError, match="params is empty"):
    lp.rtn({}, bits=4)
  with pytest.raises(ValueError, match="num_members must be an integer >= 1"):
    lp.members(jax.random.key(0), PARAMS, num_members=0, bits=4)
  with pytest.raises(ValueError, match="not a regex"):
    lp.rtn(PARAMS, bits=4, keep=("(",))


def test_low_precision_runlocal(tmp_path):
  from configs import low_precision as lp_config
  from experiments import main
  out = main.run_experiment(lp_config.get_config("runlocal"), str(tmp_path))
  assert (tmp_path / "low_precision.png").exists()
  rows = out["rows"]
  fp32 = rows[0]
  assert fp32["method"] == "FP32" and fp32["memory_bits"] > max(r["memory_bits"] for r in rows[1:])
  for r in rows:
    assert r["ambiguity"] >= -1e-6  # Jensen: the ensemble's NLL is at most the members' mean
  at8 = {r["method"]: r for r in rows if r["bits"] == 8 and r["members"] == 1}
  assert abs(at8["RTN"]["accuracy"] - fp32["accuracy"]) < 0.03  # 8 bits: nearly lossless


def test_low_precision_config_errors_are_named_before_any_work(tmp_path):
  from configs import low_precision as lp_config
  from experiments import main
  c = lp_config.get_config("runlocal")
  with c.unlocked():
    c.lpe.bits = (3, 12)
  with pytest.raises(ValueError, match=r"bits must be an integer in \[3, 8\], got 12"):
    main.run_experiment(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
