"""Shared-head alignment: adapters, fine-tuning, freezing, combination, the group recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import losses, models, optim, shared_head, train
from ensembling import tree as tree_lib


def _bytes(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _synthetic(seed=0, n=600, c=4, d=8, f=12):
  """Class clusters in a D-dim space seen through an unknown linear map to F dims."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(c, d)).astype(np.float32)
  y = rng.integers(0, c, n).astype(np.int32)
  z = centers[y] + 0.3 * rng.normal(size=(n, d))
  mix = rng.normal(size=(d, f))
  return (z @ mix).astype(np.float32), y, centers


def _encoder(in_dim=12, width=16, seed=1):
  model = models.MLP(widths=(width,), num_classes=1)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, in_dim)))
  return model, variables


def _arcface(widths=(16,), seed=0, in_dim=12, num_classes=4, embedding_dim=8):
  model = models.with_arcface(models.MLP(widths=widths), num_classes=num_classes,
                              embedding_dim=embedding_dim, scale=16.0)
  return model, jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, in_dim)))


# --------------------------------------------------------------------------- fit_aligned

def test_adapter_only_training_leaves_encoder_and_head_bit_identical():
  x, y, centers = _synthetic()
  model, enc = _encoder()
  head = {"centers": jnp.asarray(centers)}
  params = shared_head.init_aligned(jax.random.key(0), encoder=enc, head=head, in_dim=16)
  before = jax.tree.map(np.array, params)
  trained, _ = shared_head.fit_aligned(
      params, x, y, tx=optax.adam(1e-2), trainable=shared_head.ADAPTER_ONLY, num_steps=20,
      batch_size=32, encode_fn=shared_head.flax_encoder(model), scale=16.0, margin=0.3)
  assert _bytes(trained["encoder"]) == _bytes(before["encoder"])
  assert _bytes(trained["head"]) == _bytes(before["head"])
  for a, b in zip(jax.tree.leaves(trained["adapter"]), jax.tree.leaves(before["adapter"])):
    assert not np.array_equal(a, b)


def test_finetune_trains_encoder_under_frozen_head():
  x, y, centers = _synthetic(1)
  model, enc = _arcface()
  params = shared_head.init_aligned(None, encoder=enc, head={"centers": jnp.asarray(centers)})
  assert params["adapter"] == {}
  before = jax.tree.map(np.array, params)
  trained, _ = shared_head.fit_aligned(
      params, x, y, tx=optax.sgd(0.05), trainable=("^encoder/params/(backbone|embed)/",),
      num_steps=20, batch_size=32, encode_fn=shared_head.flax_encoder(model), scale=16.0)
  assert _bytes(trained["head"]) == _bytes(before["head"])
  # The model's own (unused) head is outside `trainable` and must not move either.
  assert _bytes(trained["encoder"]["params"]["head"]) == _bytes(
      before["encoder"]["params"]["head"])
  assert all(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(trained["encoder"]["params"]["embed"]),
                 jax.tree.leaves(before["encoder"]["params"]["embed"])))


def test_adapter_on_precomputed_features_learns_the_shared_space():
  x, y, centers = _synthetic(2, n=800)
  head = {"centers": jnp.asarray(centers)}
  params = shared_head.init_aligned(jax.random.key(3), encoder={}, head=head, in_dim=12)
  acc = lambda p: float(np.mean(np.argmax(
      shared_head.classify(shared_head.embed(p, x[600:]), head), -1) == y[600:]))
  assert acc(params) < 0.6
  params, loss = shared_head.fit_aligned(params, x[:600], y[:600], tx=optax.adam(1e-2),
                                         num_steps=300, batch_size=64, scale=16.0, margin=0.3)
  assert acc(params) > 0.9
  assert loss[-10:].mean() < loss[:10].mean()
  assert _bytes(params["head"]) == _bytes(head)


def test_fit_aligned_batches_follow_make_batch_fn():
  """Precomputed features and a zero-margin loss: step t's loss is that of batch_fn(t)."""
  x, y, centers = _synthetic(3, n=64)
  head = {"centers": jnp.asarray(centers)}
  params = shared_head.init_aligned(jax.random.key(0), encoder={}, head=head, in_dim=12)
  _, loss = shared_head.fit_aligned(params, x, y, tx=optax.sgd(0.0), num_steps=3,
                                    batch_size=16, scale=4.0, margin=0.0, seed=5)
  batch_fn, _ = train.make_batch_fn(x, y, seed=5, batch_size=16)
  want = [shared_head.aligned_loss(params, batch_fn(t), None, encode_fn=None, scale=4.0,
                                   margin=0.0) for t in range(3)]
  np.testing.assert_allclose(loss, want, rtol=1e-6)


# --------------------------------------------------------------------------- freezing

def test_freeze_keeps_no_optimizer_state_for_frozen_leaves():
  params = {"encoder": {"w": jnp.ones((3, 2))}, "adapter": {"kernel": jnp.ones((2, 2)),
                                                            "bias": jnp.zeros((2,))},
            "head": {"centers": jnp.ones((4, 2))}}
  tx = optim.freeze(optax.adam(0.1), params, trainable=shared_head.ADAPTER_ONLY)
  state = tx.init(params)
  assert tree_lib.count_params(state) == 2 * 6 + 1  # mu, nu of the 6 adapter numbers + count
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert not np.any(updates["encoder"]["w"]) and not np.any(updates["head"]["centers"])
  assert np.all(np.asarray(updates["adapter"]["kernel"]) != 0)


def test_finetune_patterns_train_encoder_and_adapter_only():
  params = {"encoder": {"w": 1.0}, "adapter": {"kernel": 1.0, "bias": 1.0},
            "head": {"centers": 1.0}}
  assert optim.trainable_mask(params, shared_head.FINETUNE) == {
      "encoder": {"w": True}, "adapter": {"kernel": True, "bias": True},
      "head": {"centers": False}}
  with pytest.raises(ValueError, match="No parameter is trainable"):
    optim.freeze(optax.sgd(1.0), params, trainable=("^nothing/",))


def test_frozen_leaves_unchanged_sees_one_changed_bit():
  before = {"adapter": {"w": np.ones(3, np.float32)}, "head": {"c": np.ones(3, np.float32)}}
  after = jax.tree.map(np.copy, before)
  after["adapter"]["w"][0] = 2.0
  assert shared_head.frozen_leaves_unchanged(before, after, trainable=shared_head.ADAPTER_ONLY)
  after["head"]["c"][1] = np.nextafter(np.float32(1.0), np.float32(2.0))
  assert not shared_head.frozen_leaves_unchanged(before, after,
                                                 trainable=shared_head.ADAPTER_ONLY)


# --------------------------------------------------------------------------- pieces

def test_combine_is_the_mean_of_normalised_embeddings():
  e = np.random.default_rng(0).normal(size=(3, 5, 4)).astype(np.float32)
  want = (e / np.linalg.norm(e, axis=-1, keepdims=True)).mean(0)
  np.testing.assert_allclose(shared_head.combine(e), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(shared_head.combine(list(e)), want, rtol=1e-5, atol=1e-6)


def test_classify_is_cosine_logits_under_the_head():
  rng = np.random.default_rng(1)
  e, centers = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(3, 4))
  np.testing.assert_allclose(shared_head.classify(e, {"centers": centers.astype(np.float32)}),
                             losses.cosine_logits(jnp.asarray(e), jnp.asarray(centers,
                                                                              jnp.float32)))


def test_select_best_and_errors():
  assert shared_head.select_best([0.2, 0.7, 0.7]) == 1
  assert shared_head.select_best([0.2, 0.7, 0.1], higher_is_better=False) == 2
  with pytest.raises(ValueError, match="non-empty"):
    shared_head.select_best([])
  with pytest.raises(ValueError, match="finite"):
    shared_head.select_best([0.1, float("nan")])


def test_init_and_shared_embeddings_errors():
  head = {"centers": np.ones((3, 4), np.float32)}
  params = shared_head.init_aligned(jax.random.key(0), encoder={}, head=head, in_dim=6)
  with pytest.raises(ValueError, match="expects 6 input features"):
    shared_head.shared_embeddings(params, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="centers"):
    shared_head.init_aligned(None, encoder={}, head={"w": 1})


def test_encoder_for_modes():
  model, v = _arcface()
  x = jnp.ones((2, 12))
  enc, fn, needs, trainable = shared_head.encoder_for(model, v, mode="adapter")
  assert set(enc) == {"params"} and set(enc["params"]) == set(v["params"]["backbone"])
  assert needs and trainable == shared_head.ADAPTER_ONLY and fn(enc, x, train=False,
                                                               key=None).shape == (2, 16)
  enc, fn, needs, _ = shared_head.encoder_for(model, v, mode="adapter",
                                              adapter_input="embedding")
  np.testing.assert_array_equal(fn(enc, x, train=False, key=None),
                                model.apply(v, x).features)
  _, _, needs, trainable = shared_head.encoder_for(model, v, mode="finetune")
  assert not needs and trainable == ("^encoder/params/(backbone|embed)/",)
  with pytest.raises(ValueError, match="alignment mode"):
    shared_head.encoder_for(model, v, mode="retrain")
  with pytest.raises(ValueError, match="adapter_input"):
    shared_head.encoder_for(model, v, mode="adapter", adapter_input="logits")


# --------------------------------------------------------------------------- head span

def test_head_span_parts_against_explicit_projection():
  rng = np.random.default_rng(3)
  centers = rng.normal(size=(3, 7))
  e = rng.normal(size=(20, 7)) * rng.uniform(0.1, 5.0, size=(20, 1))
  inside, outside = shared_head.head_span_parts(e, {"centers": centers})
  n = e / np.linalg.norm(e, axis=1, keepdims=True)
  proj = centers.T @ np.linalg.solve(centers @ centers.T, centers)  # onto span(rows)
  np.testing.assert_allclose(inside, n @ proj, atol=1e-10)
  np.testing.assert_allclose(inside + outside, n, atol=1e-12)
  np.testing.assert_allclose(outside @ centers.T, 0.0, atol=1e-10)


def test_head_span_parts_of_spanning_and_repeated_centres():
  rng = np.random.default_rng(4)
  centers = rng.normal(size=(3, 7))
  e = rng.normal(size=(20, 7))
  in_span = rng.normal(size=(4, 3)) @ centers
  np.testing.assert_allclose((shared_head.head_span_parts(
      in_span, {"centers": centers})[0] ** 2).sum(1), 1.0)
  full = shared_head.head_span_parts(e, {"centers": rng.normal(size=(9, 7))})
  np.testing.assert_allclose(full[1], 0.0, atol=1e-10)  # C >= D spans everything
  inside = shared_head.head_span_parts(e, {"centers": centers})[0]
  dup = shared_head.head_span_parts(e, {"centers": np.concatenate([centers, centers[:1]])})
  np.testing.assert_allclose(dup[0], inside, atol=1e-10)  # no new dimension
  with pytest.raises(ValueError, match="same D"):
    shared_head.head_span_parts(e, {"centers": centers[:, :5]})


def test_span_diagnostic_finds_class_information_outside_the_head_span():
  """Classes separated only orthogonally to the head's centres: retrieval works on the
  part outside the span and is at chance inside it; a spanning head leaves nothing out."""
  rng = np.random.default_rng(0)
  d, n = 6, 400
  centers = np.eye(d)[:2] * 3.0  # the head spans the first two axes
  y = rng.integers(0, 4, 2 * n)
  e = rng.normal(size=(2 * n, d))                 # the span part: noise only
  e[:, 2:] = 0.05 * rng.normal(size=(2 * n, d - 2))
  e[np.arange(2 * n), 2 + y] += 0.5               # the class lives on axes 2..5
  emb = {"test": e[:n], "index": e[n:]}
  out = shared_head.span_diagnostic(emb, {"centers": centers}, y[:n], y[n:], k=5)
  n_e = e[:n] / np.linalg.norm(e[:n], axis=1, keepdims=True)
  assert out["fraction"] == pytest.approx(np.mean(np.sum(n_e[:, :2] ** 2, axis=1)))
  assert out["mP@5 outside"] == 1.0
  assert out["mP@5 inside"] < 0.45  # chance is 0.25
  full = shared_head.span_diagnostic(emb, {"centers": rng.normal(size=(d, d))}, y[:n], y[n:],
                                     k=5)
  assert full["fraction"] == pytest.approx(1.0) and full["mP@5 outside"] is None


# --------------------------------------------------------------------------- align_model

def test_align_model_to_its_own_head_with_zero_lr_keeps_its_embeddings():
  x, y, _ = _synthetic(5, n=64)
  model, v = _arcface()
  res = shared_head.align_model(model, v, x, y, head={"centers": v["params"]["head"]["centers"]},
                                mode="finetune", tx=optax.sgd(0.0), num_steps=3, batch_size=16)
  assert res.frozen_unchanged and _bytes(res.params["encoder"]) == _bytes(v)
  own = shared_head.own_embeddings(model, v, {"x": x})["x"]
  np.testing.assert_array_equal(shared_head.embed(res.params, x, encode_fn=res.encode_fn), own)


def test_align_model_adapter_from_embedding_trains_only_the_adapter():
  x, y, centers = _synthetic(6, n=64)
  model, v = _arcface()
  res = shared_head.align_model(model, v, x, y, head={"centers": jnp.asarray(centers)},
                                mode="adapter", adapter_input="embedding",
                                tx=optax.adam(1e-2), num_steps=4, batch_size=16,
                                key=jax.random.key(1))
  assert res.params["adapter"]["kernel"].shape == (8, 8) and res.losses.shape == (4,)
  assert res.frozen_unchanged and _bytes(res.params["encoder"]) == _bytes(v)


# --------------------------------------------------------------------------- align_group

@pytest.fixture(scope="module")
def group():
  """Two different random ArcFace MLPs, their inputs by role, and the labels."""
  x, y, _ = _synthetic(7, n=224)
  trained = [_arcface((16,), seed=0), _arcface((12, 12), seed=1)]
  inp = {"train": x[:96], "val": x[96:160], "test": x[160:]}
  inp["fit"] = inp["index"] = inp["train"][:64]
  labels = {"train": y[:96], "val": y[96:160], "test": y[160:], "fit": y[:64], "index": y[:64]}
  return trained, [inp, dict(inp)], labels


@pytest.fixture(scope="module")
def adapter_run(group):
  trained, inputs, labels = group
  return shared_head.align_group(trained, inputs, labels=labels, names=["a", "b"],
                                 mode="adapter", epochs=1, batch_size=32, scale=16.0)


def test_align_group_shared_head_model_keeps_its_own_row(adapter_run):
  res = adapter_run
  assert res["best"] == ["a", "b"][int(np.argmax(res["val_mP"]))]
  assert res["rows"]["ours"][res["best"]] == res["rows"]["traditional"][res["best"]]
  assert set(res["rows"]["ours"]) == {"a", "b", "mean"}


def test_align_group_freezes_all_but_the_adapter(adapter_run):
  assert adapter_run["frozen_leaves_unchanged"] == [True]
  assert set(adapter_run["own_heads_prob_average"]) == {"Acc@1", "Acc@5"}


def test_align_group_zero_lr_finetuning_changes_no_retrieval(group):
  trained, inputs, labels = group
  res = shared_head.align_group(trained, inputs, labels=labels, mode="finetune",
                                learning_rate=0.0, epochs=1, batch_size=32, scale=16.0)
  for name in ("0", "1", "mean"):
    assert res["rows"]["ours"][name]["mP@5"] == pytest.approx(
        res["rows"]["traditional"][name]["mP@5"], abs=1e-12)
  assert res["frozen_leaves_unchanged"] == [True]


def test_align_group_naive_mean_of_identical_models_is_that_model(group):
  (model_v, _), inputs, labels = group
  res = shared_head.align_group([model_v] * 3, [inputs[0]] * 3, labels=labels,
                                method="procrustes")
  rows = res["rows"]
  assert res["best"] == "0" and res["val_mP"] == [res["val_mP"][0]] * 3
  for metric, value in rows["traditional"]["0"].items():
    assert rows["traditional"]["mean"][metric] == pytest.approx(value, abs=1e-12)
    assert rows["ours"]["mean"][metric] == pytest.approx(value, abs=1e-12)


def test_align_group_procrustes_keeps_every_models_retrieval(group):
  """An orthogonal map keeps cosines, so every model's own mP@k survives alignment."""
  trained, inputs, labels = group
  res = shared_head.align_group(trained, inputs, labels=labels, method="procrustes")
  assert res["frozen_leaves_unchanged"] == [None]
  for name in ("0", "1"):
    assert res["rows"]["ours"][name]["mP@5"] == pytest.approx(
        res["rows"]["traditional"][name]["mP@5"], abs=2e-3)


def test_align_group_open_set_reports_retrieval_only(group):
  trained, inputs, labels = group
  res = shared_head.align_group(trained, inputs, labels=labels, method="lstsq",
                                classify_with_heads=False)
  assert res["own_heads_prob_average"] is None
  for kind in ("traditional", "ours"):
    assert all(set(r) == {"mP@5"} for r in res["rows"][kind].values())


def test_align_group_selects_on_the_named_roles(group):
  trained, inputs, labels = group
  inputs = [{**inp, "rval": inp["test"][:32]} for inp in inputs]
  labels = {**labels, "rval": labels["test"][:32]}
  res = shared_head.align_group(trained, inputs, labels=labels, method="lstsq",
                                select=("rval", "index"))
  own = [shared_head.own_embeddings(m, v, {"q": inp["rval"], "i": inp["index"]})
         for (m, v), inp in zip(trained, inputs)]
  want = [shared_head.evaluate_space(e["q"], labels["rval"], e["i"], labels["index"], None)
          ["mP@5"] for e in own]
  assert res["val_mP"] == want and res["best"] == str(shared_head.select_best(want))


def test_align_group_rejects_unknown_method(group):
  trained, inputs, labels = group
  with pytest.raises(ValueError, match="align method"):
    shared_head.align_group(trained, inputs, labels=labels, method="orthogonal")
