"""Shared-head alignment: freezing by path, adapters, fine-tuning, combination."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import losses, models, shared_head
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


def test_adapter_only_training_leaves_everything_else_bit_identical():
  x, y, centers = _synthetic()
  model, enc = _encoder()
  head = {"centers": jnp.asarray(centers)}
  params = shared_head.init_aligned(jax.random.key(0), encoder=enc, head=head, in_dim=16)
  before = jax.tree.map(np.array, params)
  trained, loss = shared_head.fit_aligned(
      params, x, y, tx=optax.adam(1e-2), trainable=shared_head.ADAPTER_ONLY, num_steps=60,
      batch_size=32, encode_fn=shared_head.flax_encoder(model.apply), scale=16.0, margin=0.3)
  assert _bytes(trained["encoder"]) == _bytes(before["encoder"])
  assert _bytes(trained["head"]) == _bytes(before["head"])
  for a, b in zip(jax.tree.leaves(trained["adapter"]), jax.tree.leaves(before["adapter"])):
    assert not np.array_equal(a, b)
  assert loss[-10:].mean() < loss[:10].mean()


def test_finetune_trains_encoder_under_frozen_head():
  x, y, centers = _synthetic(1)
  model = models.with_arcface(models.MLP(widths=(16,)), num_classes=4, embedding_dim=8)
  enc = jax.jit(model.init)(jax.random.key(0), x[:1])
  head = {"centers": jnp.asarray(centers)}
  params = shared_head.init_aligned(None, encoder=enc, head=head)
  assert params["adapter"] == {}
  before = jax.tree.map(np.array, params)
  trainable = ("^encoder/params/(backbone|embed)/",)
  trained, _ = shared_head.fit_aligned(
      params, x, y, tx=optax.sgd(0.05), trainable=trainable, num_steps=20, batch_size=32,
      encode_fn=shared_head.flax_encoder(model.apply), scale=16.0)
  assert _bytes(trained["head"]) == _bytes(before["head"])
  # The model's own (unused) head is outside `trainable` and must not move either.
  assert _bytes(trained["encoder"]["params"]["head"]) == _bytes(
      before["encoder"]["params"]["head"])
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(trained["encoder"]["params"]["embed"]),
               jax.tree.leaves(before["encoder"]["params"]["embed"]))]
  assert all(moved)


def test_freeze_zeroes_updates_and_keeps_no_state_for_frozen_leaves():
  params = {"encoder": {"w": jnp.ones((3, 2))}, "adapter": {"kernel": jnp.ones((2, 2)),
                                                            "bias": jnp.zeros((2,))},
            "head": {"centers": jnp.ones((4, 2))}}
  tx = shared_head.freeze(optax.adam(0.1), params, trainable=shared_head.ADAPTER_ONLY)
  state = tx.init(params)
  # Adam keeps mu and nu for the 6 adapter numbers only (+ a step count).
  assert tree_lib.count_params(state) == 2 * 6 + 1
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert not np.any(updates["encoder"]["w"]) and not np.any(updates["head"]["centers"])
  assert np.all(np.asarray(updates["adapter"]["kernel"]) != 0)
  labels = shared_head.trainable_labels(params, trainable=shared_head.FINETUNE)
  assert labels == {"encoder": {"w": "trainable"},
                    "adapter": {"kernel": "trainable", "bias": "trainable"},
                    "head": {"centers": "frozen"}}
  with pytest.raises(ValueError, match="No parameter matches"):
    shared_head.freeze(optax.sgd(1.0), params, trainable=("^nothing/",))


def test_adapter_on_precomputed_features_learns_the_shared_space():
  x, y, centers = _synthetic(2, n=800)
  head = {"centers": jnp.asarray(centers)}
  params = shared_head.init_aligned(jax.random.key(3), encoder={}, head=head, in_dim=12)
  acc = lambda p: float(np.mean(np.argmax(
      shared_head.classify(shared_head.embed(p, x[600:]), head), -1) == y[600:]))
  assert acc(params) < 0.6
  params, _ = shared_head.fit_aligned(params, x[:600], y[:600], tx=optax.adam(1e-2),
                                      num_steps=300, batch_size=64, scale=16.0, margin=0.3)
  assert acc(params) > 0.9
  assert _bytes(params["head"]) == _bytes(head)


def test_combine_classify_select_best_and_errors():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(3, 5, 4)).astype(np.float32)
  want = (e / np.linalg.norm(e, axis=-1, keepdims=True)).mean(0)
  np.testing.assert_allclose(shared_head.combine(e), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(shared_head.combine(list(e)), want, rtol=1e-5, atol=1e-6)
  head = {"centers": rng.normal(size=(3, 4)).astype(np.float32)}
  np.testing.assert_allclose(shared_head.classify(e[0], head),
                             losses.cosine_logits(jnp.asarray(e[0]), head["centers"]))
  assert shared_head.select_best([0.2, 0.7, 0.7]) == 1
  assert shared_head.select_best([0.2, 0.7, 0.1], higher_is_better=False) == 2
  with pytest.raises(ValueError, match="non-empty"):
    shared_head.select_best([])
  params = shared_head.init_aligned(jax.random.key(0), encoder={}, head=head, in_dim=6)
  with pytest.raises(ValueError, match="expects 6 input features"):
    shared_head.shared_embeddings(params, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="centers"):
    shared_head.init_aligned(None, encoder={}, head={"w": 1})


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
  # embeddings in the span are all "inside"; a head with C >= D spans everything
  np.testing.assert_allclose((shared_head.head_span_parts(
      rng.normal(size=(4, 3)) @ centers, {"centers": centers})[0] ** 2).sum(1), 1.0)
  full = shared_head.head_span_parts(e, {"centers": rng.normal(size=(9, 7))})
  np.testing.assert_allclose(full[1], 0.0, atol=1e-10)
  # a repeated centre does not add a dimension
  dup = shared_head.head_span_parts(e, {"centers": np.concatenate([centers, centers[:1]])})
  np.testing.assert_allclose(dup[0], inside, atol=1e-10)
  with pytest.raises(ValueError, match="same D"):
    shared_head.head_span_parts(e, {"centers": centers[:, :5]})
