"""SuperNet head, freezing, cached-feature training, layer-wise boost, PartitionedMLP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import ensemble, members, supernet
from ensembling import tree as tree_lib
from ensembling.models import MLP, PartitionedMLP
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
  logits, feats = members.predict(model.apply, variables, x, batch_size=len(x),
                                  with_features=True)
  return np.asarray(logits), np.asarray(feats)


def test_concat_features_is_member_major():
  f = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.float32)  # K=2, N=3, D=4
  out = np.asarray(supernet.concat_features(f))
  ref = np.stack([np.concatenate([f[0, n], f[1, n]]) for n in range(3)])
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(
      np.asarray(supernet.first_members(out, num_members=1, feature_dim=4)), f[0])
  with pytest.raises(ValueError, match="num_members"):
    supernet.first_members(out, num_members=3, feature_dim=4)


def test_copied_head_matches_member_logits(setup):
  model, variables, x, _ = setup
  logits, feats = _member_outputs(model, variables, x)
  kern, bias = supernet.member_heads(variables["params"])
  f = supernet.concat_features(feats)
  # copy_scaled with the default 1/K: exactly the average of the members' logits.
  head = supernet.init_head(jax.random.key(1), num_features=K * D, num_classes=C,
                            init="copy_scaled", kernels_KxDxC=kern, biases_KxC=bias)
  np.testing.assert_allclose(np.asarray(supernet.apply_head(head, f)),
                             np.asarray(ensemble.average_logits(logits)), rtol=1e-5, atol=1e-5)
  # copy: sum of the members' pre-bias logits plus the mean bias (explicit loop).
  head = supernet.init_head(jax.random.key(1), num_features=K * D, num_classes=C,
                            init="copy", kernels_KxDxC=kern, biases_KxC=bias)
  ref = sum(feats[k] @ np.asarray(kern[k]) for k in range(K)) + np.asarray(bias).mean(0)
  np.testing.assert_allclose(np.asarray(supernet.apply_head(head, f)), ref, rtol=1e-5, atol=1e-5)
  # a given factor scales the kernel only.
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
  out = supernet.supernet_apply(model.apply, params, x)
  cached = supernet.cache_features(model.apply, variables, {"x": x}, batch_size=16)
  np.testing.assert_allclose(np.asarray(out.features), cached["x"]["features"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.logits),
                             np.asarray(supernet.apply_head(head, cached["x"]["features"])),
                             rtol=1e-5, atol=1e-5)
  out_u = supernet.supernet_apply(model.apply, params, x, strategy="unroll")
  np.testing.assert_allclose(np.asarray(out_u.logits), np.asarray(out.logits), rtol=1e-5,
                             atol=1e-6)


def test_train_only_freezes_members_bit_identical(setup):
  model, variables, x, y = setup
  head = supernet.init_head(jax.random.key(2), num_features=K * D, num_classes=C)
  params = supernet.supernet_params(variables, head)
  tx = supernet.train_only(optax.adam(1e-2), params, "^head/")
  opt_state = tx.init(params)

  @jax.jit
  def step(p, o):
    loss_of = lambda p: supernet.head_loss(p["head"], supernet_feats(p), y)
    supernet_feats = lambda p: supernet.supernet_apply(model.apply, p, x).features
    g = jax.grad(loss_of)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, g

  new = params
  for _ in range(3):
    new, opt_state, grads = step(new, opt_state)
  # members received non-zero gradients but did not move by a single bit.
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["members"]))
  for a, b in zip(jax.tree.leaves(params["members"]), jax.tree.leaves(new["members"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(params["head"]["kernel"]), np.asarray(new["head"]["kernel"]))
  # frozen leaves hold no optimizer state (set_to_zero is stateless).
  n_state = sum(np.size(l) for l in jax.tree.leaves(opt_state))
  assert n_state <= 2 * tree_lib.count_params(head) + 8


def test_train_only_no_match_is_an_error(setup):
  _, variables, _, _ = setup
  with pytest.raises(ValueError, match="No parameter path matches"):
    supernet.train_only(optax.sgd(0.1), variables["params"], "^nothere/")


def test_fit_head_equals_full_supernet_training(setup):
  """Cached-feature head training == frozen full-SuperNet training on the same batches."""
  model, variables, x, y = setup
  kern, bias = supernet.member_heads(variables["params"])
  head0 = supernet.init_head(jax.random.key(3), num_features=K * D, num_classes=C,
                             init="copy_scaled", kernels_KxDxC=kern, biases_KxC=bias)
  cached = supernet.cache_features(model.apply, variables, {"train": x})["train"]
  tx = optax.sgd(0.3, momentum=0.9)
  l2, bs, epochs = 1e-2, 8, 2
  head, hist = supernet.fit_head(head0, cached["features"], y, tx=tx, epochs=epochs,
                                 batch_size=bs, seed=5, l2=l2,
                                 eval_sets={"train": (cached["features"], y)})
  assert len(hist) == epochs + 1 and "train_accuracy" in hist[-1]

  # Reference: the whole SuperNet, members frozen by train_only, explicit Python loop.
  params = supernet.supernet_params(variables, head0)
  ftx = supernet.train_only(tx, params, "^head/")
  o = ftx.init(params)

  def loss_of(p, xb, yb):
    logits = supernet.supernet_apply(model.apply, p, xb).logits
    logp = jax.nn.log_softmax(logits)
    ce = -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))
    return ce + l2 * (jnp.sum(p["head"]["kernel"] ** 2) + jnp.sum(p["head"]["bias"] ** 2))

  grad = jax.jit(jax.grad(loss_of))
  p = params
  for e in range(epochs):
    for idx in supernet.head_batches(5, e, num_examples=len(x), batch_size=bs):
      u, o = ftx.update(grad(p, x[idx], y[idx]), o, p)
      p = optax.apply_updates(p, u)
  chex.assert_trees_all_close(head, p["head"], rtol=1e-4, atol=1e-5)


def test_fit_head_best_by_returns_best_epoch(setup):
  model, variables, x, y = setup
  f = supernet.cache_features(model.apply, variables, {"t": x})["t"]["features"]
  head0 = supernet.init_head(jax.random.key(4), num_features=K * D, num_classes=C)
  head, hist = supernet.fit_head(head0, f, y, tx=optax.adam(0.05), epochs=4, batch_size=8,
                                 eval_sets={"val": (f, y)}, best_by="val_accuracy")
  best = max(range(len(hist)), key=lambda i: (hist[i]["val_accuracy"], -i))
  acc, _ = supernet._head_eval(head, jnp.asarray(f), jnp.asarray(y))
  assert float(acc) == pytest.approx(hist[best]["val_accuracy"])
  with pytest.raises(ValueError, match="features"):
    supernet.fit_head(head0, f[:, :4], y, tx=optax.sgd(0.1), epochs=1)


def test_layerwise_boost_moves_one_layer_per_stage(setup):
  model, variables, x, y = setup
  tx0 = optax.sgd(0.1)
  state = members.init_states(variables, tx0)
  assert supernet.layers_from_top(tree_lib.index(variables["params"], 0)) == [
      "head", "Dense_1", "Dense_0"]
  snapshots = []

  def eval_fn(s):
    snapshots.append(jax.tree.map(np.asarray, s["params"]))
    return {"loss_proxy": np.zeros(K)}

  _, hist = supernet.layerwise_boost(
      state, apply_fn=model.apply, stages=[("^head/", 1), ("^Dense_1/", 1)],
      make_tx=lambda steps: optax.sgd(0.1), x=x, y=y, batch_size=8, eval_fn=eval_fn)
  assert [h["stage"] for h in hist] == [0, 1, 2]
  changed = lambda a, b: {n for (n, u), (_, v) in zip(tree_lib.named_leaves(a),
                                                      tree_lib.named_leaves(b))
                          if not np.array_equal(u, v)}
  assert changed(snapshots[0], snapshots[1]) == {"head/kernel", "head/bias"}
  assert changed(snapshots[1], snapshots[2]) == {"Dense_1/kernel", "Dense_1/bias"}


def test_partitioned_mlp_matches_per_part_reference():
  widths, parts = (8, 6), 2
  model = PartitionedMLP(widths=widths, num_classes=C, parts=parts)
  x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  out = jax.jit(model.apply)({"params": params}, x)
  p = jax.tree.map(np.asarray, params)
  xf = x.reshape(5, -1)
  feats, logits = [], []
  for q in range(parts):  # explicit per-part MLP in NumPy
    h = xf
    for i in range(len(widths)):
      h = np.maximum(h @ p[f"kernel_{i}"][q] + p[f"bias_{i}"][q, 0], 0)
    feats.append(h)
    logits.append(h @ p["head_kernel"][q] + p["head_bias"][q, 0])
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
  # The parts' heads are the members' heads.
  kp, bp = supernet.partitioned_heads(pp)
  km, bm = supernet.member_heads(v["params"])
  np.testing.assert_array_equal(np.asarray(kp), np.asarray(km))
  np.testing.assert_array_equal(np.asarray(bp), np.asarray(bm))


def test_partitioned_mlp_init_scale_is_per_part():
  """Each part's first layer is LeCun-normal with fan_in = input size (not parts * input)."""
  parts, n_in = 4, 300
  model = PartitionedMLP(widths=(160, 160), num_classes=10, parts=parts)
  x = np.zeros((1, n_in), np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  # nn.Dense's LeCun normal: std = 1 / sqrt(fan_in), fan_in = one part's input size.
  for i, fan_in in enumerate([n_in, 160 // parts]):
    std = float(np.std(np.asarray(params[f"kernel_{i}"])))
    assert std == pytest.approx(1 / np.sqrt(fan_in), rel=0.1), (i, std)


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


def test_feature_dropout_zeroes_and_rescales():
  f = jnp.ones((200, 50)) * 3.0
  out = np.asarray(supernet.feature_dropout(jax.random.key(0), f, 0.25))
  kept = out != 0
  assert set(np.unique(out)) <= {0.0, 4.0}               # 3 / (1 - 0.25)
  assert abs(kept.mean() - 0.75) < 0.02                  # 10,000 Bernoulli draws
  assert abs(out.mean() - 3.0) < 0.1                     # expectation preserved
  assert supernet.feature_dropout(jax.random.key(0), f, 0.0) is f
  with pytest.raises(ValueError, match="dropout rate"):
    supernet.feature_dropout(jax.random.key(0), f, 1.0)


def test_fit_head_dropout_equals_explicit_loop(setup):
  """Head training with feature dropout == a Python loop drawing the documented masks."""
  model, variables, x, y = setup
  f = supernet.cache_features(model.apply, variables, {"t": x})["t"]["features"]
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
