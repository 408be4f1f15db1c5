"""Member-parallel steps equal a per-member loop; inputs survive; sharding; errors."""

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

from conftest import REPO
from ensembling import members, models, optim, train
from ensembling import tree as tree_lib

K = 2
STRATEGIES = [s for s in members.STRATEGIES if s != "auto"]


@functools.lru_cache(maxsize=None)
def _setup(arch):
  if arch == "mlp":
    model = models.MLP(widths=(16, 8), num_classes=5, dropout=0.25)
  else:  # tiny thesis CNN: convs, BatchNorm, max-pool, dropout
    model = models.CNN(num_classes=5, stages=(4,), dropouts=(0.3,), batch_norm=True)
  rng = np.random.default_rng(0)
  batch_K = {"x": jnp.asarray(rng.standard_normal((K, 4, 6, 6, 1)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 5, (K, 4)), jnp.int32)}
  tx = optim.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
  state_K = members.init_states(members.init_members(jax.random.key(0), model,
                                                     batch_K["x"][0], K), tx)
  # Different per-member learning rates, as the soups use them.
  state_K["opt_state"] = optim.set_hyperparams(state_K["opt_state"],
                                               lr_scale=jnp.array([1.0, 0.5]))
  return model, tx, state_K, batch_K, members.member_keys(jax.random.key(1), K)


def _reference(model, tx, state_K, batch_K, keys_K, steps):
  """Each member stepped on its own with the jitted one-member step."""
  step = jax.jit(functools.partial(members.train_step, model=model, tx=tx))
  states, metrics = [], []
  for k, state in enumerate(tree_lib.unstack(state_K)):
    for t in range(steps):
      state, m = step(state, tree_lib.index(batch_K, k), jax.random.fold_in(keys_K[k], t))
    states.append(state)
    metrics.append(m)
  return tree_lib.stack(states), tree_lib.stack(metrics)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_every_strategy_matches_per_member_loop(arch):
  model, tx, state_K, batch_K, keys_K = _setup(arch)
  want_state, want_metrics = _reference(model, tx, state_K, batch_K, keys_K, 2)
  if arch == "cnn":
    assert jax.tree.leaves(want_state["batch_stats"])  # BatchNorm is exercised
  for strategy in STRATEGIES + ["auto"]:
    step = members.ensemble_step(model=model, tx=tx, num_members=K, strategy=strategy)
    state = state_K
    for t in range(2):
      state, metrics = step(state, batch_K, members.step_keys(keys_K, t))
    chex.assert_trees_all_close(state, want_state, rtol=2e-4, atol=2e-5,
                                custom_message=f"strategy={strategy}")
    chex.assert_trees_all_close(metrics, want_metrics, rtol=2e-4, atol=2e-5,
                                custom_message=f"strategy={strategy}")
    assert step.strategy in STRATEGIES
  # The step moved the parameters (the comparison is not between two copies of init).
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), want_state["params"],
                       state_K["params"])
  assert min(jax.tree.leaves(moved)) > 0


def test_chunked_groups_match_per_member_loop_and_auto_follows_the_measured_rule():
  model = models.MLP(widths=(8,), num_classes=3)
  rng = np.random.default_rng(1)
  k = 5  # chunk_size 2: groups of 2, 2 and 1
  batch_K = {"x": jnp.asarray(rng.standard_normal((k, 4, 6)), jnp.float32),
             "y": jnp.asarray(rng.integers(0, 3, (k, 4)), jnp.int32)}
  tx = optim.make_optimizer(name="sgd", learning_rate=0.1, momentum=0.9)
  state_K = members.init_states(members.init_members(jax.random.key(0), model,
                                                     batch_K["x"][0], k), tx)
  keys_K = members.member_keys(jax.random.key(1), k)
  want_state, want_metrics = _reference(model, tx, state_K, batch_K, keys_K, 2)
  step = members.ensemble_step(model=model, tx=tx, num_members=k, strategy="chunked",
                               chunk_size=2)
  state = state_K
  for t in range(2):
    state, metrics = step(state, batch_K, members.step_keys(keys_K, t))
  chex.assert_trees_all_close(state, want_state, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(metrics, want_metrics, rtol=2e-4, atol=2e-5)
  # auto on one CPU device (the measured rule): dense models are vmapped at 2..8 members
  # and looped otherwise, convolutional models are unrolled up to 16 members.
  for num, want in ((1, "loop"), (2, "vmap"), (members.MAX_DENSE_VMAP, "vmap"),
                    (members.MAX_DENSE_VMAP + 1, "loop"), (64, "loop")):
    params = members.init_members(jax.random.key(0), model, batch_K["x"][0], num)["params"]
    assert members.resolve_strategy("auto", params) == want, num
  cnn = members.init_members(jax.random.key(0), models.CNN(num_classes=3, stages=(2,)),
                             jnp.zeros((1, 4, 4, 1)), 2)["params"]
  assert members.resolve_strategy("auto", cnn) == "unroll"
  cnn = members.init_members(jax.random.key(0), models.CNN(num_classes=3, stages=(2,)),
                             jnp.zeros((1, 4, 4, 1)), 1)["params"]
  assert members.resolve_strategy("auto", cnn) == "loop"
  cnn = members.init_members(jax.random.key(0), models.CNN(num_classes=3, stages=(2,)),
                             jnp.zeros((1, 4, 4, 1)), members.MAX_UNROLL + 1)["params"]
  assert members.resolve_strategy("auto", cnn) == "loop"


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_held_steps_match_per_member_loop_and_release_restacks(strategy):
  """`hold`/`step_held` (what train.fit runs): K separate states for 'loop', the
  stacked state otherwise; same values as each member stepped alone."""
  model, tx, state_K, batch_K, keys_K = _setup("cnn")
  want_state, want_metrics = _reference(model, tx, state_K, batch_K, keys_K, 2)
  step = members.ensemble_step(model=model, tx=tx, num_members=K, strategy=strategy,
                               donate=True)
  held = step.hold(state_K)
  assert isinstance(held, list) == (strategy == "loop")
  if strategy == "loop":
    assert len(held) == K
    chex.assert_trees_all_equal(held[1], tree_lib.index(state_K, 1))
  for t in range(2):
    held, metrics = step.step_held(held, batch_K, members.step_keys(keys_K, t))
  got = step.release(held)
  chex.assert_trees_all_close(got, want_state, rtol=2e-4, atol=2e-5)
  chex.assert_trees_all_close(metrics, want_metrics, rtol=2e-4, atol=2e-5)
  jax.tree.map(np.asarray, state_K)  # raises if deleted: holding copies, the input survives
  chex.assert_trees_all_equal(step.release(held), got)  # releasing twice: same, still alive


def test_fit_with_held_loop_equals_vmap_and_resumes(tmp_path):
  """train.fit holds 'loop' members unstacked: the result, the records, the checkpoint
  and a resumed run equal the stacked 'vmap' run."""
  model, tx, state_K, batch_K, _ = _setup("mlp")
  evals = lambda s: {"norm": jnp.stack([jnp.sum(jnp.abs(s["params"]["Dense_0"]["kernel"][k]))
                                        for k in range(K)])}
  seen = []
  def on_step(t, s, extra):
    seen.append(float(s["params"]["Dense_0"]["kernel"][0, 0, 0]))
    return extra
  runs = {}
  for strategy in ("vmap", "loop"):
    step = members.ensemble_step(model=model, tx=tx, num_members=K, strategy=strategy,
                                 donate=True)
    runs[strategy] = train.fit(state_K, step_fn=step, batch_fn=lambda t: batch_K,
                               num_steps=4, key=jax.random.key(3), eval_fn=evals,
                               eval_every=2, on_step=on_step, progress=False)
  (sv, _, hv), (sl, _, hl) = runs["vmap"], runs["loop"]
  chex.assert_trees_all_close(sl, sv, rtol=2e-4, atol=2e-5)
  assert [r["step"] for r in hl] == [r["step"] for r in hv] == [2, 2, 4, 4]
  np.testing.assert_allclose([r["val_norm"] for r in hl], [r["val_norm"] for r in hv],
                             rtol=1e-5)
  np.testing.assert_allclose(seen[4:], seen[:4], rtol=1e-5)  # on_step saw the same states
  # Interrupted after 2 steps (checkpoint), then resumed to 4: equals the 4-step run.
  step = members.ensemble_step(model=model, tx=tx, num_members=K, strategy="loop",
                               donate=True)
  kw = dict(step_fn=step, batch_fn=lambda t: batch_K, key=jax.random.key(3),
            workdir=str(tmp_path), progress=False, on_step=on_step)
  train.fit(state_K, num_steps=2, **kw)
  resumed, _, _ = train.fit(state_K, num_steps=4, **kw)
  chex.assert_trees_all_equal(resumed, sl)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inputs_stay_valid_after_a_step_and_after_fit(strategy):
  """No strategy deletes the caller's arrays (the bug: vmap/unroll/map donated them)."""
  model, tx, state_K, batch_K, keys_K = _setup("mlp")
  state = jax.tree.map(jnp.copy, state_K)
  step = members.ensemble_step(model=model, tx=tx, num_members=K, strategy=strategy)
  step(state, batch_K, keys_K)
  np.asarray(state["params"]["Dense_0"]["kernel"])  # raises if deleted
  donating = members.ensemble_step(model=model, tx=tx, num_members=K, strategy=strategy,
                                   donate=True)
  train.fit(state, step_fn=donating, batch_fn=lambda t: batch_K, num_steps=2,
            key=jax.random.key(0), progress=False)
  chex.assert_trees_all_equal(state, state_K)  # untouched and alive


def test_per_member_hyperparameters_match_separate_runs():
  model, _, _, batch_K, keys_K = _setup("mlp")
  tx = optim.make_optimizer(learning_rate=0.1, momentum=0.9, weight_decay=1e-3)
  state = members.init_states(members.init_members(jax.random.key(0), model,
                                                   batch_K["x"][0], 3), tx)
  lr_scale = np.array([1.0, 0.5, 0.0], np.float32)
  wd = np.array([0.0, 1e-2, 1e-1], np.float32)
  state["opt_state"] = optim.set_hyperparams(state["opt_state"], lr_scale=lr_scale,
                                             weight_decay=wd)
  batch = {"x": jnp.concatenate([batch_K["x"], batch_K["x"][:1]]),
           "y": jnp.concatenate([batch_K["y"], batch_K["y"][:1]])}
  keys = members.member_keys(jax.random.key(1), 3)
  step = members.ensemble_step(model=model, tx=tx, num_members=3, strategy="vmap")
  got, _ = step(state, batch, keys)
  for k in range(3):  # each member alone, with a fresh optimizer built from its scalars
    tx_k = optim.make_optimizer(learning_rate=0.1 * float(lr_scale[k]), momentum=0.9,
                                weight_decay=float(wd[k]))
    s = members.init_state({"params": tree_lib.index(state["params"], k)}, tx_k)
    s, _ = members.train_step(s, tree_lib.index(batch, k), keys[k], model=model, tx=tx_k)
    chex.assert_trees_all_close(tree_lib.index(got["params"], k), s["params"],
                                atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_equal(tree_lib.index(got["params"], 2),  # lr_scale 0: frozen
                              tree_lib.index(state["params"], 2))


@pytest.mark.parametrize("strategy", ["vmap", "unroll", "loop"])
def test_predict_equals_per_member_apply(strategy):
  model, _, state_K, _, _ = _setup("cnn")
  x = np.random.default_rng(0).normal(size=(23, 6, 6, 1)).astype(np.float32)
  logits, feats = members.predict(model, state_K, x, batch_size=10, strategy=strategy,
                                  with_features=True)
  assert logits.shape == (K, 23, 5)
  for k in range(K):
    out = model.apply(tree_lib.index(members.variables_of(state_K), k), x, train=False)
    np.testing.assert_allclose(logits[k], out.logits, atol=1e-5)
    np.testing.assert_allclose(feats[k], out.features, atol=1e-5)


def test_members_are_initialised_from_split_keys():
  model, _, _, batch_K, _ = _setup("mlp")
  v = members.init_members(jax.random.key(0), model, batch_K["x"][0], 3)
  for k, key in enumerate(jax.random.split(jax.random.key(0), 3)):
    chex.assert_trees_all_equal(tree_lib.index(v, k),
                                models.as_model(model).init(key, batch_K["x"][0]))
  assert not np.allclose(v["params"]["Dense_0"]["kernel"][0], v["params"]["Dense_0"]["kernel"][1])


def test_auto_strategy_resolution_and_errors():
  model, tx, state_K, _, _ = _setup("cnn")
  _, _, mlp_state, _, _ = _setup("mlp")
  for s in STRATEGIES:
    assert members.resolve_strategy(s, state_K["params"]) == s
  assert members.resolve_strategy("auto", mlp_state["params"]) == "vmap"
  assert members.resolve_strategy("auto", state_K["params"]) == "unroll"  # convs, 1 CPU
  with pytest.raises(ValueError, match="members_strategy 'pmap'"):
    members.ensemble_step(model=model, tx=tx, num_members=K, strategy="pmap")
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="num_members must be an integer >= 1"):
      members.init_members(jax.random.key(0), model, np.zeros((1, 6, 6, 1)), bad)


def test_set_hyperparams_checks_shapes_and_names():
  _, _, state_K, _, _ = _setup("mlp")
  with pytest.raises(ValueError, match="shape"):
    optim.set_hyperparams(state_K["opt_state"], lr_scale=np.ones(K + 1))
  with pytest.raises(ValueError, match="Unknown hyperparameter"):
    optim.set_hyperparams(state_K["opt_state"], learning_rate=np.ones(K))
  with pytest.raises(ValueError, match="4 values for 3 members"):
    optim.per_member_values([1, 2, 3, 4], 3, name="optim.lr_scale")


SHARDING = textwrap.dedent("""
    import functools, jax, jax.numpy as jnp, numpy as np, chex
    from ensembling import members, models, optim, tree as tree_lib
    assert jax.device_count() == 4, jax.devices()
    for model in (models.MLP(widths=(16,), dropout=0.1),
                  models.CNN(num_classes=5, stages=(4,), dropouts=(0.2,), batch_norm=True)):
      tx = optim.make_optimizer(learning_rate=0.1, momentum=0.9)
      rng = np.random.default_rng(0)
      batch = {"x": jnp.asarray(rng.standard_normal((4, 4, 6, 6, 1)), jnp.float32),
               "y": jnp.asarray(rng.integers(0, 5, (4, 4)), jnp.int32)}
      state = members.init_states(members.init_members(jax.random.key(0), model,
                                                       batch["x"][0], 4), tx)
      keys = members.member_keys(jax.random.key(1), 4)
      assert members.resolve_strategy("auto", state["params"]) == "vmap"  # shardable
      one = jax.jit(functools.partial(members.train_step, model=model, tx=tx))
      want = tree_lib.stack([one(tree_lib.index(state, k), tree_lib.index(batch, k), keys[k])[0]
                             for k in range(4)])
      step = members.ensemble_step(model=model, tx=tx, num_members=4)
      sharded = members.shard_members(state)
      leaf = jax.tree.leaves(sharded["params"])[0]
      assert len(leaf.sharding.device_set) == 4 and leaf.addressable_shards[0].data.shape[0] == 1
      got, _ = step(sharded, members.shard_members(batch), members.shard_members(keys))
      assert len(jax.tree.leaves(got["params"])[0].sharding.device_set) == 4
      chex.assert_trees_all_close(jax.device_get(got), jax.device_get(want), rtol=2e-4, atol=2e-5)
    try:
      members.shard_members({"x": jnp.zeros((3, 2))})
    except ValueError as e:
      assert "multiple of the device count" in str(e)
    else:
      raise AssertionError("expected a ValueError")
    print("SHARDING_OK")
""")


def test_member_axis_sharded_over_four_devices():
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env = dict(os.environ, XLA_FLAGS=flags,
             JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run([sys.executable, "-c", SHARDING], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "SHARDING_OK" in res.stdout
