"""Soups against brute-force NumPy references on small linear classifiers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import soups
from ensembling import tree as tree_lib


def _problem(seed, k=7, n=80, d=5, c=3):
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=(d, c))
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = np.argmax(x @ w_true + 0.5 * rng.normal(size=(n, c)), -1)
  scales = rng.uniform(0.2, 2.5, size=k)
  ings = [{"w": (w_true + s * rng.normal(size=(d, c))).astype(np.float32),
           "b": (0.3 * s * rng.normal(size=(c,))).astype(np.float32)} for s in scales]
  return x, y, ings


def _np_acc(p, x, y):
  return float(np.mean(np.argmax(x @ p["w"] + p["b"], -1) == y))


def _np_avg(ings, idx):
  return {n: np.mean([np.asarray(ings[i][n], np.float64) for i in idx], 0) for n in ("w", "b")}


def _jax_eval(x, y):
  return lambda p: jnp.mean(jnp.argmax(x @ p["w"] + p["b"], -1) == y)


def ref_greedy(ings, order, x, y):
  soup = [order[0]]
  best = _np_acc(_np_avg(ings, soup), x, y)
  for j in order[1:]:
    s = _np_acc(_np_avg(ings, soup + [j]), x, y)
    if s >= best:
      soup, best = soup + [j], s
  return soup, best


def ref_pruned(ings, order, passes, x, y):
  soup = list(range(len(ings)))
  base = _np_acc(_np_avg(ings, soup), x, y)
  for _ in range(passes):
    for i in order:
      if i not in soup or len(soup) == 1:
        continue
      rest = [c for c in soup if c != i]
      s = _np_acc(_np_avg(ings, rest), x, y)
      if s >= base:
        soup, base = rest, s
  return soup, base


def _sorted_order(ings, x, y, reverse=True):
  acc = [_np_acc(p, x, y) for p in ings]
  return sorted(range(len(ings)), key=lambda i: ((-acc[i] if reverse else acc[i]), i))


def test_identical_ingredients_give_that_ingredient():
  x, y, ings = _problem(0)
  same = [ings[2]] * 5
  ev = _jax_eval(x, y)
  for res in (soups.uniform_soup(same), soups.greedy_soup(same, ev),
              soups.pruned_soup(same, ev, passes=2),
              soups.learned_soup(same, lambda p, b, t: jnp.sum(p["w"] ** 2) * t, [0], steps=3)):
    chex.assert_trees_all_close(res.params, ings[2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(soups.uniform_soup(same).weights, np.full(5, 0.2))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_matches_reference(seed):
  x, y, ings = _problem(seed)
  ev = _jax_eval(x, y)
  order = _sorted_order(ings, x, y)
  res = soups.greedy_soup(ings, ev, order="sorted")
  soup, best = ref_greedy(ings, order, x, y)
  assert list(res.indices) == soup
  assert res.score == pytest.approx(best)
  assert res.info["order"] == order
  np.testing.assert_allclose(res.individual_scores, [_np_acc(p, x, y) for p in ings])
  chex.assert_trees_all_close(res.params, _np_avg(ings, soup), rtol=1e-5, atol=1e-6)
  # greedy (sorted) never scores below the best ingredient on the held-out data
  assert res.score >= max(res.individual_scores)
  # explicit and random orders
  given = [int(i) for i in np.random.default_rng(seed).permutation(len(ings))]
  assert list(soups.greedy_soup(ings, ev, order=given).indices) == ref_greedy(ings, given, x, y)[0]
  rnd = soups.greedy_soup(ings, ev, order="random", key=seed)
  assert sorted(rnd.info["order"]) == list(range(len(ings)))
  assert list(rnd.indices) == ref_greedy(ings, rnd.info["order"], x, y)[0]


@pytest.mark.parametrize("seed,passes", [(0, 1), (1, 1), (2, 3), (4, 3), (5, 2)])
def test_pruned_matches_reference(seed, passes):
  x, y, ings = _problem(seed, k=8)
  ev = _jax_eval(x, y)
  for name, reverse in (("sorted", True), ("ascending", False)):
    order = _sorted_order(ings, x, y, reverse=reverse)
    res = soups.pruned_soup(ings, ev, passes=passes, order=name)
    soup, base = ref_pruned(ings, order, passes, x, y)
    assert list(res.indices) == soup, name
    assert res.score == pytest.approx(base)
    assert res.info["passes_run"] <= passes
    np.testing.assert_allclose(res.weights[soup], 1.0 / len(soup), rtol=1e-6)
    assert res.weights.sum() == pytest.approx(1.0)
  given = [int(i) for i in np.random.default_rng(seed).permutation(len(ings))]
  res = soups.pruned_soup(ings, ev, passes=passes, order=given)
  assert list(res.indices) == ref_pruned(ings, given, passes, x, y)[0]


def test_batched_equals_sequential_evaluation():
  x, y, ings = _problem(7, k=9)
  ev = _jax_eval(x, y)
  for fn in (lambda **kw: soups.greedy_soup(ings, ev, **kw),
             lambda **kw: soups.pruned_soup(ings, ev, passes=3, order="ascending", **kw)):
    a, b = fn(evaluation="vmap"), fn(evaluation="loop")
    c = fn(evaluation="vmap", batch_size=2)
    d = fn(evaluation="python")
    assert a.indices == b.indices == c.indices == d.indices
    assert [h[2] for h in b.history] == [h[2] for h in d.history]
    assert [(h[0], h[2]) for h in a.history] == [(h[0], h[2]) for h in b.history]
    np.testing.assert_allclose([h[1] for h in a.history], [h[1] for h in b.history], rtol=1e-6)
    assert a.history == c.history
    assert a.info["eval_calls"] < b.info["eval_calls"]


def test_stacked_input_equals_list_input():
  x, y, ings = _problem(3)
  ev = _jax_eval(x, y)
  a = soups.greedy_soup(ings, ev)
  b = soups.greedy_soup(tree_lib.stack(ings), ev)
  assert a.indices == b.indices
  chex.assert_trees_all_close(a.params, b.params)
  chex.assert_trees_all_close(soups.uniform_soup(ings).params, _np_avg(ings, range(len(ings))),
                              rtol=1e-6, atol=1e-6)


def test_learned_soup_finds_one_hot_solution():
  # Logistic regression on separable data; ingredients W, -W, -2W and 0. Any mix is
  # (a0 - a1 - 2 a2) W, so the loss is lowest with all weight on ingredient 0.
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 3)).astype(np.float32)
  x = rng.normal(size=(256, 4)).astype(np.float32)
  y = np.argmax(x @ w, -1)
  ings = [{"w": w}, {"w": -w}, {"w": -2 * w}, {"w": np.zeros_like(w)}]

  def loss_fn(p, batch, temperature):
    logits = temperature * (batch[0] @ p["w"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(batch[1])), batch[1]])

  batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
  for per_layer in (False, True):
    res = soups.learned_soup(ings, loss_fn, batches, steps=300, learning_rate=0.1,
                             per_layer=per_layer)
    wts = np.atleast_2d(res.weights)
    assert np.all(wts[:, 0] > 0.95), wts
    assert res.info["losses"][-1] < res.info["losses"][0]
    assert res.info["temperature"] > 1.0
  fixed = soups.learned_soup(ings, loss_fn, batches, steps=20, learn_temperature=False)
  assert fixed.info["temperature"] == 1.0


def test_errors_and_nan_ingredients():
  x, y, ings = _problem(0, k=4)
  ev = _jax_eval(x, y)
  with pytest.raises(ValueError, match="empty"):
    soups.uniform_soup([])
  with pytest.raises(ValueError, match="shape"):
    soups.greedy_soup([ings[0], {"w": np.zeros((6, 3), np.float32), "b": ings[1]["b"]}], ev)
  with pytest.raises(ValueError, match="structure"):
    soups.uniform_soup([ings[0], {"w": ings[1]["w"]}])
  with pytest.raises(ValueError, match="order"):
    soups.greedy_soup(ings, ev, order="best")
  with pytest.raises(ValueError, match="key"):
    soups.greedy_soup(ings, ev, order="random")
  with pytest.raises(ValueError, match="distinct"):
    soups.greedy_soup(ings, ev, order=[0, 0, 1])
  bad = dict(ings[1], w=ings[1]["w"].copy())
  bad["w"][0, 0] = np.nan
  mixed = [ings[0], bad, ings[2], ings[3]]
  with pytest.warns(RuntimeWarning, match=r"\[1\]"):
    uni = soups.uniform_soup(mixed)
  assert uni.indices == (0, 2, 3) and uni.weights[1] == 0
  assert bool(tree_lib.all_finite(uni.params))
  chex.assert_trees_all_close(uni.params, _np_avg(ings, [0, 2, 3]), rtol=1e-5, atol=1e-6)
  with pytest.warns(RuntimeWarning):
    g = soups.greedy_soup(mixed, ev)
  assert 1 not in g.indices and np.isnan(g.individual_scores[1])
  keep = [0, 2, 3]
  sub = [ings[i] for i in keep]
  assert list(g.indices) == [keep[i] for i in ref_greedy(sub, _sorted_order(sub, x, y), x, y)[0]]
  with pytest.warns(RuntimeWarning):
    p = soups.pruned_soup(mixed, ev, passes=2)
  assert 1 not in p.indices and bool(tree_lib.all_finite(p.params))
  with pytest.raises(ValueError, match="NaN"):
    soups.uniform_soup([bad, bad])
