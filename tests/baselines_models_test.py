"""BatchEnsemble, MIMO and Packed-Ensembles against explicit per-member networks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling.models import batchensemble as be
from ensembling.models import mimo
from ensembling.models import packed
from ensembling.models.mlp import MLP

TOL = dict(rtol=1e-5, atol=1e-5)


def _randomize(params, seed=0, scale=0.5):
  """Every leaf redrawn N(0, scale^2): zero biases / unit fast weights would hide bugs."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: (scale * rng.standard_normal(l.shape)).astype(np.float32), params)


def _init(module, x, seed=0):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(seed), x))["params"]
  return _randomize(shapes, seed + 1)


def _x(shape, seed=0):
  return np.random.default_rng(100 + seed).standard_normal(shape).astype(np.float32)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# --- BatchEnsemble --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3 * 4, 5), (3 * 4, 2, 5)])
def test_bedense_equals_members_with_rank1_weights(shape):
  k, b = 3, 4
  layer = be.BEDense(6, k)
  x = _x(shape)
  p = _init(layer, x)
  y = np.asarray(layer.apply({"params": p}, x))
  w, r, s, bias = (np.asarray(p[n]) for n in ("kernel", "r", "s", "bias"))
  assert y.shape == shape[:-1] + (6,)
  for m in range(k):
    w_m = w * np.outer(r[m], s[m])                      # W o (r_k s_k^T)
    np.testing.assert_allclose(y[m * b:(m + 1) * b], x[m * b:(m + 1) * b] @ w_m + bias[m], **TOL)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "VALID")])
def test_beconv_equals_members_with_rank1_kernels(strides, padding):
  k, b = 2, 3
  layer = be.BEConv(4, (3, 3), k, strides=strides, padding=padding)
  x = _x((k * b, 7, 7, 3))
  p = _init(layer, x)
  y = np.asarray(layer.apply({"params": p}, x))
  w, r, s, bias = (np.asarray(p[n]) for n in ("kernel", "r", "s", "bias"))
  conv = nn.Conv(4, (3, 3), strides=strides, padding=padding)
  for m in range(k):
    w_m = w * r[m][None, None, :, None] * s[m][None, None, None, :]
    want = conv.apply({"params": {"kernel": w_m, "bias": bias[m]}}, x[m * b:(m + 1) * b])
    np.testing.assert_allclose(y[m * b:(m + 1) * b], want, **TOL)


def _be_member_mlp_params(p, m, n_hidden):
  out = {}
  for name in [f"Dense_{i}" for i in range(n_hidden)] + ["head"]:
    q = p[name]
    out[name] = {"kernel": q["kernel"] * np.outer(q["r"][m], q["s"][m]), "bias": q["bias"][m]}
  return out


@pytest.mark.parametrize("same_batch", [True, False])
def test_batchensemble_mlp_members_are_explicit_mlps(same_batch):
  k, b, widths, c = 3, 4, (8, 6), 5
  model = be.BatchEnsembleMLP(widths=widths, num_classes=c, num_members=k)
  x_b = _x((b, 2, 3, 1))
  x = be.repeat_batch(x_b, num_members=k) if same_batch else _x((k * b, 2, 3, 1), seed=1)
  p = _init(model, x)
  out = model.apply({"params": p}, x)
  assert out.logits.shape == (k, b, c) and out.features.shape == (k, b, widths[-1])
  for m in range(k):
    x_m = x_b if same_batch else x[m * b:(m + 1) * b]
    ref = MLP(widths=widths, num_classes=c).apply(
        {"params": _be_member_mlp_params(_np(p), m, len(widths))}, x_m)
    np.testing.assert_allclose(out.logits[m], ref.logits, **TOL)
    np.testing.assert_allclose(out.features[m], ref.features, **TOL)


def test_repeat_batch_layout_is_member_major():
  x = np.arange(6).reshape(3, 2)
  np.testing.assert_array_equal(be.repeat_batch(x, num_members=2), np.concatenate([x, x]))


def test_fast_weight_init():
  key = jax.random.PRNGKey(0)
  signs = np.asarray(be.fast_weight_init(0.5)(key, (4000,)))
  assert set(np.unique(signs)) == {-1.0, 1.0}
  np.testing.assert_array_equal(be.fast_weight_init(1.0)(key, (10,)), 1.0)  # p = 1: all +1
  g = np.asarray(be.fast_weight_init(-0.5)(key, (4000,)))
  np.testing.assert_allclose(g, 1.0 + 0.5 * np.asarray(jax.random.normal(key, (4000,))), atol=1e-6)
  with pytest.raises(ValueError, match="random_sign_init"):
    be.fast_weight_init(0.0)


def test_batchensemble_bad_input_raises():
  with pytest.raises(ValueError, match="num_members"):
    be.BEDense(4, 0).init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="num_members=3"):
    be.BEDense(4, 3).init(jax.random.PRNGKey(0), jnp.ones((8, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    be.BEConv(4, (3, 3), 2).init(jax.random.PRNGKey(0), jnp.ones((4, 5, 5)))
  with pytest.raises(ValueError, match="num_members=2"):
    be.BatchEnsembleMLP(widths=(4,), num_members=2).init(jax.random.PRNGKey(0), jnp.ones((7, 3)))
  with pytest.raises(ValueError, match="num_members"):
    be.repeat_batch(jnp.ones((2, 3)), num_members=0)


# --- MIMO -----------------------------------------------------------------------------

def test_mimo_mlp_concatenates_inputs_and_has_k_heads():
  k, b, d, widths, c = 3, 4, 5, (7, 6), 4
  model = mimo.MIMOMLP(widths=widths, num_classes=c, num_members=k)
  x = _x((b, k, d))
  p = _np(_init(model, x))
  out = model.apply({"params": p}, x)
  assert out.logits.shape == (k, b, c) and out.features.shape == (b, widths[-1])
  w0 = p["Dense_0"]["kernel"]
  h = sum(x[:, j] @ w0[j * d:(j + 1) * d] for j in range(k)) + p["Dense_0"]["bias"]
  h = np.maximum(h, 0)
  h = np.maximum(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
  np.testing.assert_allclose(out.features, h, **TOL)
  for j in range(k):
    head = h @ p["head"]["kernel"][:, j * c:(j + 1) * c] + p["head"]["bias"][j * c:(j + 1) * c]
    np.testing.assert_allclose(out.logits[j], head, **TOL)


def test_mimo_cnn_concatenates_images_on_channels():
  k, b, c = 2, 3, 4
  model = mimo.MIMOCNN(stages=(4,), num_classes=c, num_members=k)
  x = _x((b, k, 6, 6, 2))
  p = _np(_init(model, x))
  out = model.apply({"params": p}, x)
  assert out.logits.shape == (k, b, c)
  h = np.concatenate([x[:, j] for j in range(k)], axis=-1)        # (B, H, W, K*C)
  h = nn.relu(nn.Conv(4, (3, 3), padding="SAME").apply({"params": p["conv0"]}, h))
  h = np.asarray(nn.max_pool(h, (2, 2), strides=(2, 2))).reshape(b, -1)
  np.testing.assert_allclose(out.features, h, **TOL)
  logits = h @ p["head"]["kernel"] + p["head"]["bias"]
  for j in range(k):
    np.testing.assert_allclose(out.logits[j], logits[:, j * c:(j + 1) * c], **TOL)


def test_mimo_evaluation_repeats_input_and_one_pass_gives_k_predictions():
  k, b = 3, 5
  model = mimo.MIMOMLP(widths=(8,), num_classes=4, num_members=k)
  x = _x((b, 2, 2, 1))
  xr = mimo.repeat_input(x, num_members=k)
  assert xr.shape == (b, k, 2, 2, 1)
  for j in range(k):
    np.testing.assert_array_equal(xr[:, j], x)
  p = _init(model, xr)
  logits = model.apply({"params": p}, xr).logits
  assert logits.shape == (k, b, 4)
  # Heads differ (their own weights) although they see the same input.
  assert not np.allclose(logits[0], logits[1])


def _coded(b):
  """Examples whose value is their index, so a gathered batch shows which it took."""
  return np.arange(b, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), np.arange(b)


@pytest.mark.parametrize("reps", [1, 2])
def test_mimo_batch_without_repetition_is_independent_shuffles(reps):
  k, b = 3, 16
  x, y = _coded(b)
  key = jax.random.PRNGKey(4)
  xm, ym = mimo.mimo_batch(key, x, y, num_members=k, batch_repetitions=reps)
  xm, ym = np.asarray(xm), np.asarray(ym)
  assert xm.shape == (reps * b, k, 3) and ym.shape == (k, reps * b)
  main_key, *head_keys = jax.random.split(key, k + 1)
  main = jax.random.permutation(main_key, jnp.tile(jnp.arange(b), reps))
  for j in range(k):
    idx = np.asarray(jax.random.permutation(head_keys[j], main))
    np.testing.assert_array_equal(ym[j], y[idx])
    np.testing.assert_array_equal(xm[:, j], x[idx])
    # every head sees every example exactly `reps` times
    np.testing.assert_array_equal(np.bincount(ym[j], minlength=b), reps)
  assert not any(np.array_equal(ym[i], ym[j]) for i in range(k) for j in range(i))


def test_mimo_batch_full_repetition_gives_every_head_the_same_example():
  k, b = 4, 10
  x, y = _coded(b)
  xm, ym = mimo.mimo_batch(jax.random.PRNGKey(1), x, y, num_members=k, repeat_prob=1.0)
  xm, ym = np.asarray(xm), np.asarray(ym)
  for j in range(k):
    np.testing.assert_array_equal(ym[j], ym[0])
    np.testing.assert_array_equal(xm[:, j], xm[:, 0])
  np.testing.assert_array_equal(np.sort(ym[0]), np.arange(b))


def test_mimo_batch_partial_repetition():
  k, b, rho = 3, 20, 0.25
  x, y = _coded(b)
  xm, ym = mimo.mimo_batch(jax.random.PRNGKey(2), x, y, num_members=k, repeat_prob=rho)
  ym = np.asarray(ym)
  n_shuffled = int(b * (1 - rho))                     # 15 rows shuffled per head, 5 shared
  for j in range(k):
    np.testing.assert_array_equal(ym[j, n_shuffled:], ym[0, n_shuffled:])
    np.testing.assert_array_equal(np.sort(ym[j, :n_shuffled]), np.sort(ym[0, :n_shuffled]))
    np.testing.assert_array_equal(np.asarray(xm)[:, j, 0], ym[j])   # labels follow images
  assert not np.array_equal(ym[1, :n_shuffled], ym[0, :n_shuffled])


def test_mimo_bad_input_raises():
  key = jax.random.PRNGKey(0)
  model = mimo.MIMOMLP(widths=(4,), num_members=3)
  with pytest.raises(ValueError, match="member axis K=3"):
    model.init(key, jnp.ones((5, 8)))                   # no K axis
  with pytest.raises(ValueError, match="member axis K=3"):
    model.init(key, jnp.ones((5, 2, 8)))                # wrong K
  with pytest.raises(ValueError, match="num_members"):
    mimo.MIMOMLP(widths=(4,), num_members=0).init(key, jnp.ones((5, 1, 8)))
  with pytest.raises(ValueError, match=r"\(B, K, H, W, C\)"):
    mimo.MIMOCNN(num_members=2).init(key, jnp.ones((5, 2, 8, 8)))
  x, y = _coded(6)
  with pytest.raises(ValueError, match="repeat_prob"):
    mimo.mimo_batch(key, x, y, num_members=2, repeat_prob=1.5)
  with pytest.raises(ValueError, match="batch_repetitions"):
    mimo.mimo_batch(key, x, y, num_members=2, batch_repetitions=0)
  with pytest.raises(ValueError, match="batch axis"):
    mimo.mimo_batch(key, x, y[:5], num_members=2)


# --- Packed-Ensembles -----------------------------------------------------------------

def _block_diag(kernel):
  g, i, o = kernel.shape
  full = np.zeros((g * i, g * o), kernel.dtype)
  for j in range(g):
    full[j * i:(j + 1) * i, j * o:(j + 1) * o] = kernel[j]
  return full


@pytest.mark.parametrize("gamma", [1, 2])
def test_packed_dense_is_block_diagonal(gamma):
  m = 2
  layer = packed.PackedDense(8, m, alpha=2, gamma=gamma)    # 16 outputs, 2 * gamma groups
  x = _x((5, 12))
  p = _np(_init(layer, x))
  y = np.asarray(layer.apply({"params": p}, x))
  g = m * gamma
  assert p["kernel"].shape == (g, 12 // g, 16 // g)
  np.testing.assert_allclose(y, x @ _block_diag(p["kernel"]) + p["bias"], **TOL)
  for j in range(g):  # group j: input block j -> output block j, nothing else
    oi, oo = 12 // g, 16 // g
    np.testing.assert_allclose(y[:, j * oo:(j + 1) * oo],
                               x[:, j * oi:(j + 1) * oi] @ p["kernel"][j] + p["bias"][j * oo:(j + 1) * oo],
                               **TOL)


def _packed_member_mlp_params(p, m, n_hidden, num_classes):
  out = {}
  k0 = p["Dense_0"]["kernel"][0]
  w = k0.shape[1] // p["head"]["kernel"].shape[0]
  out["Dense_0"] = {"kernel": k0[:, m * w:(m + 1) * w], "bias": p["Dense_0"]["bias"][m * w:(m + 1) * w]}
  for i in range(1, n_hidden):
    q = p[f"Dense_{i}"]
    wo = q["kernel"].shape[2]
    out[f"Dense_{i}"] = {"kernel": q["kernel"][m], "bias": q["bias"][m * wo:(m + 1) * wo]}
  q = p["head"]
  out["head"] = {"kernel": q["kernel"][m],
                 "bias": q["bias"][m * num_classes:(m + 1) * num_classes]}
  return out


@pytest.mark.parametrize("alpha", [2, 1.5])
def test_packed_mlp_equals_independent_small_mlps(alpha):
  m, b, widths, c = 4, 3, (8, 16), 5                   # members of widths alpha * w / 4
  model = packed.PackedMLP(widths=widths, num_classes=c, num_estimators=m, alpha=alpha)
  x = _x((b, 2, 5))
  p = _np(_init(model, x))
  out = model.apply({"params": p}, x)
  small = tuple(int(alpha * w) // m for w in widths)
  assert out.logits.shape == (m, b, c) and out.features.shape == (m, b, small[-1])
  for j in range(m):
    ref = MLP(widths=small, num_classes=c).apply(
        {"params": _packed_member_mlp_params(p, j, len(widths), c)}, x)
    np.testing.assert_allclose(out.logits[j], ref.logits, **TOL)
    np.testing.assert_allclose(out.features[j], ref.features, **TOL)


def test_packed_mlp_with_groups_equals_per_group_computation():
  m, gamma, b, widths, c = 2, 2, 3, (8, 8, 4), 3
  model = packed.PackedMLP(widths=widths, num_classes=c, num_estimators=m, alpha=2, gamma=gamma)
  x = _x((b, 6))
  p = _np(_init(model, x))
  out = model.apply({"params": p}, x)
  h = np.maximum(x @ p["Dense_0"]["kernel"][0] + p["Dense_0"]["bias"], 0)   # shared input
  for i in (1, 2):                                     # m * gamma = 4 groups, loop by hand
    q, g = p[f"Dense_{i}"], m * gamma
    gi, go = h.shape[1] // g, q["kernel"].shape[2]
    h = np.concatenate([h[:, j * gi:(j + 1) * gi] @ q["kernel"][j] for j in range(g)], 1)
    h = np.maximum(h + q["bias"], 0)
    assert h.shape[1] == g * go
  q = p["head"]                                        # head: gamma = 1, one group per member
  w = h.shape[1] // m
  for j in range(m):
    logits = h[:, j * w:(j + 1) * w] @ q["kernel"][j] + q["bias"][j * c:(j + 1) * c]
    np.testing.assert_allclose(out.logits[j], logits, **TOL)
    np.testing.assert_allclose(out.features[j], h[:, j * w:(j + 1) * w], **TOL)


@pytest.mark.parametrize("gamma,first", [(1, False), (2, False), (1, True)])
def test_packed_conv_equals_per_group_convs(gamma, first):
  m = 2
  layer = packed.PackedConv(4, (3, 3), m, alpha=2, gamma=gamma, first=first)   # 8 filters
  x = _x((2, 6, 6, 3 if first else 8))
  p = _np(_init(layer, x))["conv"]
  y = np.asarray(layer.apply({"params": {"conv": p}}, x))
  g = 1 if first else m * gamma
  assert y.shape == (2, 6, 6, 8) and p["kernel"].shape == (3, 3, x.shape[-1] // g, 8)
  ci, co = x.shape[-1] // g, 8 // g
  for j in range(g):
    ref = nn.Conv(co, (3, 3), padding="SAME").apply(
        {"params": {"kernel": p["kernel"][..., j * co:(j + 1) * co],
                    "bias": p["bias"][j * co:(j + 1) * co]}}, x[..., j * ci:(j + 1) * ci])
    np.testing.assert_allclose(y[..., j * co:(j + 1) * co], ref, **TOL)
  if first:  # shared input: estimator j's filters are an ordinary conv over all channels
    for j in range(m):
      ref = nn.Conv(4, (3, 3), padding="SAME").apply(
          {"params": {"kernel": p["kernel"][..., j * 4:(j + 1) * 4],
                      "bias": p["bias"][j * 4:(j + 1) * 4]}}, x)
      np.testing.assert_allclose(y[..., j * 4:(j + 1) * 4], ref, **TOL)


def test_packed_last_layer_width():
  layer = packed.PackedDense(10, 3, alpha=2, last=True)
  x = _x((2, 6))
  y = layer.apply(layer.init(jax.random.PRNGKey(0), x), x)
  assert y.shape == (2, 30)                             # M * classes


def test_packed_bad_input_raises():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_estimators"):
    packed.PackedMLP(widths=(8,), num_estimators=0).init(key, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="alpha"):
    packed.PackedMLP(widths=(8,), num_estimators=2, alpha=0).init(key, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="gamma"):
    packed.PackedMLP(widths=(8, 8), num_estimators=2, gamma=0).init(key, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"not divisible by num_estimators \* gamma = 4 \* 1"):
    packed.PackedMLP(widths=(30,), num_estimators=4, alpha=1).init(key, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"num_estimators \* gamma = 2 \* 4 = 8"):
    packed.PackedMLP(widths=(16, 12), num_estimators=2, alpha=1, gamma=4).init(key, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="not an integer"):
    packed.PackedDense(5, 1, alpha=1.5).init(key, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="input width 6 is not divisible"):
    packed.PackedDense(8, 4, alpha=2).init(key, jnp.ones((2, 6)))
  with pytest.raises(ValueError, match="NHWC"):
    packed.PackedConv(4, (3, 3), 2).init(key, jnp.ones((2, 6, 6)))
  with pytest.raises(ValueError, match="input channels are not divisible"):
    packed.PackedConv(4, (3, 3), 2).init(key, jnp.ones((2, 6, 6, 3)))
  with pytest.raises(ValueError, match="widths is empty"):
    packed.PackedMLP(widths=(), num_estimators=2).init(key, jnp.ones((2, 4)))


# --- training with the library's loop: ONE model state, (K, B, C) logits ----------------

import functools  # noqa: E402

import optax  # noqa: E402

from ensembling import members, train  # noqa: E402


def _np_ce(logits, labels):
  """Per-row cross-entropy in float64 NumPy."""
  z = np.asarray(logits, np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]


def _sgd_state(params, lr=0.1):
  tx = optax.sgd(lr)
  return members.init_state({"params": params}, tx), tx


def _labels(shape, c, seed=0):
  return np.random.default_rng(200 + seed).integers(0, c, shape).astype(np.int32)


def test_batchensemble_step_is_sgd_on_every_members_own_cross_entropy():
  k, b, widths, c = 3, 4, (5,), 3
  model = be.BatchEnsembleMLP(widths=widths, num_classes=c, num_members=k)
  x, y = _x((k, b, 6)), _labels((k, b), c)
  p = _init(model, x.reshape(k * b, 6))
  state, tx = _sgd_state(p)
  step = jax.jit(functools.partial(be.train_step, model=model, tx=tx))
  new, m = step(state, {"x": x, "y": y}, jax.random.key(0))

  def member_logits(params, j):   # member j = an MLP with W o (r_j s_j^T), on its own x[j]
    mp = {n: {"kernel": q["kernel"] * jnp.outer(q["r"][j], q["s"][j]), "bias": q["bias"][j]}
          for n, q in params.items()}
    return MLP(widths=widths, num_classes=c).apply({"params": mp}, x[j]).logits

  want = np.mean([_np_ce(member_logits(p, j), y[j]).mean() for j in range(k)])
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  grads = jax.jit(jax.grad(lambda q: sum(optax.softmax_cross_entropy_with_integer_labels(
      member_logits(q, j), y[j]).mean() for j in range(k)) / k))(p)
  jax.tree.map(lambda a, b_, g: np.testing.assert_allclose(a, b_ - 0.1 * g, **TOL),
               new["params"], p, grads)
  assert np.shape(new["step"]) == ()                   # one model, not a member axis
  # A plain batch trains every member on the same examples (uncertainty-baselines' tiling).
  same, _ = step(state, {"x": x[0], "y": y[0]}, jax.random.key(0))
  tiled, _ = step(state, {"x": np.stack([x[0]] * k), "y": np.stack([y[0]] * k)},
                  jax.random.key(0))
  jax.tree.map(lambda a, b_: np.testing.assert_allclose(a, b_, **TOL), same["params"],
               tiled["params"])


def test_mimo_step_sums_the_heads_cross_entropies_on_their_own_shuffles():
  k, b, c = 3, 6, 4
  model = mimo.MIMOMLP(widths=(8,), num_classes=c, num_members=k)
  x, y = _x((b, 5)), _labels((b,), c)
  p = _init(model, mimo.repeat_input(x, num_members=k))
  state, tx = _sgd_state(p)
  key = jax.random.key(3)
  new, m = jax.jit(functools.partial(mimo.train_step, model=model, tx=tx, repeat_prob=0.5,
                                     batch_repetitions=2))(state, {"x": x, "y": y}, key)
  shuffle_key, _ = jax.random.split(key)                 # the documented key split
  xm, ym = mimo.mimo_batch(shuffle_key, x, y, num_members=k, repeat_prob=0.5,
                           batch_repetitions=2)
  logits = model.apply({"params": p}, xm).logits
  want = sum(_np_ce(logits[j], ym[j]).mean() for j in range(k))   # summed over heads
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  grads = jax.jit(jax.grad(lambda q: sum(optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": q}, xm).logits[j], ym[j]).mean() for j in range(k))))(p)
  jax.tree.map(lambda a, b_, g: np.testing.assert_allclose(a, b_ - 0.1 * g, **TOL),
               new["params"], p, grads)


def test_packed_step_trains_every_estimator_as_its_own_small_mlp():
  m, b, widths, c = 2, 5, (8, 8), 3
  model = packed.PackedMLP(widths=widths, num_classes=c, num_estimators=m, alpha=2)
  x, y = _x((b, 6)), _labels((b,), c)
  p = _np(_init(model, x))
  state, tx = _sgd_state(p)
  new, met = jax.jit(functools.partial(packed.train_step, model=model, tx=tx))(
      state, {"x": x, "y": y}, jax.random.key(0))
  small = MLP(widths=(8, 8), num_classes=c)         # alpha * w / M = 8
  per = []
  for j in range(m):
    q = _packed_member_mlp_params(p, j, len(widths), c)
    ce = lambda q_: optax.softmax_cross_entropy_with_integer_labels(
        small.apply({"params": q_}, x).logits, y).mean()
    per.append(_np_ce(small.apply({"params": q}, x).logits, y).mean())
    g = jax.jit(jax.grad(ce))(q)                    # estimator j's own loss, weight 1/M
    got = _packed_member_mlp_params(_np(new["params"]), j, len(widths), c)
    jax.tree.map(lambda a, b_, gg: np.testing.assert_allclose(a, b_ - 0.1 * gg / m, **TOL),
                 got, q, g)
  np.testing.assert_allclose(float(met["loss"]), np.mean(per), rtol=1e-5)


def _one_model(name):
  if name == "batchensemble":
    model = be.BatchEnsembleMLP(widths=(8,), num_classes=3, num_members=2)
    return model, functools.partial(be.train_step, model=model), 2, (be.repeat_batch, 2)
  if name == "mimo":
    model = mimo.MIMOMLP(widths=(8,), num_classes=3, num_members=2)
    return model, functools.partial(mimo.train_step, model=model), None, (mimo.repeat_input, 2)
  model = packed.PackedMLP(widths=(8,), num_classes=3, num_estimators=2, alpha=2)
  return model, functools.partial(packed.train_step, model=model), None, None


@pytest.mark.parametrize("name", ["batchensemble", "mimo", "packed"])
def test_train_fit_trains_the_efficient_ensembles_as_one_model(name):
  """train.fit with the module's step == the step looped by hand (same batches and keys)."""
  model, step, k, prep = _one_model(name)
  x, y = _x((40, 4)), _labels((40,), 3)
  x0 = prep[0](x[:1], num_members=prep[1]) if prep else x[:1]
  tx = optax.sgd(0.05, momentum=0.9)
  state = members.init_state(model.init(jax.random.key(0), x0), tx)
  step = jax.jit(functools.partial(step, tx=tx))
  batch_fn, _ = train.make_batch_fn(x, y, seed=0, batch_size=8, num_members=k)
  got, _, hist = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=6,
                           key=jax.random.key(1), progress=False)
  ref = state
  for t in range(6):
    ref, _ = step(ref, batch_fn(t), jax.random.fold_in(jax.random.key(1), t))
  jax.tree.map(lambda a, b_: np.testing.assert_allclose(a, b_, rtol=1e-6, atol=1e-6),
               got["params"], ref["params"])
  assert int(got["step"]) == 6 and "member" not in hist[-1]


@pytest.mark.parametrize("name", ["batchensemble", "mimo", "packed"])
def test_predict_in_chunks_equals_one_forward_pass(name):
  model, _, _, prep = _one_model(name)
  x = _x((7, 4))
  v = {"params": _init(model, prep[0](x, num_members=prep[1]) if prep else x)}
  mod = {"batchensemble": be, "mimo": mimo, "packed": packed}[name]
  got = mod.predict(model, v, x, batch_size=3)        # chunks of 3, 3, 1
  want = model.apply(v, prep[0](x, num_members=prep[1]) if prep else x).logits
  assert got.shape == (2, 7, 3)
  np.testing.assert_allclose(got, want, **TOL)


def test_training_bad_input_raises():
  model = be.BatchEnsembleMLP(widths=(4,), num_classes=3, num_members=2)
  p = _init(model, jnp.ones((4, 3)))
  state, tx = _sgd_state(p)
  with pytest.raises(ValueError, match="K=2"):
    be.train_step(state, {"x": jnp.ones((3, 2, 3)), "y": jnp.zeros((3, 2), jnp.int32)},
                  jax.random.key(0), model=model, tx=tx)
  with pytest.raises(ValueError, match="num_members"):
    be.member_batch({"x": jnp.ones((2, 3)), "y": jnp.zeros(2, jnp.int32)}, num_members=0)
  with pytest.raises(ValueError, match="num_members=K"):
    mimo.predict(nn.Dense(3), {"params": {}}, np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"\(K, B, C\)"):
    be.loss(jnp.zeros((2, 4, 3)), jnp.zeros((2, 5), jnp.int32))
  with pytest.raises(ValueError, match=r"\(K, B, C\)"):
    mimo.loss(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.int32))
  mm = mimo.MIMOMLP(widths=(4,), num_classes=3, num_members=2)
  with pytest.raises(ValueError, match="plain batch"):
    mimo.train_step(state, {"x": jnp.ones((2, 4, 3)), "y": jnp.zeros((2, 4), jnp.int32)},
                    jax.random.key(0), model=mm, tx=tx)
  pm = packed.PackedMLP(widths=(8,), num_classes=3, num_estimators=2)
  with pytest.raises(ValueError, match="shared batch"):
    packed.train_step(state, {"x": jnp.ones((2, 4, 3)), "y": jnp.zeros((2, 4), jnp.int32)},
                      jax.random.key(0), model=pm, tx=tx)
  with pytest.raises(ValueError, match="batch_size"):
    packed.predict(pm, {"params": {}}, np.ones((2, 3)), batch_size=0)
