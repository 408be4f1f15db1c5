"""SuperNet head, cached-feature training, layer-wise boost, PartitionedMLP, parameter
counts and the time-to-accuracy bookkeeping: against explicit references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import ensemble, members, metrics, optim, supernet, train
from ensembling import tree as tree_lib
from ensembling.models import MLP, PartitionedMLP
from ensembling.models.linear import apply_linear
from ensembling.models.mlp import partitioned_from_members

K, D, C, IN = 3, 5, 4, 6


@pytest.fixture(scope="module")
def setup():
  model = MLP(widths=(7, D), num_classes=C)
  x = np.random.default_rng(0).normal(size=(40, IN)).astype(np.float32)
  y = np.random.default_rng(1).integers(0, C, size=40).astype(np.int32)
  variables = members.init_members(jax.random.key(0), model, x[:1], K)
  return model, variables, x, y


def _member_outputs(model, variables, x):
  logits, feats = members.predict(model, variables, x, batch_size=len(x), with_features=True)
  return np.asarray(logits), np.asarray(feats)


def _cache(model, variables, x, y):
  cache = supernet.cache_features(model, variables, {"train": x, "val": x[:20]})
  cache["train"]["y"], cache["val"]["y"] = y, y[:20]
  return cache


# --------------------------------------------------------------------------- head

def test_concat_features_is_member_major():
  f = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.float32)  # K=2, N=3, D=4
  out = np.asarray(supernet.concat_features(f))
  ref = np.stack([np.concatenate([f[0, n], f[1, n]]) for n in range(3)])
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(
      np.asarray(supernet.first_members(out, num_members=1, feature_dim=4)), f[0])
  with pytest.raises(ValueError, match="num_members"):
    supernet.first_members(out, num_members=3, feature_dim=4)


def test_copy_scaled_head_is_the_logit_average(setup):
  model, variables, x, _ = setup
  logits, feats = _member_outputs(model, variables, x)
  kern, bias = supernet.member_heads(variables["params"])
  head = supernet.init_head(jax.random.key(1), num_features=K * D, num_classes=C,
                            init="copy_scaled", kernels_KxDxC=kern, biases_KxC=bias)
  np.testing.assert_allclose(np.asarray(apply_linear(head, supernet.concat_features(feats))),
                             np.asarray(ensemble.average_logits(logits)), rtol=1e-5, atol=1e-5)


def test_copy_head_sums_member_logits_and_scale_multiplies_the_kernel(setup):
  model, variables, x, _ = setup
  _, feats = _member_outputs(model, variables, x)
  kern, bias = supernet.member_heads(variables["params"])
  head = supernet.init_head(jax.random.key(1), num_features=K * D, num_classes=C,
                            init="copy", kernels_KxDxC=kern, biases_KxC=bias)
  ref = sum(feats[k] @ np.asarray(kern[k]) for k in range(K)) + np.asarray(bias).mean(0)
  np.testing.assert_allclose(np.asarray(apply_linear(head, supernet.concat_features(feats))),
                             ref, rtol=1e-5, atol=1e-5)
  head2 = supernet.init_head(jax.random.key(1), num_features=K * D, num_classes=C,
                             init="copy_scaled", scale=0.1, kernels_KxDxC=kern, biases_KxC=bias)
  np.testing.assert_allclose(np.asarray(head2["kernel"]), 0.1 * np.asarray(head["kernel"]),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(head2["bias"]), np.asarray(head["bias"]))


def test_init_head_errors():
  with pytest.raises(ValueError, match="Unknown head init"):
    supernet.init_head(jax.random.key(0), num_features=4, num_classes=2, init="zeros")
  with pytest.raises(ValueError, match="kernels_KxDxC"):
    supernet.init_head(jax.random.key(0), num_features=4, num_classes=2, init="copy")
  with pytest.raises(ValueError, match="do not fit"):
    supernet.init_head(jax.random.key(0), num_features=5, num_classes=2, init="copy",
                       kernels_KxDxC=np.zeros((2, 2, 2)), biases_KxC=np.zeros((2, 2)))


def test_supernet_apply_equals_cached_path(setup):
  model, variables, x, _ = setup
  head = supernet.init_head(jax.random.key(2), num_features=K * D, num_classes=C)
  params = supernet.supernet_params(variables, head)
  out = supernet.supernet_apply(model, params, x)
  cached = supernet.cache_features(model.apply, variables, {"x": x}, batch_size=16)
  np.testing.assert_allclose(np.asarray(out.features), cached["x"]["features"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.logits),
                             np.asarray(apply_linear(head, cached["x"]["features"])),
                             rtol=1e-5, atol=1e-5)
  out_u = supernet.supernet_apply(model, params, x, strategy="unroll")
  np.testing.assert_allclose(np.asarray(out_u.logits), np.asarray(out.logits), rtol=1e-5,
                             atol=1e-6)


# --------------------------------------------------------------------------- head training

def test_train_head_epoch_0_record_is_the_members_logit_average(setup):
  """Before training, a copy_scaled (1/K) head is the logit average: its epoch-0 record."""
  model, variables, x, y = setup
  cache = _cache(model, variables, x, y)
  _, hist = supernet.train_head(cache, supernet.member_heads(variables["params"]),
                                num_members=K, init="copy_scaled", tx=optax.adam(0.1),
                                epochs=1, batch_size=8, seed=0, key=jax.random.key(0),
                                eval_splits=("val",))
  avg = np.asarray(jax.nn.softmax(ensemble.average_logits(cache["val"]["logits"]), -1))
  assert hist[0]["epoch"] == 0 and "train_loss" not in hist[0]
  assert hist[0]["val_accuracy"] == pytest.approx(metrics.accuracy(avg, y[:20]), abs=1e-6)
  assert hist[0]["val_nll"] == pytest.approx(metrics.nll(avg, y[:20]), rel=1e-5)


def test_train_head_reads_only_the_first_members(setup):
  model, variables, x, y = setup
  cache = _cache(model, variables, x, y)
  heads = supernet.member_heads(variables["params"])
  head, _ = supernet.train_head(cache, heads, num_members=2, init="copy", tx=optax.sgd(0.1),
                                epochs=0, batch_size=8, seed=0, key=jax.random.key(0),
                                eval_splits=("val",))
  assert head["kernel"].shape == (2 * D, C)
  np.testing.assert_array_equal(np.asarray(head["kernel"][D:]), np.asarray(heads[0][1]))


def test_fit_head_equals_full_supernet_training_with_frozen_members(setup):
  """Cached-feature head training == the whole SuperNet trained with `optim.freeze`."""
  model, variables, x, y = setup
  kern, bias = supernet.member_heads(variables["params"])
  head0 = supernet.init_head(jax.random.key(3), num_features=K * D, num_classes=C,
                             init="copy_scaled", kernels_KxDxC=kern, biases_KxC=bias)
  cached = supernet.cache_features(model, variables, {"train": x})["train"]
  tx = optax.sgd(0.3, momentum=0.9)
  l2, bs, epochs = 1e-2, 8, 2
  head, _ = supernet.fit_head(head0, cached["features"], y, tx=tx, epochs=epochs,
                              batch_size=bs, seed=5, l2=l2)
  params = supernet.supernet_params(variables, head0)
  ftx = optim.freeze(tx, params, trainable="^head/")
  o = ftx.init(params)

  def loss_of(p, xb, yb):
    logits = supernet.supernet_apply(model, p, xb).logits
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], 1))
    return ce + l2 * (jnp.sum(p["head"]["kernel"] ** 2) + jnp.sum(p["head"]["bias"] ** 2))

  grad = jax.jit(jax.grad(loss_of))
  p = params
  for e in range(epochs):
    for idx in supernet.head_batches(5, e, num_examples=len(x), batch_size=bs):
      u, o = ftx.update(grad(p, x[idx], y[idx]), o, p)
      p = optax.apply_updates(p, u)
  chex.assert_trees_all_close(head, p["head"], rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(params["members"]), jax.tree.leaves(p["members"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # frozen: bit-identical


def _hand_fit_head(head, f, y, tx, epochs, bs, seed):
  """fit_head as a Python loop: (heads after each epoch, mean batch loss of each epoch)."""
  h, o, heads, losses = head, tx.init(head), [head], []
  for e in range(epochs):
    batch_losses = []
    for idx in supernet.head_batches(seed, e, num_examples=len(y), batch_size=bs):
      loss, g = jax.value_and_grad(supernet.head_loss)(h, jnp.asarray(f[idx]), jnp.asarray(y[idx]))
      u, o = tx.update(g, o, h)
      h = optax.apply_updates(h, u)
      batch_losses.append(float(loss))
    heads.append(h)
    losses.append(np.mean(batch_losses))
  return heads, losses


def test_fit_head_history_equals_a_hand_loop(setup):
  model, variables, x, y = setup
  f = supernet.cache_features(model, variables, {"t": x})["t"]["features"]
  head0 = supernet.init_head(jax.random.key(4), num_features=K * D, num_classes=C)
  tx, epochs, bs, seed = optax.adam(0.05), 3, 8, 2
  _, hist = supernet.fit_head(head0, f, y, tx=tx, epochs=epochs, batch_size=bs, seed=seed,
                              eval_sets={"val": (f[:20], y[:20])})
  heads, losses = _hand_fit_head(head0, f, y, tx, epochs, bs, seed)
  assert [r["epoch"] for r in hist] == list(range(epochs + 1))
  for e, (r, h) in enumerate(zip(hist, heads)):
    probs = np.asarray(jax.nn.softmax(apply_linear(h, jnp.asarray(f[:20])), -1))
    assert r["val_accuracy"] == pytest.approx(metrics.accuracy(probs, y[:20]), abs=1e-6)
    assert r["val_nll"] == pytest.approx(metrics.nll(probs, y[:20]), rel=1e-4)
    if e:
      assert r["train_loss"] == pytest.approx(losses[e - 1], rel=1e-5)


def test_fit_head_best_by_returns_the_earliest_best_epoch_of_a_hand_loop(setup):
  model, variables, x, y = setup
  f = supernet.cache_features(model, variables, {"t": x})["t"]["features"]
  head0 = supernet.init_head(jax.random.key(4), num_features=K * D, num_classes=C)
  tx, epochs, bs = optax.adam(0.05), 4, 8
  head, _ = supernet.fit_head(head0, f, y, tx=tx, epochs=epochs, batch_size=bs,
                              eval_sets={"val": (f, y)}, best_by="val_accuracy")
  heads, _ = _hand_fit_head(head0, f, y, tx, epochs, bs, 0)
  accs = [float(np.mean(np.argmax(apply_linear(h, jnp.asarray(f)), -1) == y)) for h in heads]
  best = max(range(len(accs)), key=lambda i: (accs[i], -i))
  chex.assert_trees_all_close(head, heads[best], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="features"):
    supernet.fit_head(head0, f[:, :4], y, tx=optax.sgd(0.1), epochs=1)


def test_fit_head_dropout_equals_explicit_loop(setup):
  """Head training with feature dropout == a Python loop drawing the documented masks."""
  model, variables, x, y = setup
  f = supernet.cache_features(model, variables, {"t": x})["t"]["features"]
  head0 = supernet.init_head(jax.random.key(4), num_features=K * D, num_classes=C)
  tx = optax.sgd(0.2, momentum=0.9)
  rate, bs, seed = 0.3, 8, 11
  head, _ = supernet.fit_head(head0, f, y, tx=tx, epochs=2, batch_size=bs, seed=seed,
                              dropout=rate)
  no_drop, _ = supernet.fit_head(head0, f, y, tx=tx, epochs=2, batch_size=bs, seed=seed)
  h, o = head0, tx.init(head0)
  f = jnp.asarray(f)
  for e in range(2):
    idx_SxB = supernet.head_batches(seed, e, num_examples=len(x), batch_size=bs)
    keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), e), len(idx_SxB))
    for idx, k in zip(idx_SxB, keys):
      keep = jax.random.bernoulli(k, 1 - rate, (bs, K * D))
      fb = jnp.where(keep, f[idx] / (1 - rate), 0.0)
      g = jax.grad(supernet.head_loss)(h, fb, jnp.asarray(y)[idx])
      u, o = tx.update(g, o, h)
      h = optax.apply_updates(h, u)
  chex.assert_trees_all_close(head, h, rtol=1e-4, atol=1e-5)
  assert not np.allclose(head["kernel"], no_drop["kernel"])
  with pytest.raises(ValueError, match="dropout"):
    supernet.fit_head(head0, f, y, tx=tx, epochs=1, dropout=-0.1)


def test_feature_dropout_zeroes_and_rescales():
  f = jnp.ones((200, 50)) * 3.0
  out = np.asarray(supernet.feature_dropout(jax.random.key(0), f, 0.25))
  assert set(np.unique(out)) <= {0.0, 4.0}               # 3 / (1 - 0.25)
  assert abs((out != 0).mean() - 0.75) < 0.02            # 10,000 Bernoulli draws
  assert abs(out.mean() - 3.0) < 0.1                     # expectation preserved
  assert supernet.feature_dropout(jax.random.key(0), f, 0.0) is f
  with pytest.raises(ValueError, match="dropout rate"):
    supernet.feature_dropout(jax.random.key(0), f, 1.0)


def test_head_optimizer_schedules():
  """Cosine: the rate reaches 0 after exactly `steps`; constant: it stays."""
  params, grads = jnp.zeros(()), jnp.ones(())
  momentum_sum = lambda n: (1 - 0.9 ** n) / 0.1  # SGD momentum 0.9 trace after n unit grads
  for schedule in ("cosine", "constant"):
    tx = supernet.head_optimizer("sgd", 0.1, schedule=schedule, steps=12)
    assert tx is supernet.head_optimizer("sgd", 0.1, schedule=schedule, steps=12)  # cached
    state, updates = tx.init(params), []
    for _ in range(13):
      update, state = tx.update(grads, state, params)
      updates.append(float(update))
    if schedule == "cosine":
      lr_11 = 0.1 * 0.5 * (1 + np.cos(np.pi * 11 / 12))
      assert updates[11] == pytest.approx(-lr_11 * momentum_sum(12), rel=1e-5)
      assert updates[12] == 0.0
    else:
      assert updates[12] == pytest.approx(-0.1 * momentum_sum(13), rel=1e-5)
  with pytest.raises(ValueError, match="head schedule"):
    supernet.head_optimizer("sgd", 0.1, schedule="cosin")


def test_loss_quantiles_matches_numpy():
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), size=200)
  y = rng.integers(0, 3, 200)
  out = supernet.loss_quantiles(probs, y)
  loss = -np.log(probs[np.arange(200), y])
  assert out["loss_mean"] == pytest.approx(loss.mean())
  assert out["loss_std"] == pytest.approx(loss.std())
  assert out["loss_p90"] == pytest.approx(np.percentile(loss, 90))
  assert out["loss_p95"] == pytest.approx(np.percentile(loss, 95))
  assert out["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == y))


# --------------------------------------------------------------------------- boost

@pytest.mark.parametrize("model,expected", [
    (MLP(widths=(5, 4), num_classes=3, batch_norm=True),
     ["head", "bn_1", "Dense_1", "bn_0", "Dense_0"]),
    (MLP(widths=(3,) * 11, num_classes=3), ["head"] + [f"Dense_{i}" for i in range(10, -1, -1)]),
], ids=["bn_mlp", "mlp_11_hidden"])
def test_layers_from_top_is_the_creation_order_reversed(model, expected):
  """On variables that went through a jax transformation (keys sorted, as every member's
  are), not the sorted names reversed."""
  x = jnp.ones((1, IN))
  v = jax.eval_shape(model.init, jax.random.key(0), x)
  assert list(v["params"]) == sorted(v["params"])
  assert supernet.layers_from_top(model, v, x) == expected


def test_layerwise_boost_moves_one_layer_per_stage(setup):
  model, variables, x, y = setup
  state = members.init_states(variables, optax.sgd(0.1))
  snapshots = []

  def eval_fn(s):
    snapshots.append(jax.tree.map(np.asarray, s["params"]))
    return {"loss_proxy": np.zeros(K)}

  _, hist = supernet.layerwise_boost(
      state, model=model, stages=[("^head/", 1), ("^Dense_1/", 1)],
      make_tx=lambda steps: optax.sgd(0.1), x=x, y=y, batch_size=8, eval_fn=eval_fn)
  assert [h["stage"] for h in hist] == [0, 1, 2]
  changed = lambda a, b: {n for (n, u), (_, v) in zip(tree_lib.named_leaves(a),
                                                      tree_lib.named_leaves(b))
                          if not np.array_equal(u, v)}
  assert changed(snapshots[0], snapshots[1]) == {"head/kernel", "head/bias"}
  assert changed(snapshots[1], snapshots[2]) == {"Dense_1/kernel", "Dense_1/bias"}


def test_boost_frozen_leaves_bit_identical_and_without_optimizer_state(setup):
  _, _, x, y = setup
  model = MLP(widths=(6, D), num_classes=C, batch_norm=True)
  variables = members.init_members(jax.random.key(5), model, x[:1], K)
  state = members.init_states(variables, optax.sgd(0.1))
  new, _ = supernet.layerwise_boost(state, model=model, stages=[("^head/", 2)],
                                    make_tx=lambda steps: optax.adam(1e-2), x=x, y=y,
                                    batch_size=8)
  for (name, a), (_, b) in zip(tree_lib.named_leaves(state["params"]),
                               tree_lib.named_leaves(new["params"])):
    if name.startswith("head/"):
      assert not np.array_equal(np.asarray(a), np.asarray(b)), name
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  chex.assert_trees_all_equal(state["batch_stats"], new["batch_stats"])  # BN stats frozen too
  # Adam's two moments for the head's leaves only (plus step counts): none for frozen leaves.
  moments = [l for l in jax.tree.leaves(new["opt_state"]) if np.ndim(l) > 1]
  head = tree_lib.count_params(tree_lib.index(new["params"]["head"], 0))
  assert sum(np.size(l) for l in moments) == 2 * K * head


# --------------------------------------------------------------------------- PartitionedMLP

def test_partitioned_mlp_matches_per_part_reference():
  widths, parts = (8, 6), 2
  model = PartitionedMLP(widths=widths, num_classes=C, parts=parts)
  x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  out = jax.jit(model.apply)({"params": params}, x)
  p = jax.tree.map(np.asarray, params["parts"]["mlp"])
  xf = x.reshape(5, -1)
  feats, logits = [], []
  for q in range(parts):  # explicit per-part MLP in NumPy
    h = xf
    for i in range(len(widths)):
      h = np.maximum(h @ p[f"Dense_{i}"]["kernel"][q] + p[f"Dense_{i}"]["bias"][q], 0)
    feats.append(h)
    logits.append(h @ p["head"]["kernel"][q] + p["head"]["bias"][q])
  np.testing.assert_allclose(np.asarray(out.features), np.concatenate(feats, 1), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.logits), np.mean(logits, 0), rtol=1e-5, atol=1e-6)


def test_partitioned_mlp_equals_stacked_members():
  mlp = MLP(widths=(4, 3), num_classes=C)
  x = np.random.default_rng(0).normal(size=(9, IN)).astype(np.float32)
  v = members.init_members(jax.random.key(1), mlp, x[:1], K)
  logits, feats = _member_outputs(mlp, v, x)
  part = PartitionedMLP(widths=(4 * K, 3 * K), num_classes=C, parts=K)
  ref_shapes = jax.tree.map(np.shape, jax.eval_shape(part.init, jax.random.key(0), x)["params"])
  pp = partitioned_from_members(v["params"])
  assert jax.tree.map(np.shape, pp) == ref_shapes
  out = part.apply({"params": pp}, x)
  np.testing.assert_allclose(np.asarray(out.features),
                             np.asarray(supernet.concat_features(feats)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.logits), logits.mean(0), rtol=1e-5, atol=1e-6)
  kp, bp = supernet.partitioned_heads(pp)
  km, bm = supernet.member_heads(v["params"])
  np.testing.assert_array_equal(np.asarray(kp), np.asarray(km))
  np.testing.assert_array_equal(np.asarray(bp), np.asarray(bm))


def test_partitioned_mlp_init_scale_is_per_part():
  """Each part's first layer is LeCun-normal with fan_in = input size (not parts * input)."""
  parts, n_in = 4, 300
  model = PartitionedMLP(widths=(160, 160), num_classes=10, parts=parts)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, n_in), np.float32))["params"]
  for i, fan_in in enumerate([n_in, 160 // parts]):
    std = float(np.std(np.asarray(params["parts"]["mlp"][f"Dense_{i}"]["kernel"])))
    assert std == pytest.approx(1 / np.sqrt(fan_in), rel=0.1), (i, std)


# --------------------------------------------------------------------------- parameter counts

def _count(model, in_dim):
  x = jnp.ones((1, in_dim))
  return tree_lib.count_params(jax.eval_shape(model.init, jax.random.key(0), x)["params"])


@pytest.mark.parametrize("widths", [(7,), (12, 6), (9, 4, 3)])
def test_mlp_params_counts_the_model(widths):
  assert supernet.mlp_params(IN, widths, num_classes=C) == _count(MLP(widths, C), IN)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_supermodel_params_counts_members_without_heads_plus_the_supernet_head(parts):
  widths = (12, 6)
  whole = _count(PartitionedMLP(widths=widths, num_classes=C, parts=parts), IN)
  member_heads = parts * ((widths[-1] // parts) * C + C)
  supernet_head = widths[-1] * C + C
  assert supernet.supermodel_params(IN, widths, num_classes=C, parts=parts) == (
      whole - member_heads + supernet_head)
  with pytest.raises(ValueError, match="divisible"):
    supernet.supermodel_params(IN, (12, 7), num_classes=C, parts=2)


def test_equal_param_widths_is_the_smallest_scale_reaching_the_target():
  widths, target = (40, 20), 1500
  ew = supernet.equal_param_widths(IN, widths, num_classes=C, target=target)
  n = supernet.mlp_params(IN, ew, num_classes=C)
  assert n >= target
  smaller = [max(1, w - 1) for w in ew]
  assert supernet.mlp_params(IN, smaller, num_classes=C) < target
  assert abs(ew[0] / ew[1] - 2) < 0.2  # one common factor


# --------------------------------------------------------------------------- time to accuracy

def test_clock_and_time_to_accuracy_against_a_hand_computation():
  records = [{"epoch": 1, "train_seconds": 2.0, "build_seconds": 0.5, "val_accuracy": 0.6},
             {"epoch": 2, "train_seconds": 3.0, "build_seconds": 1.0, "val_accuracy": 0.8},
             {"epoch": 3, "train_seconds": 1.0, "build_seconds": 2.0, "val_accuracy": 0.75}]
  curve = supernet.clock(records)
  assert [r["member_seconds"] for r in curve] == [2.0, 5.0, 6.0]
  assert [r["seconds"] for r in curve] == [2.5, 6.0, 8.0]           # + this epoch's build
  assert [r["seconds_all_builds"] for r in curve] == [2.5, 6.5, 9.5]  # + every build so far
  to = supernet.time_to_accuracy(curve, [0.5, 0.7, 0.9], fields=("epoch", "seconds"))
  assert to == {"0.5": {"epoch": 1, "seconds": 2.5}, "0.7": {"epoch": 2, "seconds": 6.0},
                "0.9": None}
  single = supernet.clock([{"train_seconds": 1.5}, {"train_seconds": 0.5}])
  assert [r["seconds"] for r in single] == [1.5, 2.0] and "seconds_all_builds" not in single[0]


def test_timed_epochs_equal_one_uninterrupted_fit(setup):
  model, variables, x, y = setup
  tx = optax.sgd(0.1, momentum=0.9)
  batch_fn, spe = train.make_batch_fn(x, y, seed=3, batch_size=8, num_members=K)
  step = members.ensemble_step(model=model, tx=tx, num_members=K)
  state0 = members.init_states(variables, tx)
  ref, _, _ = train.fit(state0, step_fn=step, batch_fn=batch_fn, num_steps=2 * spe,
                        key=jax.random.key(4), progress=False)
  state, firsts = state0, []
  for epoch in range(2):
    state, secs, first = supernet.timed_epoch(state, step_fn=step, batch_fn=batch_fn,
                                              epoch=epoch, steps_per_epoch=spe,
                                              key=jax.random.key(4))
    assert secs > 0
    firsts.append(first)
  assert firsts[0] > 0 and firsts[1] == 0.0
  chex.assert_trees_all_equal(state["params"], ref["params"])
  assert int(state["step"][0]) == 2 * spe
