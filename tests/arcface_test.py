"""ArcFace loss, cosine logits and heads; mP@k against brute-force references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import losses, metrics, models


# --------------------------------------------------------------------------- references

def pml_arcface_np(emb, labels, w_DxC, *, scale, margin_degrees):
  """pytorch-metric-learning ArcFaceLoss.compute_loss, re-implemented in float64 NumPy.

  cosine = normalize(emb) @ normalize(W, dim=0); angles = acos(clamp(cos_target, -1, 1));
  target = cos(angles + m) if angles <= pi - m else cos(angles) - m sin(m);
  logits = cosine + mask * (target - cos_target); CE(scale * logits), mean.
  """
  emb = np.asarray(emb, np.float64)
  w = np.asarray(w_DxC, np.float64)
  m = np.radians(margin_degrees)
  e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  w = w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), 1e-12)
  cosine = e @ w
  rows = np.arange(len(labels))
  cos_t = cosine[rows, labels]
  angles = np.arccos(np.clip(cos_t, -1, 1))
  target = np.where(angles <= np.pi - m, np.cos(angles + m), np.cos(angles) - m * np.sin(m))
  mask = np.zeros_like(cosine)
  mask[rows, labels] = 1
  logits = scale * (cosine + mask * (target - cos_t)[:, None])
  mx = logits.max(1, keepdims=True)
  lse = np.log(np.exp(logits - mx).sum(1)) + mx[:, 0]
  return float(np.mean(lse - logits[rows, labels]))


def acos_arcface(emb, labels, centers, *, scale, margin):
  """The textbook arccos formulation in JAX (correct values, NaN gradients at +-1)."""
  cos = losses.cosine_logits(emb, centers)
  cos_t = cos[jnp.arange(len(labels)), labels]
  ang = jnp.arccos(cos_t)
  target = jnp.where(ang <= jnp.pi - margin, jnp.cos(ang + margin),
                     jnp.cos(ang) - margin * jnp.sin(margin))
  onehot = jax.nn.one_hot(labels, cos.shape[1], dtype=bool)
  return losses.softmax_cross_entropy(scale * jnp.where(onehot, target[:, None], cos), labels)


def mean_precision_at_k_loop(q, ql, x, xl, *, k, exclude_self=False):
  """A plain per-query loop with a full stable sort."""
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  aps = []
  for i in range(len(q)):
    cand = [j for j in range(len(x)) if not (exclude_self and j == i)]
    m_q = sum(1 for j in cand if xl[j] == ql[i])
    if m_q == 0:
      continue
    sims = np.array([q[i] @ x[j] for j in cand])
    order = np.argsort(-sims, kind="stable")[:k]
    hits, total = 0, 0.0
    for rank, o in enumerate(order, start=1):
      if xl[cand[o]] == ql[i]:
        hits += 1
        total += hits / rank
    aps.append(total / min(m_q, k))
  return float(np.mean(aps))


def _problem(seed=0, b=24, d=6, c=5):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(c, d)).astype(np.float32)
  labels = rng.integers(0, c, size=b).astype(np.int32)
  emb = rng.normal(size=(b, d)).astype(np.float32) * rng.uniform(0.1, 5, size=(b, 1))
  # A third of the rows sit near the opposite of their centre: theta > pi - m branch.
  far = np.arange(b) % 3 == 0
  emb[far] = -centers[labels[far]] + 0.05 * rng.normal(size=(far.sum(), d))
  return jnp.asarray(emb, jnp.float32), jnp.asarray(labels), jnp.asarray(centers)


# --------------------------------------------------------------------------- loss

@pytest.mark.parametrize("scale,margin", [(64.0, 0.5), (30.0, 0.3), (1.0, 0.8)])
def test_arcface_matches_pytorch_metric_learning_formula(scale, margin):
  emb, labels, centers = _problem()
  cos = np.asarray(losses.cosine_logits(emb, centers))
  cos_t = cos[np.arange(len(labels)), np.asarray(labels)]
  assert (np.arccos(cos_t) > np.pi - margin).any() and (np.arccos(cos_t) < np.pi - margin).any()
  got = losses.arcface_loss(emb, labels, centers, scale=scale, margin=margin)
  want = pml_arcface_np(emb, np.asarray(labels), np.asarray(centers).T, scale=scale,
                        margin_degrees=np.degrees(margin))
  np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=2e-4)


def test_zero_margin_is_scaled_cosine_softmax():
  emb, labels, centers = _problem(1)
  cos = losses.cosine_logits(emb, centers)
  want = losses.softmax_cross_entropy(10.0 * cos, labels)
  np.testing.assert_allclose(losses.arcface_loss(emb, labels, centers, scale=10.0, margin=0.0),
                             want, rtol=1e-6)


def test_gradients_match_arccos_formulation_away_from_singularities():
  emb, labels, centers = _problem(2)
  f = functools.partial(losses.arcface_loss, scale=16.0, margin=0.5)
  g = functools.partial(acos_arcface, scale=16.0, margin=0.5)
  got = jax.grad(f, argnums=(0, 2))(emb, labels, centers)
  want = jax.grad(g, argnums=(0, 2))(emb, labels, centers)
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=2e-5)


def test_target_logit_is_non_increasing_in_theta():
  theta = jnp.linspace(0.0, jnp.pi, 2001)
  cos = jnp.stack([jnp.cos(theta), jnp.zeros_like(theta)], axis=1)
  mod = losses.additive_angular_margin(cos, jnp.zeros(len(theta), jnp.int32), margin=0.5)
  target = np.asarray(mod[:, 0])
  assert np.all(np.diff(target) <= 1e-6)
  np.testing.assert_allclose(np.asarray(mod[:, 1]), 0.0)  # non-targets untouched
  below = np.asarray(theta) <= np.pi - 0.5 - 1e-3
  np.testing.assert_allclose(target[below], np.cos(np.asarray(theta)[below] + 0.5), atol=1e-5)


@pytest.mark.parametrize("axis_aligned", [True, False])
@pytest.mark.parametrize("case", ["equal", "opposite", "other_centre", "zero"])
def test_finite_values_and_gradients_at_cos_plus_minus_one(case, axis_aligned):
  rng = np.random.default_rng(3)
  # Axis-aligned centres normalise exactly, so cos(theta) is exactly +1 / -1.
  centers = jnp.asarray(2.5 * np.eye(4, 8) if axis_aligned else rng.normal(size=(4, 8)),
                        jnp.float32)
  labels = jnp.array([0, 1, 2, 3, 1], jnp.int32)
  emb = {"equal": centers[labels],
         "opposite": -centers[labels],
         "other_centre": centers[(labels + 1) % 4],
         "zero": jnp.zeros((5, 8), jnp.float32)}[case]
  if axis_aligned and case in ("equal", "opposite"):
    cos_t = losses.cosine_logits(emb, centers)[jnp.arange(5), labels]
    np.testing.assert_array_equal(cos_t, 1.0 if case == "equal" else -1.0)
  for scale, margin in [(64.0, 0.5), (30.0, 0.2)]:
    f = functools.partial(losses.arcface_loss, scale=scale, margin=margin)
    val, grads = jax.value_and_grad(f, argnums=(0, 2))(emb, labels, centers)
    assert np.isfinite(float(val))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads), case
    if case != "zero":
      want = pml_arcface_np(emb, np.asarray(labels), np.asarray(centers).T, scale=scale,
                            margin_degrees=np.degrees(margin))
      np.testing.assert_allclose(float(val), want, rtol=1e-4, atol=1e-3)


def test_the_singular_points_do_break_the_arccos_formulation():
  """Guards the test above: the naive formula really is NaN there."""
  centers = jnp.asarray(2.5 * np.eye(4, 8), jnp.float32)
  labels = jnp.array([0, 1], jnp.int32)
  for emb in (centers[labels], -centers[labels]):
    g = jax.grad(acos_arcface)(emb, labels, centers, scale=64.0, margin=0.5)
    assert not np.isfinite(np.asarray(g)).all()
    g = jax.grad(losses.arcface_loss)(emb, labels, centers, scale=64.0, margin=0.5)
    assert np.isfinite(np.asarray(g)).all()


def test_loss_from_logits_equals_loss_from_embeddings():
  emb, labels, centers = _problem(4)
  logits = 30.0 * losses.cosine_logits(emb, centers)
  np.testing.assert_allclose(
      losses.arcface_loss_from_logits(logits, labels, scale=30.0, margin=0.4),
      losses.arcface_loss(emb, labels, centers, scale=30.0, margin=0.4), rtol=1e-5)


def test_cosine_logits_and_errors():
  emb, _, centers = _problem(5)
  e = np.asarray(emb, np.float64)
  c = np.asarray(centers, np.float64)
  want = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1,
                                                                            keepdims=True)).T
  np.testing.assert_allclose(losses.cosine_logits(emb, centers), want, atol=1e-6)
  with pytest.raises(ValueError, match="does not match"):
    losses.cosine_logits(emb, centers[:, :3])
  with pytest.raises(ValueError, match="labels"):
    losses.additive_angular_margin(jnp.zeros((3, 2)), jnp.zeros((4,), jnp.int32))


# --------------------------------------------------------------------------- heads

def test_arcface_head_and_model_wrap_any_backbone():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
  for backbone in [models.MLP(widths=(16,)), models.CNN(stages=(2, 2, 2))]:
    m = models.with_arcface(backbone, num_classes=5, embedding_dim=6, scale=7.0)
    v = jax.jit(m.init)(jax.random.key(0), x)
    assert v["params"]["head"]["centers"].shape == (5, 6)
    assert v["params"]["embed"]["kernel"].shape[1] == 6
    assert v["params"]["backbone"]["head"]["kernel"].shape[-1] == 1  # unused, 1 output
    out = jax.jit(m.apply)(v, x)
    want = 7.0 * losses.cosine_logits(out.features, v["params"]["head"]["centers"])
    np.testing.assert_allclose(out.logits, want, rtol=1e-5, atol=1e-6)  # jit vs eager
    assert out.features.shape == (3, 6)


def test_make_arcface_model_builds_a_registry_backbone_by_name():
  m = models.make_arcface_model("mlp", widths=(8,), dropout=0.0, num_classes=3,
                                embedding_dim=4, scale=5.0)
  assert m.backbone.widths == (8,) and m.backbone.num_classes == 1 and m.scale == 5.0
  v = m.init(jax.random.key(0), jnp.ones((1, 6)))
  assert v["params"]["head"]["centers"].shape == (3, 4)
  with pytest.raises(ValueError, match="Unknown option"):
    models.make_arcface_model("mlp", depth=3, num_classes=3)


# --------------------------------------------------------------------------- mP@k

@pytest.mark.parametrize("k", [1, 5])
def test_mean_precision_at_k_matches_loop(k):
  rng = np.random.default_rng(k)
  q, x = rng.normal(size=(37, 4)), rng.normal(size=(53, 4))
  ql, xl = rng.integers(0, 4, 37), rng.integers(0, 5, 53)
  got = metrics.mean_precision_at_k(q, ql, x, xl, k=k, batch_size=8)
  np.testing.assert_allclose(got, mean_precision_at_k_loop(q, ql, x, xl, k=k), rtol=1e-6)


def test_mean_precision_at_k_exclude_self_and_missing_classes():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(40, 3))
  xl = rng.integers(0, 3, 40)
  xl[0] = 9  # a singleton class: m_q = 0 once the query itself is excluded
  got = metrics.mean_precision_at_k(x, xl, x, xl, k=5, exclude_self=True, batch_size=16)
  np.testing.assert_allclose(
      got, mean_precision_at_k_loop(x, xl, x, xl, k=5, exclude_self=True), rtol=1e-6)
  assert metrics.mean_precision_at_k(x, xl, x, xl, k=1) == 1.0  # self is its own NN


def test_mean_precision_at_k_perfect_and_errors():
  labels = np.repeat(np.arange(3), 10)
  emb = np.eye(3)[labels] + 0.01 * np.random.default_rng(0).normal(size=(30, 3))
  assert metrics.mean_precision_at_k(emb, labels, emb, labels, k=5) == 1.0
  with pytest.raises(ValueError, match="embeddings"):
    metrics.mean_precision_at_k(emb, labels, emb[:, :2], labels)
  with pytest.raises(ValueError, match="out of range"):
    metrics.mean_precision_at_k(emb, labels, emb[:3], labels[:3], k=5)
  nan = emb.copy()
  nan[[4, 17]] = np.nan  # NaN rows would rank arbitrarily among the cosine similarities
  with pytest.raises(ValueError, match=r"index embeddings have NaN or inf in row\(s\) \[4, 17\]"):
    metrics.mean_precision_at_k(emb, labels, nan, labels)
  with pytest.raises(ValueError, match=r"query embeddings have NaN or inf in row\(s\) \[4, 17\]"):
    metrics.mean_precision_at_k(nan, labels, emb, labels)


def test_softmax_cross_entropy_matches_loop_and_refuses_labels_out_of_range():
  rng = np.random.default_rng(3)
  logits, labels = rng.normal(size=(6, 4)), rng.integers(0, 4, 6)
  want = np.mean([np.log(np.exp(r).sum()) - r[y] for r, y in zip(logits, labels)])
  np.testing.assert_allclose(losses.softmax_cross_entropy(jnp.asarray(logits), labels), want,
                             rtol=1e-5)
  bad = labels.copy()
  bad[[1, 4]] = [4, -1]  # a one-hot of zeros: the row would add nothing to the loss
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\); found \[-1, 4\]"):
    losses.softmax_cross_entropy(jnp.asarray(logits), bad)
  traced = jax.jit(losses.softmax_cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(traced, want, rtol=1e-5)  # under jit: taken as they are
