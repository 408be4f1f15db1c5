"""curves.py against its definitions: the Bezier / PolyChain formulas, the bend's gradient,
the barrier, bad input; and the runlocal smoke test of configs/curves.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import curves, members, metrics, models
from ensembling import tree as tree_lib


def _tree(seed):
  r = np.random.default_rng(seed)
  return {"a": {"w": jnp.asarray(r.normal(size=(3, 2)), jnp.float32)},
          "b": jnp.asarray(r.normal(size=(4,)), jnp.float32)}


S, M, E = _tree(0), _tree(1), _tree(2)


@pytest.mark.parametrize("t", [0.0, 0.2, 0.5, 0.7, 1.0])
def test_bezier_and_polychain_match_their_formulas(t):
  got_b, got_p = curves.bezier(t, S, M, E), curves.polychain(t, S, M, E)
  for path in (("a", "w"), ("b",)):
    s, m, e = (np.asarray(_get(x, path), np.float64) for x in (S, M, E))
    np.testing.assert_allclose(_get(got_b, path),
                               (1 - t) ** 2 * s + 2 * t * (1 - t) * m + t ** 2 * e, atol=1e-6)
    ref = s + 2 * t * (m - s) if t <= 0.5 else m + (2 * t - 1) * (e - m)
    np.testing.assert_allclose(_get(got_p, path), ref, atol=1e-6)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def test_curves_pass_through_their_points_and_the_midpoint_bend_is_the_line():
  for fn in (curves.bezier, curves.polychain):
    for t, ref in ((0.0, S), (1.0, E)):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), fn(t, S, M, E), ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               curves.polychain(0.5, S, M, E), M)
  mid = curves.midpoint(S, E)
  pts = curves.path_points("bezier", [0.0, 0.3, 0.9], S, mid, E)
  for i, t in enumerate((0.0, 0.3, 0.9)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 tree_lib.index(pts, i), tree_lib.interpolate(S, E, t))


def test_barrier_is_max_minus_mean_of_ends():
  assert curves.barrier([0.2, 0.9, 0.5, 0.4]) == pytest.approx(0.9 - 0.3)
  assert curves.barrier([0.9, 0.6, 0.95], higher_is_better=True) == pytest.approx(0.925 - 0.6)
  assert curves.barrier([0.3, 0.2, 0.1]) == pytest.approx(0.1)  # monotone: half the end gap
  with pytest.raises(ValueError, match="at least 2"):
    curves.barrier([1.0])


def test_bad_input_is_named():
  with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
    curves.bezier(1.5, S, M, E)
  with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
    curves.polychain(-0.1, S, M, E)
  with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
    curves.path_points("bezier", [0.0, float("nan")], S, M, E)
  with pytest.raises(ValueError, match="different tree structures"):
    curves.bezier(0.5, S, {"a": S["a"]}, E)
  with pytest.raises(ValueError, match="differ in shape"):
    curves.polychain(0.5, S, M, {**E, "b": jnp.ones(5)})
  with pytest.raises(ValueError, match="Unknown curve kind"):
    curves.path_points("spline", [0.5], S, M, E)


NET = models.MLP(widths=(8,), num_classes=3)
X = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 1).astype(np.int32)


def _ends():
  v = members.init_members(jax.random.key(0), NET, X[:1], 2)
  return tree_lib.unstack(dict(v))


def test_fit_curve_errors_before_any_work():
  a, b = _ends()
  kw = dict(tx=optax.sgd(0.1), num_steps=1, batch_size=8, seed=0, progress=False)
  bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), b)
  with pytest.raises(ValueError, match="end has non-finite values"):
    curves.fit_curve(NET, a, bad, X, Y, **kw)
  with pytest.raises(ValueError, match="Unknown curve kind"):
    curves.fit_curve(NET, a, b, X, Y, kind="line", **kw)
  with pytest.raises(ValueError, match="different tree structures"):
    curves.fit_curve(NET, a, {"params": {"head": a["params"]["head"]}}, X, Y, **kw)
  with pytest.raises(ValueError, match="num_steps"):
    curves.fit_curve(NET, a, b, X, Y, **{**kw, "num_steps": 0})


@pytest.mark.parametrize("kind", curves.KINDS)
def test_one_step_moves_only_the_bend_by_its_chain_rule_gradient(kind):
  # d L(phi(t)) / d bend = c(t) * grad L at phi(t): c = 2t(1-t) (Bezier), 2t or 2-2t (PolyChain).
  a, b = _ends()
  lr = 0.5
  res = curves.fit_curve(NET, a, b, X, Y, kind=kind, tx=optax.sgd(lr), num_steps=1,
                         batch_size=64, seed=3, progress=False)
  t = res.history[-1]["train_t"]
  c = 2 * t * (1 - t) if kind == "bezier" else (2 * t if t <= 0.5 else 2 - 2 * t)
  mid = curves.midpoint(a, b)
  theta = curves.CURVES[kind](t, a["params"], mid["params"], b["params"])
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      NET.apply({"params": p}, X).logits, Y).mean()
  grad = jax.grad(loss)(theta)
  expected = jax.tree.map(lambda m, g: m - lr * c * g, mid["params"], grad)
  jax.tree.map(lambda got, ref: np.testing.assert_allclose(got, ref, atol=1e-5),
               res.bend["params"], expected)


def test_evaluate_path_ends_are_the_end_models():
  a, b = _ends()
  ev = curves.evaluate_path(NET, a, curves.midpoint(a, b), b, X, Y, ts=[0.0, 0.5, 1.0])
  logits = members.predict(NET, tree_lib.stack([a, b]), X)
  for i, j in ((0, 0), (2, 1)):
    p = np.asarray(jax.nn.softmax(logits[j]))
    assert ev["loss"][i] == pytest.approx(metrics.nll(p, Y), rel=1e-5)
    assert ev["accuracy"][i] == pytest.approx(metrics.accuracy(p, Y))
  bn = models.MLP(widths=(4,), num_classes=3, batch_norm=True)
  v = tree_lib.unstack(dict(members.init_members(jax.random.key(1), bn, X[:1], 2)))
  with pytest.raises(ValueError, match="pass bn_x"):
    curves.evaluate_path(bn, v[0], v[0], v[1], X, Y, ts=[0.5])


def test_curves_runlocal(tmp_path):
  from configs import curves as curves_config
  from experiments import main
  out = main.run_experiment(curves_config.get_config("runlocal"), str(tmp_path))
  assert (tmp_path / "curves.png").exists() and (tmp_path / "bezier" / "metrics.jsonl").exists()
  rows = {r["path"]: r for r in out["rows"]}
  assert set(rows) == {"straight line", "straight line, weight-matched", "Bezier curve",
                       "PolyChain"}
  # Every path joins the same two networks; weight matching permutes units of the end
  # point without changing its function, so all paths agree at t = 0 and t = 1.
  for r in rows.values():
    assert r["end_accuracy"] == pytest.approx(rows["straight line"]["end_accuracy"])
    assert r["best_accuracy"] >= max(r["end_accuracy"]) and r["min_accuracy"] <= r["mid_accuracy"]


def test_curves_config_errors_are_named_before_any_work(tmp_path):
  from configs import curves as curves_config
  from experiments import main
  c = curves_config.get_config("runlocal")
  with c.unlocked():
    c.curve.kinds = ("bezier", "spline")
  with pytest.raises(ValueError, match="Unknown curve kind"):
    main.run_experiment(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
  with pytest.raises(ValueError, match="Unknown arch"):
    curves_config.get_config("arch=vit")
