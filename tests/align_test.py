"""Permutation alignment: invariance of outputs, recovery of known permutations, barriers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import align, models
from ensembling import tree as tree_lib


def _mlp():
  model = models.MLP(widths=(16, 12, 8), num_classes=5)
  x = jax.random.normal(jax.random.key(1), (7, 4, 5))
  return model, jax.jit(model.init)(jax.random.key(0), x), x


def _cnn():
  model = models.CNN(num_classes=4, stages=(4, 6), dropouts=(0.0, 0.0))
  x = jax.random.normal(jax.random.key(1), (3, 12, 12, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  # random running statistics, so that forgetting to permute them would show
  rng = np.random.default_rng(0)
  variables["batch_stats"] = jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), variables["batch_stats"])
  variables["params"] = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 * jnp.asarray(rng.normal(size=v.shape), v.dtype)
      if "bn" in tree_lib.path_str(p) else v, variables["params"])
  return model, variables, x


def _bn_mlp():
  model = models.MLP(widths=(16, 12, 8), num_classes=5, batch_norm=True)
  x = jax.random.normal(jax.random.key(1), (7, 4, 5))
  v = jax.jit(model.init)(jax.random.key(0), x)
  # random running statistics and BatchNorm params (centred so that ReLUs stay alive in
  # eval mode), so that forgetting to permute any of them would change the logits
  rng = np.random.default_rng(0)
  noise = lambda v, s: v + s * jnp.asarray(rng.normal(size=v.shape), v.dtype)
  stats = {n: {"mean": noise(s["mean"], 0.3), "var": s["var"] * jnp.asarray(
      rng.uniform(0.5, 1.5, s["var"].shape), jnp.float32)} for n, s in v["batch_stats"].items()}
  params = {n: jax.tree.map(lambda a: noise(a, 0.3), p) if n.startswith("bn") else p
            for n, p in v["params"].items()}
  return model, {"params": params, "batch_stats": stats}, x


def test_mlp_spec_from_structure():
  _, v, _ = _mlp()
  spec = align.mlp_permutation_spec(v)
  assert sorted(spec.perm_to_axes) == ["P_Dense_0", "P_Dense_1", "P_Dense_2"]
  assert spec.axes_to_perm["params/Dense_0/kernel"] == (None, "P_Dense_0")
  assert spec.axes_to_perm["params/Dense_1/kernel"] == ("P_Dense_0", "P_Dense_1")
  assert spec.axes_to_perm["params/head/kernel"] == ("P_Dense_2", None)
  assert spec.axes_to_perm["params/head/bias"] == (None,)
  assert align.perm_sizes(spec, v) == {"P_Dense_0": 16, "P_Dense_1": 12, "P_Dense_2": 8}
  with pytest.raises(ValueError, match="Not an MLP"):
    align.mlp_permutation_spec({"params": {"conv0_0": {"kernel": jnp.ones((3, 3, 1, 2))}}})


def _assert_same_function(model, spec, v, x, perm):
  """The permuted variables compute the same logits (eval mode and, with BatchNorm,
  train mode, whose updated running statistics are the permuted ones)."""
  pv = align.apply_permutation(spec, perm, v)
  # the weights really moved ...
  assert not np.allclose(pv["params"]["head"]["kernel"], v["params"]["head"]["kernel"])
  # ... but the function did not
  apply = jax.jit(model.apply)
  out, pout = apply(v, x), apply(pv, x)
  assert np.std(np.asarray(out.logits), axis=0).min() > 1e-3  # not a constant function
  np.testing.assert_allclose(pout.logits, out.logits, rtol=1e-5, atol=1e-5)
  if "batch_stats" in v:  # train mode: batch statistics and their running averages
    train_apply = jax.jit(lambda t: model.apply(t, x, train=True, mutable=["batch_stats"]))
    (o1, s1), (o2, s2) = train_apply(v), train_apply(pv)
    np.testing.assert_allclose(o2.logits, o1.logits, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(align.apply_permutation(spec, perm, s1), s2,
                                rtol=1e-5, atol=1e-6)
  return pv


@pytest.mark.parametrize("make,spec_fn", [(_mlp, align.mlp_permutation_spec),
                                          (_bn_mlp, align.mlp_permutation_spec),
                                          (_cnn, align.cnn_permutation_spec)])
def test_permuted_network_computes_the_same_function(make, spec_fn):
  model, v, x = make()
  spec = spec_fn(v)
  perm = align.random_permutation(3, spec, v)
  assert any((p != np.arange(len(p))).any() for p in perm.values())
  _assert_same_function(model, spec, v, x, perm)
  if make is _cnn:
    assert "batch_stats/bn1_1/mean" in spec.axes_to_perm
    # the CNN's head follows a flatten of (3, 3, 6): viewed as (9, 6, classes)
    assert spec.views["params/head/kernel"] == (9, 6, 4)


def test_bn_mlp_spec_permutes_batchnorm():
  _, v, _ = _bn_mlp()
  spec = align.mlp_permutation_spec(v)
  for i in range(3):
    for leaf in ("params/bn_{i}/scale", "params/bn_{i}/bias", "batch_stats/bn_{i}/mean",
                 "batch_stats/bn_{i}/var"):
      assert spec.axes_to_perm[leaf.format(i=i)] == (f"P_Dense_{i}",)


@pytest.mark.parametrize("make,spec_fn", [(_mlp, align.mlp_permutation_spec),
                                          (_bn_mlp, align.mlp_permutation_spec),
                                          (_cnn, align.cnn_permutation_spec)])
def test_weight_matching_recovers_a_known_permutation(make, spec_fn):
  _, v, _ = make()
  spec = spec_fn(v)
  true = align.random_permutation(7, spec, v)
  shuffled = align.apply_permutation(spec, true, v)
  perm = align.weight_matching(jax.random.key(0), spec, v, shuffled, max_iter=20)
  chex.assert_trees_all_close(align.apply_permutation(spec, perm, shuffled), v)
  # perm undoes `true`: new unit i is shuffled unit perm[i] = original unit true[perm[i]]
  for p in true:
    np.testing.assert_array_equal(true[p][perm[p]], np.arange(len(perm[p])))


def test_weight_matching_increases_similarity_of_unrelated_networks():
  model = models.MLP(widths=(32, 32), num_classes=3)
  x = jnp.ones((1, 6))
  a, b = (model.init(jax.random.key(s), x) for s in (0, 1))
  spec = align.mlp_permutation_spec(a)
  perm = align.weight_matching(0, spec, a, b, max_iter=50)
  pb = align.apply_permutation(spec, perm, b)
  inner = lambda t: sum(float(jnp.vdot(u, w)) for u, w in
                        zip(jax.tree.leaves(a), jax.tree.leaves(t)))
  assert inner(pb) > inner(b)
  np.testing.assert_allclose(model.apply(pb, x[:1] * 0.3).logits,
                             model.apply(b, x[:1] * 0.3).logits, rtol=1e-5, atol=1e-6)


def test_interpolation_and_barrier():
  model, v, x = _mlp()
  spec = align.mlp_permutation_spec(v)
  pv = align.apply_permutation(spec, align.random_permutation(1, spec, v), v)
  apply = jax.jit(model.apply)
  ref = apply(v, x).logits
  ev = lambda t: {"dist": float(jnp.mean((apply(t, x).logits - ref) ** 2))}
  alphas = np.linspace(0, 1, 5)
  naive = align.interpolation_curve(ev, v, pv, alphas)["dist"]
  assert naive[0] == pytest.approx(0, abs=1e-10) and naive[-1] == pytest.approx(0, abs=1e-9)
  assert align.barrier(naive, alphas) > 1e-3
  fixed = align.apply_permutation(spec, align.weight_matching(0, spec, v, pv), pv)
  aligned = align.interpolation_curve(ev, v, fixed, alphas)["dist"]
  assert align.barrier(aligned, alphas) == pytest.approx(0, abs=1e-9)
  # barrier against a hand computation
  vals, al = [1.0, 3.0, 2.0], [0.0, 0.5, 1.0]
  assert align.barrier(vals, al) == pytest.approx(1.5)
  assert align.barrier([0.9, 0.5, 0.7], al, higher_is_better=True) == pytest.approx(0.3)
  with pytest.raises(ValueError):
    align.barrier([1, 2], [0.2, 1.0])


# --------------------------------------------------------------------------- ResNet

def _resnet(**kwargs):
  model = models.ResNet(num_classes=3, **kwargs)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  v = jax.jit(model.init)(jax.random.key(0), x)
  # random running statistics (centred, so ReLUs stay alive) and BatchNorm params
  rng = np.random.default_rng(1)
  noise = lambda a, s: a + s * jnp.asarray(rng.normal(size=a.shape), a.dtype)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, a: noise(a, 0.2) if tree_lib.path_str(p).endswith("mean")
      else a * jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), v["batch_stats"])
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: noise(a, 0.3) if "bn" in tree_lib.path_str(p) else a, v["params"])
  return model, {"params": params, "batch_stats": stats}, x


@pytest.mark.parametrize("kwargs", [{}, {"blocks_per_stage": 1, "widths": (4, 6, 8),
                                         "width_multiplier": 2}],
                         ids=["resnet20", "width_multiplier"])
def test_resnet_permutation_keeps_the_function(kwargs):
  model, v, x = _resnet(**kwargs)
  spec = align.resnet_permutation_spec(v)
  blocks = kwargs.get("blocks_per_stage", 3)
  # one permutation per residual stream (3 stages) plus one inside every block
  assert len(spec.perm_to_axes) == 3 + 3 * blocks
  # a stage's stream permutation is shared by all its blocks, its shortcut and the head
  assert spec.axes_to_perm["params/stage1_block0/proj/kernel"] == (None, None, "P_res0",
                                                                   "P_res1")
  assert spec.axes_to_perm[f"params/stage2_block{blocks - 1}/conv2/kernel"] == (
      None, None, f"P_stage2_block{blocks - 1}_inner", "P_res2")
  assert spec.axes_to_perm["batch_stats/stage2_block0/bn_proj/var"] == ("P_res2",)
  assert spec.axes_to_perm["params/head/kernel"] == ("P_res2", None)
  named = {n for n, _ in tree_lib.named_leaves(v)}
  assert set(spec.axes_to_perm) == named  # every leaf is covered
  perm = align.random_permutation(5, spec, v)
  _assert_same_function(model, spec, v, x, perm)


def test_resnet_weight_matching_recovers_a_known_permutation():
  _, v, _ = _resnet(blocks_per_stage=1, widths=(4, 6, 8))
  spec = align.resnet_permutation_spec(v)
  true = align.random_permutation(2, spec, v)
  shuffled = align.apply_permutation(spec, true, v)
  perm = align.weight_matching(0, spec, v, shuffled, max_iter=30)
  chex.assert_trees_all_close(align.apply_permutation(spec, perm, shuffled), v)
  with pytest.raises(ValueError, match="Not a ResNet"):
    align.resnet_permutation_spec(_mlp()[1])


# --------------------------------------------------------------------------- MergeMany

@pytest.mark.parametrize("make,spec_fn", [(_mlp, align.mlp_permutation_spec),
                                          (_bn_mlp, align.mlp_permutation_spec)])
def test_merge_many_recovers_a_common_permutation(make, spec_fn):
  model, v, x = make()
  spec = spec_fn(v)
  trues = [align.random_permutation(10 + i, spec, v) for i in range(4)]
  copies = [align.apply_permutation(spec, t, v) for t in trues]
  res = align.merge_many(jax.random.key(0), spec, copies, max_iter=20)
  assert res.converged and res.rounds >= 2  # a last round that changed nothing
  # each aligned model is its input permuted by the returned permutation ...
  for c, p, m in zip(copies, res.perms, res.models):
    chex.assert_trees_all_close(align.apply_permutation(spec, p, c), m)
  # ... and all of them are one common permutation `common` of the original
  common = align._compose(trues[0], res.perms[0])
  for t, p in zip(trues, res.perms):
    composed = align._compose(t, p)
    for name in common:
      np.testing.assert_array_equal(composed[name], common[name])
  target = align.apply_permutation(spec, common, v)
  for m in res.models:
    chex.assert_trees_all_close(m, target)
  chex.assert_trees_all_close(res.mean, target, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.apply(res.mean, x).logits, model.apply(v, x).logits,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="at least 2"):
    align.merge_many(0, spec, copies[:1])


# --------------------------------------------------------------------------- activations

@pytest.mark.parametrize("make", [_mlp, _bn_mlp])
@pytest.mark.parametrize("similarity", ["correlation", "inner"])
def test_activation_matching_recovers_a_known_permutation(make, similarity):
  model, v, _ = make()
  spec = align.mlp_permutation_spec(v)
  true = align.random_permutation(4, spec, v)
  shuffled = align.apply_permutation(spec, true, v)
  xs = [np.asarray(jax.random.normal(jax.random.key(s), (64, 4, 5))) for s in range(2)]
  fn = align.mlp_activations(model)
  acts_a = align.collect_activations(fn, v, xs)
  acts_b = align.collect_activations(fn, shuffled, xs)
  assert acts_a["P_Dense_1"].shape == (128, 12)
  # the activations are hidden units after the (BatchNorm and) ReLU
  p = v["params"]
  h0 = np.asarray(xs[0]).reshape(64, -1) @ np.asarray(p["Dense_0"]["kernel"]) + np.asarray(
      p["Dense_0"]["bias"])
  if "bn_0" in p:
    s = v["batch_stats"]["bn_0"]
    h0 = ((h0 - np.asarray(s["mean"])) / np.sqrt(np.asarray(s["var"]) + 1e-5)
          * np.asarray(p["bn_0"]["scale"]) + np.asarray(p["bn_0"]["bias"]))
  np.testing.assert_allclose(acts_a["P_Dense_0"][:64], np.maximum(h0, 0), rtol=1e-4, atol=1e-4)
  perm = align.activation_matching(spec, acts_a, acts_b, similarity=similarity)
  chex.assert_trees_all_close(align.apply_permutation(spec, perm, shuffled), v)
  for name in true:
    np.testing.assert_array_equal(true[name][perm[name]], np.arange(len(perm[name])))
  with pytest.raises(ValueError, match="missing \\['P_Dense_2'\\]"):
    align.activation_matching(spec, {k: a for k, a in acts_a.items() if k != "P_Dense_2"},
                              acts_b)


def test_resnet_activations_follow_the_permutation_and_are_recovered():
  model, v, x = _resnet(blocks_per_stage=1, widths=(4, 6))
  spec = align.resnet_permutation_spec(v)
  fn = align.resnet_activations(model, spec)
  acts = align.collect_activations(fn, v, [np.asarray(x)])
  assert set(acts) == set(spec.perm_to_axes)
  # stream 0: the stem's relu(bn) and the block of stage 0 (3 x 8 x 8 positions each)
  assert acts["P_res0"].shape == (2 * 3 * 64, 4) and acts["P_res1"].shape == (3 * 16, 6)
  # reference: the stem, by hand (conv without bias, BN in inference mode, ReLU)
  p, s = v["params"], v["batch_stats"]
  stem = jax.lax.conv_general_dilated(x, p["stem"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  stem = ((stem - s["bn_stem"]["mean"]) / jnp.sqrt(s["bn_stem"]["var"] + 1e-5)
          * p["bn_stem"]["scale"] + p["bn_stem"]["bias"])
  np.testing.assert_allclose(acts["P_res0"][:3 * 64], np.maximum(stem, 0).reshape(-1, 4),
                             rtol=1e-4, atol=1e-4)
  # the last stream's last rows are the features the head reads, before pooling
  out = model.apply(v, x)
  np.testing.assert_allclose(acts["P_res1"][-3 * 16:].reshape(3, 16, 6).mean(1),
                             out.features, rtol=1e-4, atol=1e-5)
  # permuting the network permutes its units (new unit i = old unit perm[i]) ...
  true = align.random_permutation(3, spec, v)
  shuffled = align.apply_permutation(spec, true, v)
  acts_b = align.collect_activations(fn, shuffled, [np.asarray(x)])
  for name, a in acts.items():
    np.testing.assert_allclose(acts_b[name], a[:, true[name]], rtol=1e-4, atol=1e-5)
  # ... and activation matching undoes it
  perm = align.activation_matching(spec, acts, acts_b)
  chex.assert_trees_all_close(align.apply_permutation(spec, perm, shuffled), v)
  with pytest.raises(ValueError, match="resnet_permutation_spec"):
    align.resnet_activations(model, align.mlp_permutation_spec(_mlp()[1]))(v, x)


def test_align_models_brings_permuted_copies_together_by_every_method():
  model, v, _ = _mlp()
  spec = align.mlp_permutation_spec(v)
  copies = [align.apply_permutation(spec, align.random_permutation(20 + i, spec, v), v)
            for i in range(3)]
  batches = [np.asarray(jax.random.normal(jax.random.key(7), (64, 4, 5)))]
  kw = dict(activations_fn=align.mlp_activations(model), batches=batches, max_iter=20)
  for method in align.ALIGN_METHODS:
    out = align.align_models(0, spec, copies, method=method, reference=1, **kw)
    assert len(out) == 3
    if method == "naive":
      assert all(o is c for o, c in zip(out, copies))
      continue
    if method != "merge_many":  # aligned to the reference, which is returned unchanged
      assert out[1] is copies[1]
    for o in out:
      chex.assert_trees_all_close(o, out[1])
  with pytest.raises(ValueError, match="Unknown alignment method"):
    align.align_models(0, spec, copies, method="git")
  with pytest.raises(ValueError, match="needs an activations_fn"):
    align.align_models(0, spec, copies, method="activation_matching")
