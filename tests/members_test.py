"""The member-parallel step equals a Python loop of one-member steps."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import members, models, optim
from ensembling import tree as tree_lib

K = 3


def _setup(model, x_shape, *, lr_scale=None, weight_decay=None):
  tx = optim.make_optimizer(learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
  variables = members.init_members(jax.random.key(0), model, jnp.zeros((2,) + x_shape), K)
  state = members.init_states(variables, tx)
  hp = {}
  if lr_scale is not None:
    hp["lr_scale"] = lr_scale
  if weight_decay is not None:
    hp["weight_decay"] = weight_decay
  if hp:
    state["opt_state"] = optim.set_hyperparams(state["opt_state"], **hp)
  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(K, 8) + x_shape).astype(np.float32),
              "y": rng.integers(0, 10, size=(K, 8)).astype(np.int32)} for _ in range(3)]
  return tx, state, batches


def _run_parallel(step, state, batches):
  keys = members.member_keys(jax.random.key(1), K)
  for t, b in enumerate(batches):
    state, m = step(state, b, members.step_keys(keys, t))
  return state, m


def _run_loop(model, tx, state, batches):
  keys = members.member_keys(jax.random.key(1), K)
  one = jax.jit(functools.partial(members.train_step, apply_fn=model.apply, tx=tx))
  out = []
  for k in range(K):
    s = tree_lib.index(state, k)
    for t, b in enumerate(batches):
      s, _ = one(s, {"x": b["x"][k], "y": b["y"][k]}, members.step_keys(keys, t)[k])
    out.append(s)
  return tree_lib.stack(out)


MODELS = {
    "mlp": (models.MLP(widths=(16, 16), dropout=0.2), (6, 6, 1)),
    "cnn_bn": (models.CNN(stages=(4, 8), dropouts=(0.2, 0.3)), (8, 8, 1)),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("strategy", ["vmap", "unroll", "map", "loop"])
def test_parallel_step_equals_member_loop(arch, strategy):
  model, shape = MODELS[arch]
  tx, state, batches = _setup(model, shape)
  step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=K, strategy=strategy)
  got, metrics = _run_parallel(step, jax.tree.map(jnp.copy, state), batches)
  want = _run_loop(model, tx, state, batches)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert metrics["loss"].shape == (K,)
  if arch == "cnn_bn":  # BatchNorm statistics moved during training
    assert not np.allclose(got["batch_stats"]["bn0_0"]["mean"], 0.0)


def test_per_member_hyperparameters_match_separate_runs():
  model, shape = MODELS["mlp"]
  lr_scale = np.array([1.0, 0.5, 0.0], np.float32)
  wd = np.array([0.0, 1e-2, 1e-1], np.float32)
  tx, state, batches = _setup(model, shape, lr_scale=lr_scale, weight_decay=wd)
  step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=K, strategy="vmap")
  got, _ = _run_parallel(step, jax.tree.map(jnp.copy, state), batches)
  # Reference: each member alone with a fresh optimizer built from its own scalars.
  keys = members.member_keys(jax.random.key(1), K)
  for k in range(K):
    tx_k = optim.make_optimizer(learning_rate=0.1 * float(lr_scale[k]), momentum=0.9,
                                weight_decay=float(wd[k]))
    s = members.init_state({"params": tree_lib.index(state["params"], k)}, tx_k)
    for t, b in enumerate(batches):
      s, _ = members.train_step(s, {"x": b["x"][k], "y": b["y"][k]},
                                members.step_keys(keys, t)[k], apply_fn=model.apply, tx=tx_k)
    chex.assert_trees_all_close(tree_lib.index(got["params"], k), s["params"],
                                atol=1e-5, rtol=1e-5)
  # lr_scale 0 froze member 2 completely.
  chex.assert_trees_all_equal(tree_lib.index(got["params"], 2),
                              tree_lib.index(state["params"], 2))


def test_members_are_initialised_differently():
  model, shape = MODELS["mlp"]
  v = members.init_members(jax.random.key(0), model, jnp.zeros((1,) + shape), K)
  k0 = np.asarray(v["params"]["Dense_0"]["kernel"])
  assert k0.shape[0] == K
  assert not np.allclose(k0[0], k0[1])


@pytest.mark.parametrize("strategy", ["vmap", "unroll"])
def test_predict_equals_per_member_apply(strategy):
  model, shape = MODELS["cnn_bn"]
  v = members.init_members(jax.random.key(0), model, jnp.zeros((1,) + shape), K)
  x = np.random.default_rng(0).normal(size=(23,) + shape).astype(np.float32)
  logits, feats = members.predict(model.apply, v, x, batch_size=10, strategy=strategy,
                                  with_features=True)
  assert logits.shape == (K, 23, 10)
  for k in range(K):
    out = model.apply(tree_lib.index(v, k), x, train=False)
    np.testing.assert_allclose(logits[k], out.logits, atol=1e-5)
    np.testing.assert_allclose(feats[k], out.features, atol=1e-5)


def test_auto_strategy_and_errors():
  mlp, shape = MODELS["mlp"]
  v = members.init_members(jax.random.key(0), mlp, jnp.zeros((1,) + shape), 2)
  assert members.resolve_strategy("auto", v["params"]) in members.STRATEGIES
  with pytest.raises(ValueError, match="members_strategy"):
    members.resolve_strategy("vmapp", v["params"])
  with pytest.raises(ValueError, match="num_members"):
    members.init_members(jax.random.key(0), mlp, jnp.zeros((1,) + shape), 0)


def test_set_hyperparams_checks_shapes_and_names():
  tx = optim.make_optimizer(learning_rate=0.1)
  mlp, shape = MODELS["mlp"]
  v = members.init_members(jax.random.key(0), mlp, jnp.zeros((1,) + shape), K)
  st = members.init_states(v, tx)
  with pytest.raises(ValueError, match="shape"):
    optim.set_hyperparams(st["opt_state"], lr_scale=np.ones(K + 1))
  with pytest.raises(ValueError, match="Unknown hyperparameter"):
    optim.set_hyperparams(st["opt_state"], learning_rate=np.ones(K))
  with pytest.raises(ValueError, match="4 values for 3 members"):
    optim.per_member_values([1, 2, 3, 4], 3, name="optim.lr_scale")
