"""Model merging: each method against a NumPy re-derivation of its formula, invariants,
DARE's dropout statistics, and every validation error."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import merging, models
from ensembling import tree as tree_lib

SHAPES = {"enc": {"kernel": (5, 4), "bias": (4,)}, "head": {"kernel": (4, 3)}, "s": (2, 3, 2)}


def _tree(rng, scale=1.0, shapes=SHAPES):
  if isinstance(shapes, dict):
    return {k: _tree(rng, scale, v) for k, v in shapes.items()}
  return scale * rng.normal(size=shapes).astype(np.float32)


def _setup(k=3, seed=0, common=0.0):
  """base and k fine-tuned models (base + delta_i; delta_i = common part + noise)."""
  rng = np.random.default_rng(seed)
  base = _tree(rng)
  shared = _tree(rng)
  mods = [jax.tree.map(lambda b, s: b + 0.1 * (common * s + rng.normal(size=b.shape)),
                       base, shared) for _ in range(k)]
  mods = [jax.tree.map(lambda x: x.astype(np.float32), m) for m in mods]
  to_j = lambda t: jax.tree.map(jnp.asarray, t)
  return to_j(base), [to_j(m) for m in mods]


def _np(t):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), t)


def _leafwise(fn, base, mods):
  """Applies fn(base_leaf, [model leaves]) -> leaf over the leaves, in float64."""
  return jax.tree.map(lambda b, *ts: fn(b, list(ts)), _np(base), *[_np(m) for m in mods])


def _close(actual, expected, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_close(jax.tree.map(lambda x: np.asarray(x, np.float64), actual),
                              expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- references

def _disjoint_mean(deltas):
  """TIES steps 2-3 with explicit loops over entries: elected sign (sum >= 0 -> +),
  mean of the non-zero entries with that sign (0 where none agrees)."""
  shape = deltas[0].shape
  flat = [d.ravel() for d in deltas]
  out = np.zeros(flat[0].size)
  for e in range(out.size):
    total = sum(f[e] for f in flat)
    sign = 1.0 if total >= 0 else -1.0
    agree = [f[e] for f in flat if f[e] != 0 and np.sign(f[e]) == sign]
    out[e] = sum(agree) / len(agree) if agree else 0.0
  return out.reshape(shape)


def _top_k_mask(v, k):
  """1 at the k entries of largest |v| (explicit argsort), 0 elsewhere."""
  mask = np.zeros(v.size)
  mask[np.argsort(-np.abs(v.ravel()), kind="stable")[:k]] = 1
  return mask.reshape(v.shape)


def _ties_paper(base, mods, density, scale):
  """TIES as in the paper: trim over the whole flattened task vector of each model."""
  b_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(base)]
  deltas = []
  for m in mods:
    flat = np.concatenate([(np.asarray(t, np.float64) - b).ravel()
                           for t, b in zip(jax.tree.leaves(m), b_leaves)])
    k = max(1, math.floor(density * flat.size + 1e-6))
    deltas.append(flat * _top_k_mask(flat, k))
  merged = _disjoint_mean(deltas)
  b_flat = np.concatenate([b.ravel() for b in b_leaves])
  res, out, pos = b_flat + scale * merged, [], 0
  for b in b_leaves:
    out.append(res[pos:pos + b.size].reshape(b.shape))
    pos += b.size
  return jax.tree.unflatten(jax.tree.structure(base), out)


def _ties_mergekit(base, mods, density):
  """mergekit's "ties" re-derived: per tensor magnitude(k = int(density * numel)),
  consensus "sum" (majority = +1 where the sum >= 0, mask = sign == majority),
  weights 1 and normalize: sum(delta * mask) / sum(mask) (divisor 0 -> 1)."""
  def one(b, ts):
    deltas = []
    for t in ts:
      d = t - b
      k = int(density * d.size)
      assert k > 0
      deltas.append(d * _top_k_mask(d, k))
    dl = np.stack(deltas)
    majority = (dl.sum(0) >= 0) * 2.0 - 1.0
    mask = np.sign(dl) == majority
    divisor = mask.sum(0).astype(np.float64)
    divisor[divisor == 0] = 1
    return b + (dl * mask).sum(0) / divisor
  return _leafwise(one, base, mods)


# --------------------------------------------------------------------------- task arithmetic

def test_task_arithmetic_matches_formula_and_mergekit():
  base, mods = _setup(k=3)
  got = merging.task_arithmetic(base, mods, scale=0.4)

  def paper(b, ts):
    acc = np.zeros_like(b)
    for t in ts:
      acc += t - b
    return b + 0.4 * acc
  _close(got, _leafwise(paper, base, mods))

  def mergekit(b, ts):  # GTA without sparsification/consensus, weight_i = scale, no normalize
    weights = [0.4] * len(ts)
    return b + sum(w * (t - b) for w, t in zip(weights, ts))
  _close(got, _leafwise(mergekit, base, mods))
  # a stacked tree gives the same result as the list
  _close(merging.task_arithmetic(base, tree_lib.stack(mods), scale=0.4), _np(got))


def test_task_arithmetic_keeps_dtype_and_structure():
  base = {"a": jnp.zeros((3,), jnp.bfloat16), "b": [jnp.zeros((2,), jnp.float32)]}
  mods = [{"a": jnp.full((3,), 2.0, jnp.bfloat16), "b": [jnp.ones((2,), jnp.float32)]}]
  got = merging.task_arithmetic(base, mods, scale=0.5)
  assert jax.tree.structure(got) == jax.tree.structure(base)
  assert got["a"].dtype == jnp.bfloat16 and got["b"][0].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got["a"], np.float32), [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(got["b"][0], [0.5, 0.5])


# --------------------------------------------------------------------------- TIES

@pytest.mark.parametrize("density", [0.3, 0.55, 1.0])
def test_ties_per_leaf_matches_mergekit(density):
  base, mods = _setup(k=4, seed=1, common=0.5)
  _close(merging.ties(base, mods, density=density), _ties_mergekit(base, mods, density))
  # scale multiplies the merged task vector
  ref = _ties_mergekit(base, mods, density)
  scaled = jax.tree.map(lambda r, b: b + 0.7 * (r - b), ref, _np(base))
  _close(merging.ties(base, mods, density=density, scale=0.7), scaled)


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_global_trim_matches_the_paper(density):
  base, mods = _setup(k=3, seed=2, common=0.3)
  got = merging.ties(base, mods, density=density, scale=0.9, trim="global")
  _close(got, _ties_paper(base, mods, density, 0.9))
  # a global trim keeps exactly k entries of each task vector overall, not per leaf
  per_leaf = merging.ties(base, mods, density=density, scale=0.9, trim="leaf")
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(got),
                                                    jax.tree.leaves(per_leaf)))


def test_ties_entries_without_agreement_stay_at_base():
  base = {"w": jnp.zeros(4)}
  mods = [{"w": jnp.array([2.0, -3.0, 0.1, 1.0])}, {"w": jnp.array([-1.0, 1.0, 0.2, 2.0])}]
  got = merging.ties(base, mods, density=0.5)
  # density 0.5 keeps 2 of 4: model 0 keeps [2, -3, 0, 0]; model 1 keeps [-1, 1, 0, 2]
  # (its entries 0 and 1 tie at the threshold |1|: both kept). Sums [1, -2, 0, 2] elect
  # +, -, + (a zero sum elects +), +. Entry 0: mean of {2} = 2; entry 1: {-3}; entry 2:
  # no non-zero entry agrees, so it stays at base; entry 3: {2}.
  np.testing.assert_allclose(got["w"], [2.0, -3.0, 0.0, 2.0])


def test_ties_density_one_with_agreeing_signs_is_task_arithmetic_over_k():
  rng = np.random.default_rng(3)
  base = _tree(rng)
  signs = jax.tree.map(lambda b: np.where(rng.random(b.shape) < 0.5, -1.0, 1.0), base)
  mods = [jax.tree.map(lambda b, s: (b + s * (0.05 + rng.random(b.shape))).astype(np.float32),
                       base, signs) for _ in range(3)]
  _close(merging.ties(base, mods, density=1.0),
         _np(merging.task_arithmetic(base, mods, scale=1 / 3)))


def test_kth_largest_radix_select_is_exact_with_duplicates_and_zeros():
  rng = np.random.default_rng(4)
  a = np.abs(rng.normal(size=1000)).astype(np.float32)
  a[:100] = 0.0
  a[100:300] = a[300]  # a block of duplicates
  b = np.abs(rng.normal(size=(7, 11)) * 1e-30).astype(np.float32)  # tiny values
  for k in [1, 2, 150, 500, 777, 1000]:
    chunks = lambda: iter([[a[:400], b], [a[400:], b[:0]]])  # two chunks per stream
    kb = min(k, b.size)
    got = merging._kth_largest(chunks, np.array([k, kb]))
    assert got[0] == np.sort(a)[::-1][k - 1]
    assert got[1] == np.sort(b.ravel())[::-1][kb - 1]


# --------------------------------------------------------------------------- DARE

def _dare_reference(key, base, mods, density, rescale, sign_election, scale):
  b_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(base)]
  out = []
  for j, b in enumerate(b_leaves):
    deltas = []
    for i, m in enumerate(mods):
      mask = np.asarray(jax.random.bernoulli(merging.dare_key(key, i, j), density, b.shape))
      d = (np.asarray(jax.tree.leaves(m)[j], np.float64) - b) * mask
      deltas.append(d / density if rescale else d)
    if sign_election:
      out.append(b + scale * _disjoint_mean(deltas))
    else:
      out.append(b + scale * sum(deltas))
  return jax.tree.unflatten(jax.tree.structure(base), out)


@pytest.mark.parametrize("rescale,sign_election", [(True, False), (False, False),
                                                   (True, True)])
def test_dare_matches_formula(rescale, sign_election):
  base, mods = _setup(k=3, seed=5, common=0.4)
  key = jax.random.key(11)
  got = merging.dare(key, base, mods, density=0.4, rescale=rescale,
                     sign_election=sign_election, scale=0.8)
  _close(got, _dare_reference(key, base, mods, 0.4, rescale, sign_election, 0.8))


def test_dare_density_one_is_task_arithmetic_and_ties():
  base, mods = _setup(k=3, seed=6)
  _close(merging.dare(0, base, mods, density=1.0, scale=0.3),
         _np(merging.task_arithmetic(base, mods, scale=0.3)))
  _close(merging.dare(0, base, mods, density=1.0, sign_election=True),
         _np(merging.ties(base, mods, density=1.0)))


def test_dare_keep_rate_and_mean_preservation():
  n, p = 40_000, 0.3
  base = {"w": jnp.zeros((n,))}
  mods = [{"w": jnp.full((n,), 2.0)}, {"w": jnp.full((n,), 2.0)}]
  key = jax.random.key(7)
  # one model: the output is 2 * mask / p entry by entry
  one = np.asarray(merging.dare(key, base, mods[:1], density=p)["w"])
  kept = one != 0
  np.testing.assert_allclose(one[kept], 2.0 / p, rtol=1e-6)  # rescaled by exactly 1/p
  sd = math.sqrt(p * (1 - p) / n)  # binomial std of the keep rate
  assert abs(kept.mean() - p) < 4 * sd
  # mean preservation: E[out] = 2; the std of the mean of n entries is 2 sqrt((1-p)/(p n))
  assert abs(one.mean() - 2.0) < 4 * 2.0 * math.sqrt((1 - p) / (p * n))
  # without rescale the kept entries are the raw delta
  raw = np.asarray(merging.dare(key, base, mods[:1], density=p, rescale=False)["w"])
  np.testing.assert_array_equal(raw, np.where(kept, 2.0, 0.0))
  # two models draw independent masks: both kept at rate p^2
  two = np.asarray(merging.dare(key, base, mods, density=p)["w"])
  both = np.isclose(two, 4.0 / p)
  assert abs(both.mean() - p * p) < 4 * math.sqrt(p * p * (1 - p * p) / n)
  # the same key gives the same masks; an int seed works too
  np.testing.assert_array_equal(np.asarray(merging.dare(key, base, mods[:1], density=p)["w"]),
                                one)
  np.testing.assert_array_equal(merging.dare(3, base, mods[:1], density=p)["w"],
                                merging.dare(jax.random.key(3), base, mods[:1], density=p)["w"])


# --------------------------------------------------------------------------- Model Stock

def _stock_reference(b, ts):
  n = len(ts)
  deltas = [(t - b).ravel() for t in ts]
  cosines = []
  for i in range(n):
    for j in range(i + 1, n):
      ni, nj = np.linalg.norm(deltas[i]), np.linalg.norm(deltas[j])
      if ni > 0 and nj > 0:
        cosines.append(float(deltas[i] @ deltas[j]) / (ni * nj))
  if cosines:
    cos = min(1.0, max(0.0, sum(cosines) / len(cosines)))
    t = n * cos / (1 + (n - 1) * cos)
  else:
    t = 1.0
  return t * (sum(ts) / n) + (1 - t) * b


def test_model_stock_matches_formula():
  base, mods = _setup(k=4, seed=8, common=1.0)  # correlated deltas: 0 < cos < 1
  got, ratios = merging.model_stock(base, mods, return_ratios=True)
  _close(got, _leafwise(_stock_reference, base, mods))
  assert set(ratios) == {n for n, _ in tree_lib.named_leaves(base)}
  assert all(0 < t < 1 for t in ratios.values())
  # two models: t = 2 cos / (1 + cos) with cos their cosine
  b = np.asarray(base["s"], np.float64).ravel()
  d0, d1 = (np.asarray(m["s"], np.float64).ravel() - b for m in mods[:2])
  cos = d0 @ d1 / (np.linalg.norm(d0) * np.linalg.norm(d1))
  _, r2 = merging.model_stock(base, mods[:2], return_ratios=True)
  assert r2["s"] == pytest.approx(2 * cos / (1 + cos), rel=1e-5)


def test_model_stock_zero_and_opposite_deltas():
  base = {"zero": jnp.ones(3), "one_moved": jnp.zeros(2), "opposite": jnp.zeros(2),
          "partly": jnp.zeros(2)}
  mods = [{"zero": jnp.ones(3), "one_moved": jnp.array([1.0, 2.0]),
           "opposite": jnp.array([1.0, 1.0]), "partly": jnp.array([1.0, 0.0])},
          {"zero": jnp.ones(3), "one_moved": jnp.zeros(2),
           "opposite": jnp.array([-1.0, -1.0]), "partly": jnp.array([1.0, 1.0])},
          {"zero": jnp.ones(3), "one_moved": jnp.zeros(2),
           "opposite": jnp.array([-1.0, -1.0]), "partly": jnp.zeros(2)}]
  got, ratios = merging.model_stock(base, mods, return_ratios=True)
  # every delta zero: no angle, t = 1, and the average is the base
  np.testing.assert_array_equal(got["zero"], np.ones(3))
  assert ratios["zero"] == 1.0
  # only one delta non-zero: no pair with an angle, t = 1: the plain average
  assert ratios["one_moved"] == 1.0
  np.testing.assert_allclose(got["one_moved"], [1 / 3, 2 / 3], rtol=1e-6)
  # pairwise cosines -1, -1, 1: mean -1/3 < 0, clipped to 0: t = 0, the base
  assert ratios["opposite"] == 0.0
  np.testing.assert_array_equal(got["opposite"], np.zeros(2))
  # model 2's zero delta leaves the mean over the one defined pair (cos 45 deg)
  c = 1 / math.sqrt(2)
  assert ratios["partly"] == pytest.approx(3 * c / (1 + 2 * c))
  _close(got, _leafwise(_stock_reference, base, mods))
  with pytest.raises(ValueError, match="at least 2"):
    merging.model_stock(base, mods[:1])


# --------------------------------------------------------------------------- Fisher

def test_fisher_merge_matches_formula():
  rng = np.random.default_rng(9)
  _, mods = _setup(k=3, seed=9)
  fishers = [jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) ** 2, jnp.float32), m)
             for m in mods]
  got = merging.fisher_merge(mods, fishers, eps=1e-8)

  def ref(ts, fs):
    out = np.zeros(ts[0].shape)
    for idx in np.ndindex(out.shape):
      num = sum(max(f[idx], 1e-8) * t[idx] for t, f in zip(ts, fs))
      den = sum(max(f[idx], 1e-8) for f in fs)
      out[idx] = num / den
    return out
  expected = jax.tree.map(lambda *xs: ref(xs[:3], xs[3:]), *[_np(m) for m in mods],
                          *[_np(f) for f in fishers])
  _close(got, expected)
  # equal Fishers: the plain average; all-zero Fishers: the plain average too (eps floor)
  avg = _np(merging.task_arithmetic(jax.tree.map(jnp.zeros_like, mods[0]), mods, scale=1 / 3))
  ones = [jax.tree.map(jnp.ones_like, m) for m in mods]
  zeros = [jax.tree.map(jnp.zeros_like, m) for m in mods]
  _close(merging.fisher_merge(mods, ones), avg)
  _close(merging.fisher_merge(mods, zeros), avg)
  _close(merging.fisher_merge(tree_lib.stack(mods), tree_lib.stack(fishers)), _np(got))


def _softmax_regression(seed=10, d=3, c=4, n=9):
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(d, c)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(c,)), jnp.float32)}
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.integers(0, c, size=(n,))

  def log_likelihood(p, xb, yb):
    logp = jax.nn.log_softmax(xb @ p["w"] + p["b"])
    return jnp.take_along_axis(logp, yb[:, None].astype(jnp.int32), axis=1)[:, 0]
  return params, x, y, log_likelihood


def _analytic_sq_grads(params, x, label):
  """(d/dW, d/db) log softmax(xW + b)[label] = (x (e_y - p)^T, e_y - p), squared."""
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  z = x.astype(np.float64) @ w + b
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  e = np.eye(len(b))[label]
  return np.outer(x, e - p) ** 2, (e - p) ** 2, p


def test_diagonal_fisher_true_expected_and_sampled_labels():
  params, x, y, ll = _softmax_regression()
  batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # unequal batches: the mean is per example
  n = len(x)
  # empirical Fisher (true labels)
  fw, fb = np.zeros((3, 4)), np.zeros(4)
  for xi, yi in zip(x, y):
    gw, gb, _ = _analytic_sq_grads(params, xi, yi)
    fw += gw / n
    fb += gb / n
  _close(merging.diagonal_fisher(ll, params, batches, labels="true"), {"w": fw, "b": fb})
  # expected over the model's predictive distribution
  ew, eb = np.zeros((3, 4)), np.zeros(4)
  for xi in x:
    _, _, p = _analytic_sq_grads(params, xi, 0)
    for c in range(4):
      gw, gb, _ = _analytic_sq_grads(params, xi, c)
      ew += p[c] * gw / n
      eb += p[c] * gb / n
  _close(merging.diagonal_fisher(ll, params, batches, labels="expected", num_classes=4),
         {"w": ew, "b": eb}, rtol=1e-5, atol=1e-6)
  # sampled: labels drawn as documented, then the empirical formula with those labels
  key = jax.random.key(5)
  sw, sb = np.zeros((3, 4)), np.zeros(4)
  for bi, (xb, _) in enumerate(batches):
    logp = jax.nn.log_softmax(xb @ params["w"] + params["b"])
    ys = np.asarray(jax.random.categorical(jax.random.fold_in(key, bi), logp, axis=-1))
    for xi, yi in zip(xb, ys):
      gw, gb, _ = _analytic_sq_grads(params, xi, yi)
      sw += gw / n
      sb += gb / n
  _close(merging.diagonal_fisher(ll, params, batches, labels="sampled", key=key,
                                 num_classes=4), {"w": sw, "b": sb})
  with pytest.raises(ValueError, match="num_classes"):
    merging.diagonal_fisher(ll, params, batches, labels="expected")
  with pytest.raises(ValueError, match="key"):
    merging.diagonal_fisher(ll, params, batches, labels="sampled", num_classes=4)
  with pytest.raises(ValueError, match="Unknown labels"):
    merging.diagonal_fisher(ll, params, batches, labels="model")


# --------------------------------------------------------------------------- RegMean

def _regmean_setup(seed=12, k=3):
  rng = np.random.default_rng(seed)
  mods = [{"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
           "conv": {"kernel": jnp.asarray(rng.normal(size=(2, 2, 3)), jnp.float32)}}
          for _ in range(k)]
  xs = [rng.normal(size=(20, 4)) for _ in range(k)]
  ps = [rng.normal(size=(20, 4)) for _ in range(k)]  # "im2col patches" of the conv
  grams = [{"dense/kernel": x.T @ x, "conv/kernel": p.T @ p} for x, p in zip(xs, ps)]
  return mods, grams, xs


def test_regmean_matches_formula():
  mods, grams, xs = _regmean_setup()
  for alpha in (1.0, 0.6):
    got = merging.regmean(mods, grams, alpha=alpha)

    def solve(name, shape):
      s, r = np.zeros((4, 4)), np.zeros((4, shape[-1]))
      for m, g in zip(mods, grams):
        gi = np.array(g[name], np.float64)
        for a in range(4):  # off-diagonal entries times alpha
          for b in range(4):
            if a != b:
              gi[a, b] *= alpha
        kernel = dict(tree_lib.named_leaves(m))[name]
        s += gi
        r += gi @ np.asarray(kernel, np.float64).reshape(4, -1)
      return (np.linalg.inv(s) @ r).reshape(shape)
    expected = {"dense": {"kernel": solve("dense/kernel", (4, 3)),
                          "bias": np.mean([np.asarray(m["dense"]["bias"]) for m in mods], 0)},
                "conv": {"kernel": solve("conv/kernel", (2, 2, 3))}}
    _close(got, expected, rtol=1e-4, atol=1e-5)
  # alpha = 1 is the least-squares optimum of sum_i |X_i W - X_i W_i|^2: zero gradient
  w = np.asarray(merging.regmean(mods, grams)["dense"]["kernel"], np.float64)
  grad = sum(x.T @ (x @ w - x @ np.asarray(m["dense"]["kernel"], np.float64))
             for x, m in zip(xs, mods))
  np.testing.assert_allclose(grad, 0, atol=1e-3)


def test_regmean_special_cases():
  mods, grams, _ = _regmean_setup(seed=13)
  avg = _np(merging.task_arithmetic(jax.tree.map(jnp.zeros_like, mods[0]), mods, scale=1 / 3))
  # identical Grams cancel: the plain average
  same = [dict(grams[0]) for _ in mods]
  _close(merging.regmean(mods, same), avg, rtol=1e-4, atol=1e-5)
  # no Grams at all: the plain average
  _close(merging.regmean(mods, [{} for _ in mods]), avg)
  # an input unit never active (zero row/column in every Gram) takes the average row
  dead = []
  for g in grams:
    gd = {k: np.array(v) for k, v in g.items()}
    gd["dense/kernel"][2, :] = 0
    gd["dense/kernel"][:, 2] = 0
    dead.append(gd)
  got = np.asarray(merging.regmean(mods, dead)["dense"]["kernel"])
  np.testing.assert_allclose(got[2], avg["dense"]["kernel"][2], rtol=1e-6)
  keep = [0, 1, 3]
  s = sum(np.asarray(g["dense/kernel"])[np.ix_(keep, keep)] for g in dead)
  r = sum(np.asarray(g["dense/kernel"])[np.ix_(keep, keep)] @
          np.asarray(m["dense"]["kernel"], np.float64)[keep] for g, m in zip(dead, mods))
  np.testing.assert_allclose(got[keep], np.linalg.solve(s, r), rtol=1e-4, atol=1e-5)


def test_gram_matrices_of_an_mlp_with_dense_inputs():
  model = models.MLP(widths=(6, 5), num_classes=3)
  rng = np.random.default_rng(14)
  x = rng.normal(size=(10, 2, 2)).astype(np.float32)
  v = model.init(jax.random.key(0), x)
  grams = merging.gram_matrices(merging.dense_inputs(model), v, [x[:4], (x[4:], None)])
  p = _np(v["params"])
  h0 = x.reshape(10, -1).astype(np.float64)
  h1 = np.maximum(h0 @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0)
  h2 = np.maximum(h1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
  assert sorted(grams) == ["params/Dense_0/kernel", "params/Dense_1/kernel",
                           "params/head/kernel"]
  for name, h in [("Dense_0", h0), ("Dense_1", h1), ("head", h2)]:
    np.testing.assert_allclose(grams[f"params/{name}/kernel"], h.T @ h, rtol=1e-4, atol=1e-4)
  # bare params: keys without the collection prefix
  bare = merging.gram_matrices(merging.dense_inputs(model), v["params"], [x])
  np.testing.assert_allclose(bare["Dense_1/kernel"], h1.T @ h1, rtol=1e-4, atol=1e-4)
  # and they plug into regmean: models with identical data merge to their average
  other = jax.tree.map(lambda a: a + 0.1, v)
  g2 = merging.gram_matrices(merging.dense_inputs(model), other, [x])
  merged = merging.regmean([v, other], [grams, g2])
  assert jax.tree.structure(merged) == jax.tree.structure(v)


# --------------------------------------------------------------------------- invariants

def test_merging_identical_models_gives_that_model():
  base, mods = _setup(k=1, seed=15)
  same = [mods[0]] * 3
  ref = _np(mods[0])
  _close(merging.task_arithmetic(base, same, scale=1 / 3), ref)
  _close(merging.ties(base, same, density=1.0), ref)
  _close(merging.ties(base, same, density=1.0, trim="global"), ref)
  _close(merging.dare(0, base, same, density=1.0, scale=1 / 3), ref)
  _close(merging.dare(0, base, same, density=1.0, sign_election=True), ref)
  _close(merging.model_stock(base, same), ref)
  fishers = [jax.tree.map(lambda x: jnp.abs(x) + 0.1, m) for m in same]
  _close(merging.fisher_merge(same, fishers), ref)
  g = {"enc/kernel": np.eye(5) + 0.1, "head/kernel": np.eye(4)}
  _close(merging.regmean(same, [g] * 3), ref, rtol=1e-4, atol=1e-5)
  # TIES below density 1 is the base plus the trimmed task vector, not the model:
  # with identical models every kept entry agrees, so the result is that trimmed vector
  got = merging.ties(base, same, density=0.5)
  expected = jax.tree.map(lambda b, t: b + (t - b) * _top_k_mask(t - b, int(0.5 * b.size)),
                          _np(base), ref)
  _close(got, expected)


# --------------------------------------------------------------------------- errors

def test_validation_errors():
  base, mods = _setup(k=2, seed=16)
  with pytest.raises(ValueError, match="empty list"):
    merging.task_arithmetic(base, [], scale=1.0)
  missing = {"enc": base["enc"], "head": base["head"]}
  with pytest.raises(ValueError, match="base.*extra in 1: \\['s'\\]"):
    merging.task_arithmetic(missing, mods, scale=1.0)
  with pytest.raises(ValueError, match="models 0 and 1 have different tree structures"):
    merging.ties(base, [mods[0], missing], density=0.5)
  bad_shape = dict(base, s=jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="'s': \\(2, 3\\) vs \\(2, 3, 2\\)"):
    merging.dare(0, bad_shape, mods, density=0.5)
  # a single model passed instead of a list is read as a stacked tree
  with pytest.raises(ValueError, match="stacked tree"):
    merging.task_arithmetic(base, mods[0], scale=1.0)
  nan = jax.tree.map(lambda x: x, mods[1])
  nan["head"]["kernel"] = nan["head"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="model 1 has NaN or inf values at 'head/kernel'"):
    merging.model_stock(base, [mods[0], nan])
  inf_base = dict(base, s=base["s"].at[0, 0, 0].set(jnp.inf))
  with pytest.raises(ValueError, match="base has NaN or inf values at 's'"):
    merging.task_arithmetic(inf_base, mods, scale=1.0)
  with pytest.raises(ValueError, match="model 1 has NaN"):
    merging.fisher_merge([mods[0], nan], mods)
  for density in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
      merging.ties(base, mods, density=density)
    with pytest.raises(ValueError, match="density must be in \\(0, 1\\]"):
      merging.dare(0, base, mods, density=density)
  with pytest.raises(ValueError, match="Unknown trim"):
    merging.ties(base, mods, density=0.5, trim="layer")
  ints = dict(base, s=jnp.zeros((2, 3, 2), jnp.int32))
  with pytest.raises(ValueError, match="floating point leaves; 's' of base"):
    merging.task_arithmetic(ints, [ints], scale=1.0)
  # Fishers
  with pytest.raises(ValueError, match="Got 1 Fishers for 2 models"):
    merging.fisher_merge(mods, mods[:1])
  neg = jax.tree.map(lambda x: -jnp.abs(x), mods[1])
  with pytest.raises(ValueError, match="fisher 1 has negative values at 'enc/bias'"):
    merging.fisher_merge(mods, [jax.tree.map(jnp.abs, mods[0]), neg])
  with pytest.raises(ValueError, match="fishers"):
    merging.fisher_merge(mods, [missing, missing])
  # Grams
  g = {"enc/kernel": np.eye(5)}
  with pytest.raises(ValueError, match="Got 1 Gram dicts for 2 models"):
    merging.regmean(mods, [g])
  with pytest.raises(ValueError, match="Gram of model 1 for 'enc/kernel' has shape \\(4, 4\\)"):
    merging.regmean(mods, [g, {"enc/kernel": np.eye(4)}])
  with pytest.raises(ValueError, match="not a leaf"):
    merging.regmean(mods, [{"enc/kernels": np.eye(5)}] * 2)
  with pytest.raises(ValueError, match="different keys"):
    merging.regmean(mods, [g, {}])
  with pytest.raises(ValueError, match="needs a kernel"):
    merging.regmean(mods, [{"enc/bias": np.eye(4)}] * 2)
  with pytest.raises(ValueError, match="model 0 for 'enc/kernel' has NaN"):
    merging.regmean(mods, [{"enc/kernel": np.full((5, 5), np.nan)}, g])


def test_classifier_log_likelihood_of_an_mlp():
  model = models.MLP(widths=(6,), num_classes=4)
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  y = np.array([0, 3, 1, 2, 3])
  p = model.init(jax.random.key(0), x)["params"]
  h = np.maximum(x @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(p["Dense_0"]["bias"]), 0)
  logits = (h @ np.asarray(p["head"]["kernel"]) + np.asarray(p["head"]["bias"])).astype(np.float64)
  ref = logits[np.arange(5), y] - np.log(np.exp(logits).sum(1))
  np.testing.assert_allclose(merging.classifier_log_likelihood(model)(p, x, y), ref,
                             rtol=1e-5, atol=1e-5)
