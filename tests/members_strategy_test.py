"""Every member-parallel strategy equals a per-member Python loop of `train_step`."""

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ensembling import im2col
from ensembling import members
from ensembling import models
from ensembling import optim
from ensembling import tree as tree_lib

K = 2
STRATEGIES = [s for s in members.STRATEGIES if s != "auto"]


@functools.lru_cache(maxsize=None)
def _setup(arch):
  if arch == "mlp":
    model = models.MLP(widths=(16, 8), num_classes=5, dropout=0.25)
    shape = (6, 6, 1)
  else:  # tiny thesis CNN: convs, BatchNorm, max-pool, dropout
    model = models.CNN(num_classes=5, stages=(4,), dropouts=(0.3,), batch_norm=True)
    shape = (6, 6, 1)
  rng = np.random.default_rng(0)
  batch_K = {"x": jnp.asarray(rng.standard_normal((K, 4) + shape), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 5, (K, 4)), jnp.int32)}
  tx = optim.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
  variables_K = members.init_members(jax.random.key(0), model, batch_K["x"][0], K)
  state_K = members.init_states(variables_K, tx)
  # Different per-member learning rates, as the soups use them.
  state_K["opt_state"] = optim.set_hyperparams(state_K["opt_state"],
                                               lr_scale=jnp.array([1.0, 0.5]))
  keys_K = members.member_keys(jax.random.key(1), K)
  return model, tx, state_K, batch_K, keys_K


def _reference(model, tx, state_K, batch_K, keys_K, steps):
  """A NumPy-side loop: each member stepped on its own with the one-member step."""
  step = jax.jit(functools.partial(members.train_step, apply_fn=model.apply, tx=tx))
  states, metrics = [], []
  for k, state in enumerate(tree_lib.unstack(state_K)):
    for t in range(steps):
      state, m = step(state, jax.tree.map(lambda a: a[k], batch_K),
                      jax.random.fold_in(keys_K[k], t))
    states.append(state)
    metrics.append(m)
  return tree_lib.stack(states), tree_lib.stack(metrics)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_every_strategy_matches_per_member_loop(arch):
  model, tx, state_K, batch_K, keys_K = _setup(arch)
  steps = 2
  want_state, want_metrics = _reference(model, tx, state_K, batch_K, keys_K, steps)
  if arch == "cnn":
    assert jax.tree.leaves(want_state["batch_stats"])  # BatchNorm is exercised
  for strategy in STRATEGIES:
    step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=K,
                                 strategy=strategy)
    state = jax.tree.map(jnp.copy, state_K)
    for t in range(steps):
      state, metrics = step(state, batch_K, jax.vmap(jax.random.fold_in, (0, None))(keys_K, t))
    chex.assert_trees_all_close(state, want_state, rtol=2e-4, atol=2e-5,
                                custom_message=f"strategy={strategy}")
    chex.assert_trees_all_close(metrics, want_metrics, rtol=2e-4, atol=2e-5,
                                custom_message=f"strategy={strategy}")
  # The step moved the parameters (the comparison is not between two copies of init).
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), want_state["params"],
                       state_K["params"])
  assert min(jax.tree.leaves(moved)) > 0


def test_predict_strategies_agree():
  model, _, state_K, batch_K, _ = _setup("cnn")
  variables_K = members.variables_of(state_K)
  x = np.asarray(batch_K["x"][0])
  want = np.stack([np.asarray(model.apply(tree_lib.index(variables_K, k), x, train=False).logits)
                   for k in range(K)])
  for strategy in STRATEGIES:
    got = members.predict(model.apply, variables_K, x, strategy=strategy)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=strategy)


CONV_CASES = [
    # (input NHWC, kernel HWIO, strides, padding, lhs_dilation, rhs_dilation)
    ((2, 9, 9, 3), (3, 3, 3, 4), (1, 1), "SAME", (1, 1), (1, 1)),
    ((2, 9, 9, 3), (3, 3, 3, 4), (2, 2), "SAME", (1, 1), (1, 1)),
    ((2, 10, 8, 3), (3, 2, 3, 4), (2, 1), "VALID", (1, 1), (2, 1)),
    ((2, 9, 9, 3), (1, 1, 3, 4), (2, 2), "VALID", (1, 1), (1, 1)),
    ((2, 7, 7, 3), (3, 3, 3, 4), (1, 1), ((2, 1), (0, 3)), (2, 2), (1, 1)),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_convs_as_matmuls_matches_lax_conv_and_its_gradients(case):
  xs, ws, strides, padding, lhs_dil, rhs_dil = case
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(rng.standard_normal(ws), jnp.float32)

  def f(x, w):
    def loss(x, w):
      y = lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dil,
                                   rhs_dilation=rhs_dil,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=lax.Precision.HIGHEST)
      return jnp.sum(jnp.sin(y)), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    return y, grads

  rewritten = im2col.convs_as_matmuls(f)
  jaxpr = jax.make_jaxpr(rewritten)(x, w)
  assert "conv_general_dilated" not in str(jaxpr)  # forward and both gradients rewritten
  chex.assert_trees_all_close(jax.jit(rewritten)(x, w), f(x, w), rtol=1e-4, atol=1e-4)
  xs_K, ws_K = jnp.stack([x, 2 * x]), jnp.stack([w, -w])
  chex.assert_trees_all_close(jax.jit(jax.vmap(rewritten))(xs_K, ws_K),
                              jax.vmap(f)(xs_K, ws_K), rtol=1e-4, atol=1e-4)


def test_resolve_strategy():
  model, _, state_K, _, _ = _setup("cnn")
  mlp, _, mlp_state_K, _, _ = _setup("mlp")
  for s in STRATEGIES:
    assert members.resolve_strategy(s, state_K["params"]) == s
  assert members.resolve_strategy("auto", mlp_state_K["params"]) == "vmap"
  assert members.resolve_strategy("auto", state_K["params"]) in STRATEGIES
  with pytest.raises(ValueError, match="members_strategy"):
    members.resolve_strategy("pmap", state_K["params"])


def test_auto_on_four_devices_is_vmapped_and_sharded():
  """With several devices `auto` must vmap (shardable) and still match the loop."""
  code = textwrap.dedent("""
    import functools, jax, jax.numpy as jnp, numpy as np, chex
    from ensembling import members, models, optim, tree as tree_lib
    assert jax.device_count() == 4
    model = models.CNN(num_classes=5, stages=(4,), dropouts=(0.2,), batch_norm=True)
    tx = optim.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.standard_normal((4, 4, 6, 6, 1)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 5, (4, 4)), jnp.int32)}
    state = members.init_states(members.init_members(jax.random.key(0), model,
                                                     batch["x"][0], 4), tx)
    keys = members.member_keys(jax.random.key(1), 4)
    strategy = members.resolve_strategy("auto", state["params"])
    assert strategy in ("vmap", "im2col"), strategy
    one = jax.jit(functools.partial(members.train_step, apply_fn=model.apply, tx=tx))
    want = tree_lib.stack([one(tree_lib.index(state, k), tree_lib.index(batch, k), keys[k])[0]
                           for k in range(4)])
    step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=4,
                                 strategy=strategy)
    got, _ = step(members.shard_members(state), members.shard_members(batch),
                  members.shard_members(keys))
    leaf = got["params"]["conv0_0"]["kernel"]
    assert len(leaf.sharding.device_set) == 4, leaf.sharding
    chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-5)
    print("OK", strategy)
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "OK" in res.stdout
