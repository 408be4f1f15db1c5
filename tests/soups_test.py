"""Soups against brute-force NumPy references on small linear classifiers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import members, optim, soups
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


# --------------------------------------------------------------------------- compare_soups

def _learned_inputs(x, y):
  def loss_fn(p, batch, t):
    logits = t * (batch["x"] @ p["w"] + p["b"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(batch["y"])), batch["y"]])
  return loss_fn, soups.held_out_batches(x, y, batch_size=40)


def test_compare_soups_of_identical_ingredients_are_that_ingredient():
  x, y, ings = _problem(0)
  loss_fn, batches = _learned_inputs(x, y)
  res = soups.compare_soups([ings[1]] * 4, _jax_eval(x, y), passes=2, random_orders=2,
                            loss_fn=loss_fn, batches=batches, learned_steps=3)
  assert list(res) == list(soups.SOUPS)
  for name, results in res.items():
    for r in results:
      chex.assert_trees_all_close(r.params, ings[1], rtol=1e-6, atol=1e-6)
  assert len(res["greedy_random"]) == len(res["pruned_random"]) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compare_soups_never_score_below_their_starting_points(seed):
  """Greedy: never below its first ingredient (sorted: the best one); pruned: never below
  the uniform soup it starts from."""
  x, y, ings = _problem(seed)
  res = soups.compare_soups(ings, _jax_eval(x, y), passes=2, random_orders=3)
  ind = res["greedy_sorted"][0].individual_scores
  np.testing.assert_allclose(ind, [_np_acc(p, x, y) for p in ings])
  assert res["greedy_sorted"][0].score >= np.max(ind)
  for r in res["greedy_random"]:
    assert r.score >= ind[r.info["order"][0]]
  uniform = res["uniform"][0].score
  assert uniform == pytest.approx(_np_acc(_np_avg(ings, range(len(ings))), x, y))
  for r in res["pruned_random"] + res["pruned_sorted"]:
    assert r.score >= uniform


def test_compare_soups_entries_are_the_recipes():
  x, y, ings = _problem(4)
  ev = _jax_eval(x, y)
  res = soups.compare_soups(ings, ev, passes=2, random_orders=2)
  assert [r.indices for r in res["greedy_random"]] == [
      soups.greedy_soup(ings, ev, order="random", key=s).indices for s in range(2)]
  assert [r.indices for r in res["pruned_random"]] == [
      soups.pruned_soup(ings, ev, passes=2, order="random", key=s).indices for s in range(2)]
  assert res["pruned_sorted"][0].indices == soups.pruned_soup(ings, ev, passes=2).indices
  assert "learned_global" not in res
  with pytest.raises(ValueError, match="loss_fn"):
    soups.compare_soups(ings, ev, learned_steps=2)


def test_held_out_batches_cover_the_data_in_order():
  x, y = np.arange(10)[:, None], np.arange(10)
  b = soups.held_out_batches(x, y, batch_size=4)
  assert [bb["y"].tolist() for bb in b] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert [bb["y"].tolist() for bb in soups.held_out_batches(x, y, batch_size=20)] == [
      list(range(10))]
  with pytest.raises(ValueError, match="got 10 inputs and 9 labels"):
    soups.held_out_batches(x, y[:9], batch_size=4)
  with pytest.raises(ValueError, match="got 0 inputs and 0 labels"):
    soups.held_out_batches(x[:0], y[:0], batch_size=4)
  for bad in (0, 2.5, 2.0):  # 2.0 had passed the check, then failed in slicing (TypeError)
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {bad}"):
      soups.held_out_batches(x, y, batch_size=bad)


@pytest.fixture(scope="module")
def dense():
  import flax.linen as nn
  net = nn.Dense(3)
  x = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, 3, 30)
  p = net.init(jax.random.key(0), x)["params"]
  return net, x, y, p


def test_accuracy_and_loss_functions_against_numpy(dense):
  net, x, y, p = dense
  logits = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  acc, ce = np.mean(logits.argmax(-1) == y), -np.mean(logp[np.arange(30), y])
  assert float(jax.jit(soups.accuracy_fn(net, x, y))(p)) == pytest.approx(acc)
  out = soups.loss_accuracy_fn(net, x, y)(p)
  assert out["accuracy"] == pytest.approx(acc) and out["loss"] == pytest.approx(ce, rel=1e-5)
  loss = soups.temperature_loss_fn(net)(p, {"x": x, "y": y}, 2.0)
  logp2 = 2 * logits - np.log(np.exp(2 * logits).sum(-1, keepdims=True))
  assert float(loss) == pytest.approx(-np.mean(logp2[np.arange(30), y]), rel=1e-5)


# --------------------------------------------------------------------------- fine-tuning

def test_random_hyperparams_follow_the_documented_draws():
  hp = soups.random_hyperparams(6, steps_per_epoch=7, max_epochs=3, lr_range=(0.01, 0.1),
                                wd_range=(1e-5, 1e-3), max_shift=2, seed=4)
  rng = np.random.default_rng(4)  # order: epochs, lr, weight decay, shift, flip
  epochs = rng.integers(1, 4, 6)
  lr = np.exp(rng.uniform(np.log(0.01), np.log(0.1), 6)).astype(np.float32)
  wd = np.exp(rng.uniform(np.log(1e-5), np.log(1e-3), 6)).astype(np.float32)
  np.testing.assert_array_equal(hp["epochs"], epochs)
  np.testing.assert_array_equal(hp["steps"], 7 * epochs)
  np.testing.assert_array_equal(hp["lr"], lr)
  np.testing.assert_array_equal(hp["weight_decay"], wd)
  np.testing.assert_array_equal(hp["shift"], rng.integers(0, 3, 6))
  np.testing.assert_array_equal(hp["flip"], rng.random(6) < 0.5)
  assert hp["steps"].dtype == np.int32 and hp["flip"].dtype == bool


def _image_classifier(n=16):
  import flax.linen as nn
  net = nn.Sequential([lambda v: v.reshape((v.shape[0], -1)), nn.Dense(3)])
  x = np.random.default_rng(0).normal(size=(n, 4, 4, 1)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, 3, n).astype(np.int32)
  return net, x, y, net.init(jax.random.key(0), x)["params"]


def _hp(lr, steps, shift, flip):
  return {"lr": np.asarray(lr, np.float32), "steps": np.asarray(steps, np.int32),
          "shift": np.asarray(shift, np.int32), "flip": np.asarray(flip),
          "weight_decay": np.full(len(lr), 1e-3, np.float32)}


def test_finetune_state_copies_the_model_and_sets_each_members_weight_decay():
  net, x, _, p = _image_classifier()
  tx = optim.make_optimizer(name="sgd", learning_rate=1.0, momentum=0.9)
  hp = _hp([0.1, 0.2], [4, 8], [0, 1], [False, True])
  hp["weight_decay"] = np.asarray([1e-4, 2e-3], np.float32)
  state = soups.finetune_state({"params": p}, hp, tx=tx)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(p)):
    np.testing.assert_array_equal(np.asarray(a), np.broadcast_to(b, (2,) + b.shape))
  np.testing.assert_allclose(state["opt_state"].hyperparams["weight_decay"], [1e-4, 2e-3])
  assert sorted(state["hp"]) == sorted(soups.HYPERPARAMS)


def test_finetune_step_is_a_train_step_at_the_members_cosine_rate():
  """Without augmentation (shift 0, no flip), at step t: `train_step` with lr_scale
  lr * (1 + cos(pi t / steps)) / 2, on the un-augmented batch; 0 after `steps`."""
  net, x, y, p = _image_classifier()
  tx = optim.make_optimizer(name="sgd", learning_rate=1.0, momentum=0.9)
  state = tree_lib.index(soups.finetune_state({"params": p}, _hp([0.3], [4], [0], [False]),
                                              tx=tx), 0)
  batch, key = {"x": x, "y": y}, jax.random.key(2)
  finetune = jax.jit(lambda s: soups.finetune_step(s, batch, key, model=net, tx=tx)[0])
  plain = jax.jit(lambda s: members.train_step(s, batch, jax.random.split(key)[1], model=net,
                                               tx=tx)[0])
  for t in (0, 2, 4, 6):
    s = {**state, "step": jnp.asarray(t, jnp.int32)}
    got = finetune(s)
    scale = 0.3 * 0.5 * (1 + np.cos(np.pi * min(t / 4, 1.0)))
    ref = plain({**s, "opt_state": optim.set_hyperparams(s["opt_state"], lr_scale=scale)})
    chex.assert_trees_all_close(got["params"], ref["params"], rtol=1e-6, atol=1e-7)
    if t >= 4:  # rate 0: the weights do not move (weight decay is scaled too)
      chex.assert_trees_all_equal(got["params"], s["params"])


def test_finetune_members_in_parallel_equal_each_member_alone():
  net, x, y, p = _image_classifier()
  tx = optim.make_optimizer(name="sgd", learning_rate=1.0, momentum=0.9)
  state = soups.finetune_state({"params": p}, _hp([0.3, 0.05], [2, 6], [2, 1], [True, False]),
                               tx=tx)
  step = members.ensemble_step(model=net, tx=tx, num_members=2, step_fn=soups.finetune_step)
  batch_K = {"x": np.stack([x, x[::-1]]), "y": np.stack([y, y[::-1]])}
  keys = members.member_keys(jax.random.key(3), 2)
  got, _ = step(state, batch_K, keys)
  alone = jax.jit(lambda s, b, k: soups.finetune_step(s, b, k, model=net, tx=tx)[0])
  for k in range(2):
    one = alone(tree_lib.index(state, k), tree_lib.index(batch_K, k), keys[k])
    chex.assert_trees_all_close(tree_lib.index(got["params"], k), one["params"], rtol=1e-5,
                                atol=1e-6)


# --------------------------------------------------------------------------- augmentation

def test_random_shift_flip_against_numpy():
  from ensembling.data import augment
  x = np.random.default_rng(0).normal(size=(64, 5, 6, 2)).astype(np.float32)
  key = jax.random.key(7)
  out = np.asarray(augment.random_shift_flip(key, x, max_shift=2, flip=True))
  k1, k2, k3 = jax.random.split(key, 3)  # the documented draws
  dy = np.asarray(jax.random.randint(k1, (64,), -2, 3))
  dx = np.asarray(jax.random.randint(k2, (64,), -2, 3))
  fl = np.asarray(jax.random.bernoulli(k3, 0.5, (64,)))
  xp = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  for i in range(64):
    ref = xp[i, 2 + dy[i]:2 + dy[i] + 5, 2 + dx[i]:2 + dx[i] + 6]
    np.testing.assert_array_equal(out[i], ref[:, ::-1] if fl[i] else ref)
  assert 0 < fl.sum() < 64 and len(set(dy.tolist())) == 5


def test_random_shift_flip_identity_shapes_and_errors():
  from ensembling.data import augment
  x = np.random.default_rng(0).normal(size=(8, 4, 4)).astype(np.float32)
  same = augment.random_shift_flip(jax.random.key(0), x, max_shift=0, flip=False)
  assert same.shape == x.shape
  np.testing.assert_array_equal(np.asarray(same), x)
  mirrored = np.asarray(augment.random_shift_flip(jax.random.key(0), x, max_shift=0, flip=True))
  for a, b in zip(mirrored, x):
    assert np.array_equal(a, b) or np.array_equal(a, b[:, ::-1])
  with pytest.raises(ValueError, match="max_shift"):
    augment.random_shift_flip(jax.random.key(0), x, max_shift=3, flip=False)
  with pytest.raises(ValueError, match="images"):
    augment.random_shift_flip(jax.random.key(0), x[0], max_shift=1, flip=False)


# --------------------------------------------------------------------------- inputs at the door

def test_one_unstacked_model_is_refused():
  one_model = {"Dense_0": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros((64,))}}
  with pytest.raises(ValueError, match="look like one unstacked model"):
    soups.uniform_soup(one_model)
  ragged = {"kernel": jnp.ones((784, 64)), "bias": jnp.zeros((64,))}
  with pytest.raises(ValueError, match="leading sizes differ"):
    soups.uniform_soup(ragged)
  # Stated explicitly, a stack with per-member scalars is fine: the mean of the members.
  res = soups.prepare_ingredients({"t": jnp.arange(3.0)}, stacked=True)
  assert res[2] == 3


def test_mixed_dtypes_are_refused():
  a = {"w": jnp.ones(3, jnp.float32)}
  b = {"w": jnp.ones(3, jnp.float16)}
  with pytest.raises(ValueError, match=r"differ in dtype at 'w': float32 vs float16"):
    soups.greedy_soup([a, b], lambda p: jnp.sum(p["w"]))


def test_an_eval_fn_that_is_nan_everywhere_is_an_error():
  ings = [{"w": jnp.full(2, float(i))} for i in range(3)]
  for soup in (soups.greedy_soup, soups.pruned_soup):
    with pytest.raises(ValueError, match="NaN for every"):
      soup(ings, lambda p: jnp.nan)


def test_a_plain_python_eval_fn_works_with_the_defaults():
  """float()/NumPy inside eval_fn cannot be traced: the soup falls back to calling it."""
  ings = [{"w": jnp.full(2, float(i))} for i in range(4)]
  score = lambda p: -abs(float(np.asarray(p["w"]).mean()) - 1.2)
  ref = lambda p: -jnp.abs(jnp.mean(p["w"]) - 1.2)  # the same score, traceable
  for soup in (soups.greedy_soup, soups.pruned_soup):
    got, want = soup(ings, score), soup(ings, ref)
    assert got.indices == want.indices and got.score == pytest.approx(want.score)
    assert got.info["evaluation"].startswith("python: eval_fn cannot be traced")
    assert not want.info["evaluation"].startswith("python")


def test_pruned_soup_runs_passes_until_nothing_changes():
  """The toy problem where one sorted pass is not enough (found by search, seed 13)."""
  rng = np.random.default_rng(13)
  ings = [{"w": jnp.asarray(rng.normal(size=2).astype(np.float32) * 2)} for _ in range(6)]
  f = lambda p: -jnp.sum(p["w"] ** 2)
  best = max(float(f(i)) for i in ings)
  one = soups.pruned_soup(ings, f, passes=1)
  full = soups.pruned_soup(ings, f)
  assert one.score < best < full.score
  assert full.info["passes_run"] == 3 and full.indices == (4, 5)
  # A hand-run pruning to convergence, from the uniform soup, sorted order, >= rule.
  scores = [float(f(i)) for i in ings]
  order = sorted(range(6), key=lambda i: (-scores[i], i))
  kept = list(range(6))
  mean = lambda idx: {"w": jnp.mean(jnp.stack([ings[i]["w"] for i in idx]), 0)}
  base, changed = float(f(mean(kept))), True
  while changed:  # a pass visits every kept ingredient once; passes repeat while one removes
    changed = False
    for i in [j for j in order if j in kept]:
      rest = [j for j in kept if j != i]
      if len(kept) > 1 and float(f(mean(rest))) >= base:
        kept, base, changed = rest, float(f(mean(rest))), True
  assert tuple(kept) == full.indices and base == pytest.approx(full.score)
