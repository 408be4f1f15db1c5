"""ensembling.ame against its definition: NumPy references, the soup identities, bad input."""

import chex
import jax
import numpy as np
import optax
import pytest

from ensembling import ame, soups
from ensembling import tree as tree_lib


def _tree(rng, scale=1.0):
  return {"dense": {"kernel": (scale * rng.normal(size=(3, 4))).astype(np.float32),
                    "bias": (scale * rng.normal(size=(4,))).astype(np.float32)},
          "head": (scale * rng.normal(size=(2,))).astype(np.float32)}


@pytest.fixture
def setup():
  rng = np.random.default_rng(0)
  return _tree(rng), [_tree(rng) for _ in range(4)]


def _flat(t):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(np.float64)


def test_one_sgd_step_at_rate_one_is_the_soup_from_any_base(setup):
  base, experts = setup
  chex.assert_trees_all_close(ame.ame_merge(base, experts, tx=optax.sgd(1.0), steps=1),
                              soups.uniform_soup(experts).params, atol=1e-5)
  w = np.array([3.0, 1.0, 0.0, 4.0])  # weighted, from a far-away base, experts stacked
  weighted = tree_lib.weighted_sum(tree_lib.stack(experts), w / w.sum())
  far = jax.tree.map(lambda x: 100.0 * x, base)
  chex.assert_trees_all_close(ame.ame_merge(far, tree_lib.stack(experts), tx=optax.sgd(1.0),
                                            steps=1, weights=w), weighted, atol=1e-4)


def test_cyclic_pass_at_harmonic_rate_is_the_soup(setup):
  """The paper's reading: one online pass over the experts at rate 1/t gives their mean."""
  base, experts = setup
  tx = optax.sgd(lambda t: 1.0 / (t + 1.0))
  chex.assert_trees_all_close(
      ame.ame_merge(base, experts, tx=tx, steps=len(experts), pseudo_gradient="cyclic"),
      soups.uniform_soup(experts).params, atol=1e-5)


def test_adam_matches_a_numpy_loop_over_the_definition(setup):
  base, experts = setup
  w = np.array([0.1, 0.2, 0.3, 0.4])
  lr, b1, b2, eps, steps = 0.05, 0.9, 0.999, 1e-8, 7
  theta, m, v = _flat(base), 0.0, 0.0
  for t in range(1, steps + 1):
    g = sum(wi * (theta - _flat(e)) for wi, e in zip(w, experts))  # sum_i w_i (theta - theta_i)
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    theta = theta - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  out = ame.ame_merge(base, experts, tx=optax.adam(lr, b1=b1, b2=b2, eps=eps), steps=steps,
                      weights=w)
  np.testing.assert_allclose(_flat(out), theta, atol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_stays_on_the_base_soup_line(setup, nesterov):
  """Linear optimizers: theta_T = soup + c_T (base - soup), c_T from the 1-d problem, and a
  heavy-ball NumPy loop gives the same point."""
  base, experts = setup
  tx = optax.sgd(0.5, momentum=0.9, nesterov=nesterov)
  soup = _flat(soups.uniform_soup(experts).params)
  path = ame.ame_path(base, experts, tx=tx, steps=9)
  c = ame.line_coefficients(tx, steps=9)
  assert np.ptp(c) > 0.3 and c.min() < 0  # the steps move along the line and overshoot
  for t in (1, 4, 9):
    np.testing.assert_allclose(_flat(tree_lib.index(path, t - 1)),
                               soup + c[t - 1] * (_flat(base) - soup), atol=1e-5)
  theta, vel = _flat(base), 0.0
  for _ in range(9):
    g = theta - soup
    vel = g + 0.9 * vel
    theta = theta - 0.5 * ((g + 0.9 * vel) if nesterov else vel)
  np.testing.assert_allclose(_flat(tree_lib.index(path, 8)), theta, atol=1e-5)


def test_bad_input_is_named(setup):
  base, experts = setup
  sgd = optax.sgd(1.0)
  with pytest.raises(ValueError, match="at least one expert"):
    ame.ame_merge(base, [], tx=sgd, steps=1)
  with pytest.raises(ValueError, match="base and the experts do not match"):
    ame.ame_merge({"other": base["head"]}, experts, tx=sgd, steps=1)
  with pytest.raises(ValueError, match="differ in shape at 'head'"):
    ame.ame_merge(base, experts[:2] + [{**experts[2], "head": np.zeros(3, np.float32)}],
                  tx=sgd, steps=1)
  bad = jax.tree.map(lambda x: x.copy(), experts[2])
  bad["dense"]["bias"][1] = np.nan
  with pytest.raises(ValueError, match=r"expert\(s\) \[2\] of 4 contain NaN"):
    ame.ame_merge(base, experts[:2] + [bad, experts[3]], tx=sgd, steps=1)
  with pytest.raises(ValueError, match="base has NaN or inf values at 'head'"):
    ame.ame_merge({**base, "head": np.array([np.inf, 0], np.float32)}, experts, tx=sgd, steps=1)
  for steps in (0, 1.5, True):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
      ame.ame_merge(base, experts, tx=sgd, steps=steps)
  with pytest.raises(ValueError, match=r"weights must have shape \(4,\)"):
    ame.ame_merge(base, experts, tx=sgd, steps=1, weights=[1.0, 1.0])
  with pytest.raises(ValueError, match="weights must be finite, >= 0"):
    ame.ame_merge(base, experts, tx=sgd, steps=1, weights=[1.0, -1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="Unknown pseudo_gradient"):
    ame.ame_merge(base, experts, tx=sgd, steps=1, pseudo_gradient="mean")
  with pytest.raises(TypeError, match="optax.GradientTransformation"):
    ame.ame_merge(base, experts, tx=0.1, steps=1)
  with pytest.raises(ValueError, match="leading member axis"):
    ame.ame_merge(base, base, tx=sgd, steps=1)  # one model is not a stack of experts
  with pytest.raises(ValueError, match="Unknown AME optimizer"):
    ame.optimizer("rmsprop", learning_rate=0.1)


def test_fit_experts_trains_each_expert_on_its_own_shard():
  import flax.linen as nn
  from ensembling import members
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3)).astype(np.float32)
  y = np.repeat(np.arange(2), 32).astype(np.int32)  # shard k holds only class k
  model = nn.Dense(2)
  start = {"params": model.init(jax.random.key(0), x[:1])["params"]}
  res = ame.fit_experts(model, start, x, y, np.arange(64).reshape(2, 32), tx=optax.sgd(0.5),
                        num_steps=8, batch_size=8, seed=0, progress=False)
  preds = members.predict(model, res.state, x).argmax(-1)  # (2, 64)
  assert (preds[0] == 0).all() and (preds[1] == 1).all()
  for k in range(2):  # the experts started from the shared point
    assert not np.allclose(res.state["params"]["kernel"][k], start["params"]["kernel"])
