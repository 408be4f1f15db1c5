"""Trajectory ensembles: schedules, SWA, snapshot collection, BN recalibration, StarSSE.

References are explicit: PyTorch's schedulers / AveragedModel / update_bn re-implemented
step by step in NumPy (torch is not installed), the FGE code's formula, plain means.
"""

import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import averaging, members, models, optim, schedules, train, trajectory
from ensembling import tree as tree_lib


# --------------------------------------------------------------------------- references

def torch_cosine_warm_restarts(base_lr, t_0, num_steps, eta_min=0.0):
  """CosineAnnealingWarmRestarts(T_0=t_0, T_mult=1), scheduler.step() once per update."""
  t_cur, t_i = 0, t_0  # the constructor's initial step sets T_cur = 0
  lrs = []
  for _ in range(num_steps):
    lrs.append(eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2)
    t_cur += 1  # scheduler.step()
    if t_cur >= t_i:
      t_cur -= t_i
  return np.array(lrs)


def torch_swalr(base_lr, swa_lr, anneal_epochs, num_steps, strategy="cos"):
  """SWALR.get_lr's recurrence, starting from an optimizer whose lr is base_lr."""
  f = (lambda t: (1 - math.cos(math.pi * t)) / 2) if strategy == "cos" else (lambda t: t)
  lr = base_lr
  lrs = []
  for step_count in range(1, num_steps + 1):  # _step_count after each scheduler step
    step = step_count - 1
    if anneal_epochs == 0:
      step = max(1, step)
    prev_t = max(0, min(1, (step - 1) / max(1, anneal_epochs)))
    prev_alpha = f(prev_t)
    prev_lr = swa_lr if prev_alpha == 1 else (lr - prev_alpha * swa_lr) / (1 - prev_alpha)
    t = max(0, min(1, step / max(1, anneal_epochs)))
    alpha = f(t)
    lr = swa_lr * alpha + prev_lr * (1 - alpha)
    lrs.append(lr)
  return np.array(lrs)


def garipov_fge_lr(step, steps_per_epoch, cycle_epochs, lr_1, lr_2):
  """fge.py's `cyclic_learning_rate(epoch, cycle, alpha_1, alpha_2)(iter)`."""
  epoch, it = divmod(step, steps_per_epoch)
  t = ((epoch % cycle_epochs) + it / steps_per_epoch) / cycle_epochs
  if t < 0.5:
    return lr_1 * (1.0 - 2.0 * t) + lr_2 * 2.0 * t
  return lr_1 * (2.0 * t - 1.0) + lr_2 * (2.0 - 2.0 * t)


# --------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("total,cycles", [(100, 3), (10, 5), (37, 4), (8, 1)])
def test_cosine_restarts_matches_torch_warm_restarts(total, cycles):
  sched = schedules.cosine_restarts(0.2, total, cycles)
  t_0 = math.ceil(total / cycles)
  ref = torch_cosine_warm_restarts(0.2, t_0, total)
  got = np.asarray(jax.vmap(sched)(jnp.arange(total)))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  # Snapshots at cycle ends: the next update restarts at the base rate.
  steps = schedules.cosine_restarts_steps(total, cycles)
  assert len(steps) == cycles and steps[-1] == total
  np.testing.assert_allclose(ref[steps[:-1]], 0.2, rtol=1e-6)
  assert np.all(np.diff(steps) <= t_0)


def test_named_schedules_are_the_optax_schedules():
  """The thin wrappers: the closed forms they document, bit for bit."""
  t = jnp.arange(40)
  period = math.ceil(37 / 4)
  closed = 0.5 * 0.2 * (jnp.cos(jnp.pi * jnp.mod(t, period).astype(jnp.float32) / period) + 1)
  np.testing.assert_allclose(jax.vmap(schedules.cosine_restarts(0.2, 37, 4))(t[:37]),
                             closed[:37], rtol=0, atol=2e-8)
  swa = schedules.swa_schedule(0.1, 0.02, anneal_steps=7)
  ref = optax.cosine_decay_schedule(0.1, 7, alpha=0.2)
  np.testing.assert_array_equal(jax.vmap(swa)(t), jax.vmap(ref)(t))


def test_cosine_restarts_rejects_bad_input():
  with pytest.raises(ValueError, match="num_cycles"):
    schedules.cosine_restarts(0.1, 5, 6)
  with pytest.raises(ValueError, match="total_steps"):
    schedules.cosine_restarts(0.1, 0, 1)
  with pytest.raises(ValueError, match="do not fit"):
    schedules.cosine_restarts_steps(10, 6)  # ceil(10/6)=2: cycles 5 and 6 both end at 10


@pytest.mark.parametrize("spe,cycle_epochs", [(5, 4), (3, 2), (7, 3)])
def test_fge_cyclic_matches_reference_code(spe, cycle_epochs):
  c = spe * cycle_epochs
  sched = schedules.fge_cyclic(0.05, 0.0005, c)
  n = 3 * c + 2
  got = np.asarray(jax.vmap(sched)(jnp.arange(n)))
  ref = np.array([garipov_fge_lr(s, spe, cycle_epochs, 0.05, 0.0005) for s in range(n)])
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)


def test_fge_snapshots_at_the_lr2_point():
  c = 10
  sched = schedules.fge_cyclic(0.1, 0.01, c)
  lrs = np.asarray(jax.vmap(sched)(jnp.arange(35)))
  steps = schedules.fge_steps(c, 35)
  np.testing.assert_array_equal(steps, [6, 16, 26])  # 35 < 36: the 4th midpoint is not reached
  # The update that produced each snapshot (index n - 1) used the cycle's lowest rate, lr_2.
  np.testing.assert_allclose(lrs[steps - 1], 0.01, rtol=1e-5)
  for k in range(3):
    assert lrs[k * c: (k + 1) * c].argmin() == c // 2
  assert lrs[0] == pytest.approx(0.1) and lrs[c] == pytest.approx(0.1)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("anneal_steps", [0, 1, 7])
def test_swa_schedule_matches_torch_swalr(anneal, anneal_steps):
  sched = schedules.swa_schedule(0.1, 0.02, anneal_steps=anneal_steps, anneal=anneal)
  got = np.asarray(jax.vmap(sched)(jnp.arange(15)))
  ref = torch_swalr(0.1, 0.02, anneal_steps, 15, anneal)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[anneal_steps:], 0.02, rtol=1e-6)


def test_after_pretraining_joins_schedules():
  inner = schedules.cosine_restarts(0.1, 20, 2)
  pre = optax.linear_schedule(0.5, 0.1, 12)
  sched = schedules.after_pretraining(inner, pretrain_steps=12, pretrain_schedule=pre)
  got = np.asarray(jax.vmap(sched)(jnp.arange(32)))
  ref = np.array([float(pre(s)) if s < 12 else float(inner(s - 12)) for s in range(32)])
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  const = schedules.after_pretraining(inner, pretrain_steps=3, pretrain_schedule=0.3)
  assert float(const(2)) == pytest.approx(0.3) and float(const(3)) == pytest.approx(0.1)
  np.testing.assert_array_equal(
      schedules.offset_steps(schedules.cosine_restarts_steps(20, 2), 12), [22, 32])
  np.testing.assert_array_equal(schedules.swa_steps(10, 20, every=5), [15, 20])
  with pytest.raises(ValueError, match="start"):
    schedules.swa_steps(20, 20, every=5)


# --------------------------------------------------------------------------- SWA

def _random_tree(key):
  k1, k2 = jax.random.split(key)
  return {"dense": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jax.random.normal(k2, (4,))}}


def torch_averaged_model(params_list):
  """AveragedModel.update_parameters with the default avg_fn, leaf by leaf."""
  avg, n = None, 0
  for p in params_list:
    p = jax.tree.map(np.asarray, p)
    if n == 0:
      avg = jax.tree.map(np.copy, p)
    else:
      avg = jax.tree.map(lambda a, q: a + (q - a) / (n + 1), avg, p)
    n += 1
  return avg


def test_swa_update_is_the_mean_of_all_collected():
  trees = [_random_tree(jax.random.key(i)) for i in range(6)]
  avg = jax.tree.map(lambda x: jnp.full_like(x, 123.0), trees[0])  # garbage: count 0 ignores it
  for n, t in enumerate(trees):
    avg = averaging.swa_update(avg, t, count=n)
  chex.assert_trees_all_close(avg, jax.tree.map(lambda *xs: np.mean(xs, 0), *trees), rtol=1e-5)
  chex.assert_trees_all_close(avg, torch_averaged_model(trees), rtol=1e-6, atol=1e-7)
  first = averaging.swa_update(trees[3], trees[0], count=0)
  chex.assert_trees_all_equal(first, trees[0])


def test_swa_update_vmapped_per_member_counts():
  a = tree_lib.stack([_random_tree(jax.random.key(i)) for i in range(3)])
  p = tree_lib.stack([_random_tree(jax.random.key(10 + i)) for i in range(3)])
  counts = jnp.array([0, 1, 4])
  got = jax.vmap(lambda x, y, c: averaging.swa_update(x, y, count=c))(a, p, counts)
  for k in range(3):
    ref = averaging.swa_update(tree_lib.index(a, k), tree_lib.index(p, k), count=int(counts[k]))
    chex.assert_trees_all_close(tree_lib.index(got, k), ref, rtol=1e-6)
  with pytest.raises(ValueError):
    averaging.swa_update({"a": jnp.ones(2)}, {"b": jnp.ones(2)}, count=1)


# --------------------------------------------------------------------------- collection in fit

def _tiny_setup(digits, k=2, batch_norm=True):
  model = models.MLP(widths=(16,), num_classes=10, batch_norm=batch_norm)
  tx = optim.make_optimizer(learning_rate=schedules.cosine_restarts(0.05, 12, 3))
  v = members.init_members(jax.random.key(0), model, digits.x_train[:1], k)
  state = members.init_states(v, tx)
  step_fn = members.ensemble_step(model=model, tx=tx, num_members=k, strategy="vmap")
  batch_fn, _ = train.make_batch_fn(digits.x_train[:256], digits.y_train[:256], seed=0,
                                    batch_size=32, num_members=k)
  return model, tx, state, step_fn, batch_fn


def test_collector_snapshots_and_average_match_an_explicit_loop(digits, tmp_path):
  model, tx, state0, step_fn, batch_fn = _tiny_setup(digits)
  snap_steps = schedules.cosine_restarts_steps(12, 3)  # 4, 8, 12
  avg_steps = [6, 9, 12]
  col = trajectory.trajectory_collector(snapshot_steps=snap_steps, average_steps=avg_steps)
  key = jax.random.key(1)
  state, extra, _ = train.fit(jax.tree.map(jnp.copy, state0), step_fn=step_fn,
                              batch_fn=batch_fn, num_steps=12, key=key,
                              on_step=col.on_step, extra=col.init(state0), progress=False)
  # Explicit loop: the same steps, keeping every state.
  keys = members.member_keys(key, 2)
  s = jax.tree.map(jnp.copy, state0)
  seen = {}
  for t in range(12):
    s, _ = step_fn(s, batch_fn(t), members.step_keys(keys, t))
    seen[t + 1] = jax.tree.map(np.asarray, {"params": s["params"], "batch_stats": s["batch_stats"]})
  ref_snaps = jax.tree.map(lambda *xs: np.stack(xs, axis=1), *[seen[n] for n in snap_steps])
  chex.assert_trees_all_close(extra["snapshots"], ref_snaps, rtol=1e-5, atol=1e-6)
  ref_avg = jax.tree.map(lambda *xs: np.mean(xs, 0), *[seen[n] for n in avg_steps])
  chex.assert_trees_all_close(extra["average"], ref_avg, rtol=1e-5, atol=1e-6)
  assert int(extra["num_snapshots"]) == 3 and int(extra["num_averaged"]) == 3
  # Snapshot buffer is preallocated: (K, M, ...) from the start.
  init = col.init(state0)
  assert jax.tree.map(jnp.shape, init["snapshots"]) == jax.tree.map(jnp.shape, extra["snapshots"])

  # Interrupted at step 7 (after one snapshot and one average) and resumed == uninterrupted.
  wd = str(tmp_path / "run")
  train.fit(jax.tree.map(jnp.copy, state0), step_fn=step_fn, batch_fn=batch_fn, num_steps=7,
            key=key, workdir=wd, on_step=col.on_step, extra=col.init(state0), progress=False)
  _, extra_r, _ = train.fit(jax.tree.map(jnp.copy, state0), step_fn=step_fn, batch_fn=batch_fn,
                            num_steps=12, key=key, workdir=wd, on_step=col.on_step,
                            extra=col.init(state0), progress=False)
  chex.assert_trees_all_close(extra_r, extra, rtol=1e-6, atol=1e-7)


def test_collector_rejects_bad_steps():
  with pytest.raises(ValueError, match="repeat"):
    trajectory.trajectory_collector(snapshot_steps=[3, 3])
  with pytest.raises(ValueError, match=">= 1"):
    trajectory.trajectory_collector(average_steps=[0, 2])


# --------------------------------------------------------------------------- BN recalibration

def _np_bn_mlp_stats(params, batches, eps=1e-5):
  """PyTorch update_bn on the BN-MLP, by hand: cumulative mean of per-batch stats."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  sums = None
  for n, x in enumerate(batches, start=1):
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    stats = {}
    for i in range(2):
      z = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      mu, var = z.mean(0), z.var(0)  # train mode normalises with the biased variance
      stats[f"bn_{i}"] = {"mean": mu, "var": var}
      z = (z - mu) / np.sqrt(var + eps) * p[f"bn_{i}"]["scale"] + p[f"bn_{i}"]["bias"]
      h = np.maximum(z, 0)
    sums = stats if sums is None else jax.tree.map(lambda r, s: r + (s - r) / n, sums, stats)
  return sums


def test_recompute_batch_stats_matches_update_bn():
  model = models.MLP(widths=(12, 8), num_classes=3, batch_norm=True)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(70, 5)).astype(np.float32) * 2 + 1
  v = model.init(jax.random.key(0), x[:1], train=False)
  # Perturb scale/bias so the second layer's input depends on the first BN's affine.
  v = {"params": jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), a.dtype),
                              v["params"]),
       "batch_stats": v["batch_stats"]}
  batches = [x[:32], x[32:64], x[64:]]  # the last, smaller batch counts as one, as in torch
  ref = _np_bn_mlp_stats(v["params"], batches)
  zeroed = {**v, "batch_stats": jax.tree.map(jnp.zeros_like, v["batch_stats"])}
  stale = {**v, "batch_stats": jax.tree.map(lambda a: a + 5.0, v["batch_stats"])}
  got = averaging.recompute_batch_stats(model, zeroed, batches)
  chex.assert_trees_all_close(got["batch_stats"], ref, rtol=2e-5, atol=1e-6)
  got2 = averaging.recompute_batch_stats(model, stale, batches)
  chex.assert_trees_all_close(got2["batch_stats"], got["batch_stats"], rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(got["params"], v["params"])
  # one batch: the stored statistics are exactly that batch's, so eval == train output
  one = averaging.recompute_batch_stats(model, v, batches[:1])
  out_eval = model.apply(one, batches[0], train=False).logits
  out_train, _ = model.apply(one, batches[0], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out_eval, out_train.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", members.STRATEGIES)
def test_recompute_batch_stats_conv_momentum_099_and_stacked(strategy):
  # every strategy of running the stacked models ('auto' is 'unroll' on one CPU)
  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
      x = nn.Conv(4, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.99)(x)
      return nn.Dense(2)(x.mean((1, 2)))

  m = ConvBN()
  rng = np.random.default_rng(1)
  xs = [rng.normal(size=(6, 5, 5, 2)).astype(np.float32) + i for i in range(3)]
  v_K = jax.vmap(lambda k: m.init(k, xs[0], train=False))(jax.random.split(jax.random.key(0), 2))
  got = averaging.recompute_batch_stats(m.apply, v_K, xs, stacked=True, strategy=strategy)
  for k in range(2):
    vk = tree_lib.index(v_K, k)
    conv = lambda x: nn.Conv(4, (3, 3)).apply({"params": vk["params"]["Conv_0"]}, x)
    zs = [np.asarray(conv(x), np.float64) for x in xs]
    ref_mean = np.mean([z.mean((0, 1, 2)) for z in zs], 0)
    ref_var = np.mean([z.var((0, 1, 2)) for z in zs], 0)
    np.testing.assert_allclose(got["batch_stats"]["BatchNorm_0"]["mean"][k], ref_mean,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["batch_stats"]["BatchNorm_0"]["var"][k], ref_var,
                               rtol=1e-4, atol=1e-5)
    one = averaging.recompute_batch_stats(m.apply, vk, xs)
    chex.assert_trees_all_close(tree_lib.index(got["batch_stats"], k), one["batch_stats"],
                                rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["vmap", "unroll", "loop"])
def test_recompute_batch_stats_stacked_shares_the_dropout_key(strategy):
  # A training-mode pass with dropout: every stacked model sees batch i with the same
  # dropout key fold_in(key, i), exactly as when recalibrated one by one.
  model = models.MLP(widths=(16, 8), num_classes=3, dropout=0.5, batch_norm=True)
  rng = np.random.default_rng(3)
  xs = [rng.normal(size=(20, 6)).astype(np.float32) for _ in range(3)]
  v_K = jax.vmap(lambda k: model.init(k, xs[0][:1], train=False))(
      jax.random.split(jax.random.key(0), 3))
  key = jax.random.key(7)
  got = averaging.recompute_batch_stats(model, v_K, xs, stacked=True, key=key,
                                        strategy=strategy)
  for k in range(3):
    one = averaging.recompute_batch_stats(model, tree_lib.index(v_K, k), xs, key=key)
    chex.assert_trees_all_close(tree_lib.index(got["batch_stats"], k), one["batch_stats"],
                                rtol=1e-5, atol=1e-6)
  other = averaging.recompute_batch_stats(model, tree_lib.index(v_K, 0), xs,
                                          key=jax.random.key(8))  # the key matters
  assert not np.allclose(other["batch_stats"]["bn_1"]["mean"],  # bn_1 follows dropout
                         got["batch_stats"]["bn_1"]["mean"][0])

@pytest.mark.parametrize("stacked,strategy", [(False, "auto"), (True, "vmap"),
                                              (True, "unroll"), (True, "loop")])
def test_recompute_batch_stats_traces_once_per_model(monkeypatch, stacked, strategy):
  # A second call with other weights of the same shapes reuses the compiled functions
  # (no retrace), and they compute for the new weights what a fresh compile does.
  traces, stats_after = [], averaging._stats_after
  monkeypatch.setattr(averaging, "_stats_after", lambda *a: traces.append(1) or stats_after(*a))
  averaging._recalibration_fns.cache_clear()
  model = models.MLP(widths=(8,), num_classes=3, batch_norm=True)
  rng = np.random.default_rng(4)
  xs = [rng.normal(size=(10, 5)).astype(np.float32) for _ in range(2)]
  init = lambda s: (jax.vmap(lambda k: model.init(k, xs[0][:1]))(jax.random.split(
      jax.random.key(s), 2)) if stacked else model.init(jax.random.key(s), xs[0][:1]))
  kw = dict(stacked=stacked, strategy=strategy)
  averaging.recompute_batch_stats(model, init(0), xs, **kw)
  traced = len(traces)
  assert traced > 0
  second = averaging.recompute_batch_stats(model, init(1), xs, **kw)
  assert len(traces) == traced
  averaging._recalibration_fns.cache_clear()
  fresh = averaging.recompute_batch_stats(model, init(1), xs, **kw)
  assert len(traces) > traced
  chex.assert_trees_all_equal(second, fresh)


def test_recompute_batch_stats_errors():
  model = models.MLP(widths=(4,), num_classes=2)
  v = model.init(jax.random.key(0), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="no BatchNorm"):
    averaging.recompute_batch_stats(model, v, [np.ones((4, 3), np.float32)])
  bn = models.MLP(widths=(4,), num_classes=2, batch_norm=True)
  vb = bn.init(jax.random.key(0), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="no batches"):
    averaging.recompute_batch_stats(bn, vb, [])
  frozen = nn.BatchNorm(use_running_average=False, momentum=1.0)
  vf = frozen.init(jax.random.key(0), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="momentum 1"):
    averaging.recompute_batch_stats(frozen, vf, [np.ones((4, 3), np.float32)])


def test_mlp_batch_norm_is_backwards_compatible():
  x = jnp.ones((2, 6))
  plain = models.MLP(widths=(5,), num_classes=3).init(jax.random.key(0), x)
  assert set(plain) == {"params"} and set(plain["params"]) == {"Dense_0", "head"}
  with_bn = models.MLP(widths=(5,), num_classes=3, batch_norm=True).init(jax.random.key(0), x)
  assert set(with_bn["batch_stats"]) == {"bn_0"}


# --------------------------------------------------------------------------- StarSSE

def test_star_restart_layout_and_optimizer_reset():
  tx = optim.make_optimizer(learning_rate=0.1, momentum=0.9)
  params_K = tree_lib.stack([_random_tree(jax.random.key(i)) for i in range(2)])
  state0 = members.init_states({"params": params_K}, tx)
  state0["opt_state"] = optim.set_hyperparams(state0["opt_state"], lr_scale=jnp.array([1.0, 0.5]))

  def step(st):  # one SGD step on a toy loss, so momentum buffers and count are non-zero
    g = jax.grad(lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p)))(st["params"])
    u, o = tx.update(g, st["opt_state"], st["params"])
    return {**st, "params": optax.apply_updates(st["params"], u), "opt_state": o,
            "step": st["step"] + 1}

  s = jax.vmap(step)(state0)
  star = trajectory.star_restart(s, num_copies=3)
  for k in range(2):
    for c in range(3):
      chex.assert_trees_all_equal(tree_lib.index(star, 3 * k + c), tree_lib.index(s, k))
  back = trajectory.unflatten_star(star["params"], 3)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[:, 2], back), s["params"])
  reset = trajectory.star_restart(s, num_copies=3, tx=tx, reset_optimizer=True)
  assert np.all(np.asarray(reset["opt_state"].count) == 0)
  mom = [x for x in jax.tree.leaves(reset["opt_state"].inner_state) if np.ndim(x) > 1]
  old = [x for x in jax.tree.leaves(star["opt_state"].inner_state) if np.ndim(x) > 1]
  assert mom and all(np.all(np.asarray(m) == 0) for m in mom)
  assert any(np.any(np.asarray(m) != 0) for m in old)  # the checkpoint had momentum
  np.testing.assert_array_equal(reset["opt_state"].hyperparams["lr_scale"], [1, 1, 1, .5, .5, .5])
  chex.assert_trees_all_equal(reset["params"], star["params"])
  with pytest.raises(ValueError, match="tx"):
    trajectory.star_restart(s, num_copies=2, reset_optimizer=True)


# --------------------------------------------------------------------------- plans and fit

def test_plans_collect_where_their_papers_do():
  spe = 10
  sse = trajectory.sse_plan(base_lr=0.1, total_steps=8 * spe, num_cycles=4)
  np.testing.assert_array_equal(sse.snapshot_steps, [20, 40, 60, 80])
  fge = trajectory.fge_plan(base_lr=0.05, total_steps=8 * spe, pretrain_steps=4 * spe,
                            cycle_steps=spe, lr_1=0.02, lr_2=0.0005)
  np.testing.assert_array_equal(fge.snapshot_steps, [46, 56, 66, 76])  # cycle midpoints
  lrs = np.asarray(jax.vmap(fge.schedule)(jnp.arange(80)))
  np.testing.assert_allclose(lrs[fge.snapshot_steps - 1], 0.0005, rtol=1e-5)
  np.testing.assert_allclose(lrs[39], 0.02, rtol=0.05)  # pre-training ends near lr_1
  swa = trajectory.swa_plan(base_lr=0.05, total_steps=8 * spe, pretrain_steps=4 * spe,
                            swa_lr=0.01, anneal_steps=spe, every=5)
  np.testing.assert_array_equal(swa.average_steps, np.arange(50, 81, 5))
  np.testing.assert_allclose(np.asarray(jax.vmap(swa.schedule)(jnp.arange(50, 80))), 0.01,
                             rtol=1e-6)
  star = trajectory.starsse_plan(base_lr=0.1, total_steps=80, num_cycles=4)
  assert star.cycle_steps == 20 and star.num_cycles == 4
  with pytest.raises(ValueError, match="pretrain_steps=80 leaves no"):
    trajectory.swa_plan(base_lr=0.05, total_steps=80, pretrain_steps=80, swa_lr=0.01,
                        anneal_steps=0, every=5)


def _hand_run(model, tx, state, x, y, *, seed, num_steps, collect=()):
  """The runs stepped by hand: batches of seed, keys of seed + 1, states kept at `collect`."""
  k = int(state["step"].shape[0])
  batch_fn, _ = train.make_batch_fn(x, y, seed=seed, batch_size=32, num_members=k)
  step = members.ensemble_step(model=model, tx=tx, num_members=k)
  keys = members.member_keys(jax.random.key(seed + 1), k)
  kept = {}
  for t in range(num_steps):
    state, _ = step(state, batch_fn(t), members.step_keys(keys, t))
    if t + 1 in collect:
      kept[t + 1] = members.variables_of(state)
  return state, kept


@pytest.mark.parametrize("method", ["snapshot", "swa", "starsse"])
def test_trajectory_fit_equals_the_hand_loop(digits, method, tmp_path):
  model = models.MLP(widths=(16,), num_classes=10, batch_norm=True)
  x, y = digits.x_train[:256], digits.y_train[:256]
  total = 24  # 3 epochs of 8 steps
  plan = {"snapshot": lambda: trajectory.sse_plan(base_lr=0.1, total_steps=total, num_cycles=3),
          "swa": lambda: trajectory.swa_plan(base_lr=0.05, total_steps=total, pretrain_steps=8,
                                             swa_lr=0.01, anneal_steps=4, every=4),
          "starsse": lambda: trajectory.starsse_plan(base_lr=0.1, total_steps=total,
                                                     num_cycles=3)}[method]()
  opt = lambda lr: optim.make_optimizer(learning_rate=lr, momentum=0.9)
  run = trajectory.fit(model, plan, x, y, optimizer=opt, num_runs=2, batch_size=32, seed=4,
                       workdir=str(tmp_path), progress=False)
  tx = opt(plan.schedule)
  state0 = members.init_states(members.init_members(jax.random.key(4), model, x[:1], 2), tx)
  if method == "starsse":
    first, _ = _hand_run(model, tx, state0, x, y, seed=4, num_steps=plan.cycle_steps)
    star, _ = _hand_run(model, tx, trajectory.star_restart(first, num_copies=2), x, y,
                        seed=1004, num_steps=plan.cycle_steps)
    want = jax.tree.map(lambda a, b: jnp.concatenate([a[:, None], b], 1),
                        members.variables_of(first),
                        trajectory.unflatten_star(members.variables_of(star), 2))
    chex.assert_trees_all_close(run.snapshots, want, rtol=1e-5, atol=1e-6)
    return
  end, kept = _hand_run(model, tx, state0, x, y, seed=4, num_steps=total,
                        collect=set(plan.snapshot_steps) | set(plan.average_steps))
  chex.assert_trees_all_close(run.state, end, rtol=1e-5, atol=1e-6)
  if method == "snapshot":
    want = jax.tree.map(lambda *a: jnp.stack(a, 1), *[kept[s] for s in plan.snapshot_steps])
    chex.assert_trees_all_close(run.snapshots, want, rtol=1e-5, atol=1e-6)
  else:
    want = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *[kept[s] for s in plan.average_steps])
    chex.assert_trees_all_close(run.average, want, rtol=1e-5, atol=1e-6)


def test_recalibrate_over_seeds_x_snapshots_matches_a_per_model_loop(digits):
  """`recalibrate(member_dims=2)` recomputes each (seed, snapshot) model's BN statistics
  exactly as `recompute_batch_stats` on that model alone would."""
  model = models.MLP(widths=(16, 16), num_classes=10, batch_norm=True)
  seeds, snaps = 2, 3
  v = members.init_members(jax.random.key(0), model, digits.x_train[:1], seeds * snaps)
  # Distinct weights per model, and stale (zeroed) statistics that must not matter.
  v = {"params": jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape),
                              v["params"]),
       "batch_stats": jax.tree.map(lambda a: 0.0 * a, v["batch_stats"])}
  grid = jax.tree.map(lambda a: a.reshape((seeds, snaps) + a.shape[1:]), v)
  x = digits.x_train[:200]
  out = trajectory.recalibrate(model, grid, x, batch_size=32, num_examples=160, member_dims=2)
  for s in range(seeds):
    for m in range(snaps):
      one = jax.tree.map(lambda a: a[s, m], grid)
      ref = averaging.recompute_batch_stats(model, one, (x[i:i + 32] for i in range(0, 160, 32)))
      got = jax.tree.map(lambda a: a[s, m], out)
      chex.assert_trees_all_close(got["batch_stats"], ref["batch_stats"], rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_equal(got["params"], one["params"])
      assert float(np.abs(np.asarray(jax.tree.leaves(got["batch_stats"])[0])).sum()) > 0


# --------------------------------------------------------------------------- evaluate

def _bn_runs(runs, snaps, seed=0):
  """R x M BatchNorm MLPs with distinct weights and stale, distinct running statistics."""
  model = models.MLP(widths=(16,), num_classes=10, batch_norm=True)
  v = members.init_members(jax.random.key(seed), model, np.zeros((1, 64), np.float32),
                           runs * snaps)
  k1, k2, k3 = jax.random.split(jax.random.key(seed + 1), 3)
  noise = lambda k, a, s: a + s * jax.random.normal(k, a.shape)
  v = {"params": jax.tree.map(lambda a: noise(k1, a, 0.1), v["params"]),
       "batch_stats": {"bn_0": {"mean": noise(k2, v["batch_stats"]["bn_0"]["mean"], 0.5),
                                "var": 0.5 + jax.random.uniform(k3, (runs * snaps, 16))}}}
  return model, jax.tree.map(lambda a: a.reshape((runs, snaps) + a.shape[1:]), v)


def _ref_probs(model, v, x):
  z = np.asarray(model.apply(v, x, train=False).logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ref_recal(model, v, x, *, batch_size, n):
  return averaging.recompute_batch_stats(
      model, v, (x[i:i + batch_size] for i in range(0, (n // batch_size) * batch_size,
                                                    batch_size)))


def _ref_row(probs_list, y):
  """Accuracy and NLL of the probability average, and mean pairwise disagreement."""
  p = np.mean(probs_list, 0)
  out = {"accuracy": float(np.mean(p.argmax(-1) == y)),
         "nll": float(-np.mean(np.log(p[np.arange(len(y)), y])))}
  preds = [q.argmax(-1) for q in probs_list]
  pairs = [(i, j) for i in range(len(preds)) for j in range(len(preds)) if i != j]
  if pairs:
    out["disagreement"] = float(np.mean([np.mean(preds[i] != preds[j]) for i, j in pairs]))
  return out


@pytest.mark.parametrize("method", ["sgd", "snapshot", "swa", "starsse"])
def test_evaluate_rows_match_a_per_model_reference(digits, method):
  """Every row `evaluate` reports equals the same quantity computed model by model with
  `model.apply`, float64 softmax averages and per-model BN recalibration."""
  runs, snaps, bs, n = 2, 3, 32, 64
  model, grid = _bn_runs(runs, snaps)
  one = lambda tree, r, m=None: jax.tree.map(lambda a: a[r] if m is None else a[r, m], tree)
  x, y = digits.x_test[:150], digits.y_test[:150]
  xr = digits.x_train[:100]
  end = dict(one(grid, slice(None), snaps - 1), step=np.zeros(runs, np.int32))
  plan = {"sgd": lambda: trajectory.sgd_plan(base_lr=0.1, total_steps=12),
          "snapshot": lambda: trajectory.sse_plan(base_lr=0.1, total_steps=12, num_cycles=3),
          "swa": lambda: trajectory.swa_plan(base_lr=0.1, total_steps=12, pretrain_steps=6,
                                             swa_lr=0.01, anneal_steps=0, every=2),
          "starsse": lambda: trajectory.starsse_plan(base_lr=0.1, total_steps=12,
                                                     num_cycles=3)}[method]()
  snapshots = grid if method in ("snapshot", "starsse") else None
  average = None
  if method == "swa":  # an average with its own (averaged) statistics, unlike the end's
    average = one(grid, slice(None), 0)
  run = trajectory.Trajectory(plan, end, snapshots, average, [], "vmap")
  got = trajectory.evaluate(model, run, x, y, recalibration_x=xr, recalibration_batch_size=bs,
                            recalibration_examples=n, batch_size=64)

  want = {}
  end_probs = [_ref_probs(model, one(members.variables_of(end), r), x) for r in range(runs)]
  want["cycle-1 end point (single model, 1/M budget)" if method == "starsse"
       else "end point (single model)"] = [_ref_row([p], y) for p in end_probs]
  if method == "sgd":
    want[f"independent ensemble of the {runs} seeds ({runs}x budget)"] = [_ref_row(end_probs, y)]
  if snapshots is not None:
    probs = [[_ref_probs(model, one(grid, r, m), x) for m in range(snaps)] for r in range(runs)]
    want[f"ensemble of {snaps} snapshots"] = [_ref_row(p, y) for p in probs]
    want["mean snapshot (single model)"] = [
        {k: float(np.mean([_ref_row([q], y)[k] for q in p])) for k in ("accuracy", "nll")}
        for p in probs]
    want[f"ensemble of {snaps} snapshots, each BN recalibrated"] = [
        _ref_row([_ref_probs(model, _ref_recal(model, one(grid, r, m), xr, batch_size=bs, n=n), x)
                  for m in range(snaps)], y) for r in range(runs)]
  if method in ("swa", "starsse"):
    avg = average if method == "swa" else jax.tree.map(lambda a: a.mean(1), grid)
    name, stale = (("SWA", "last iterate's") if method == "swa"
                   else ("uniform soup", "cycle-1 end point's"))
    want[f"{name} (BN recalibrated)"] = [_ref_row([_ref_probs(
        model, _ref_recal(model, one(avg, r), xr, batch_size=bs, n=n), x)], y)
        for r in range(runs)]
    want[f"{name}, no recalibration: {stale} BN stats"] = [_ref_row([_ref_probs(
        model, {"params": one(avg, r)["params"], "batch_stats": one(end, r)["batch_stats"]},
        x)], y) for r in range(runs)]
    want[f"{name}, no recalibration: averaged BN stats"] = [
        _ref_row([_ref_probs(model, one(avg, r), x)], y) for r in range(runs)]

  assert list(got) == list(want)
  for row, per_run in want.items():
    assert len(got[row]) == len(per_run), row
    for g, w in zip(got[row], per_run):
      for k, v in w.items():
        np.testing.assert_allclose(g[k], v, rtol=2e-4, atol=1e-6, err_msg=f"{row}: {k}")
  # The rows differ where they should (the recalibration and the stale statistics matter).
  if method in ("swa", "starsse"):
    nll = [got[r][0]["nll"] for r in got if "soup" in r or "SWA" in r]
    assert len(set(np.round(nll, 6))) == len(nll)


def test_evaluate_cache_reuses_rows_only_for_the_same_inputs(digits, tmp_path, monkeypatch):
  """With `cache`, a second call returns the stored rows without evaluating; other
  weights, another split, another recalibration key or a damaged file are evaluated."""
  model, grid = _bn_runs(2, 3)
  end = dict(jax.tree.map(lambda a: a[:, -1], grid), step=np.zeros(2, np.int32))
  run = trajectory.Trajectory(trajectory.sse_plan(base_lr=0.1, total_steps=12, num_cycles=3),
                              end, grid, None, [], "vmap")
  x, y, xr = digits.x_test[:100], digits.y_test[:100], digits.x_train[:64]
  kw = dict(recalibration_x=xr, recalibration_batch_size=32, batch_size=50,
            recalibration_key=jax.random.key(0))
  plain = json.loads(json.dumps(trajectory.evaluate(model, run, x, y, **kw),
                                default=lambda a: np.asarray(a).tolist()))
  calls, evaluate = [], trajectory._evaluate
  monkeypatch.setattr(trajectory, "_evaluate",
                      lambda *a, **k: calls.append(1) or evaluate(*a, **k))
  path = str(tmp_path / "rows.json")
  assert trajectory.evaluate(model, run, x, y, cache=path, **kw) == plain and len(calls) == 1
  assert trajectory.evaluate(model, run, x, y, cache=path, **kw) == plain and len(calls) == 1

  moved = run._replace(snapshots=jax.tree.map(lambda a: a.at[1, 2].add(0.01), grid))
  other = trajectory.evaluate(model, moved, x, y, cache=path, **kw)
  assert len(calls) == 2 and other != plain
  assert trajectory.evaluate(model, run, x[:80], y[:80], cache=path, **kw) != plain
  assert len(calls) == 3
  assert trajectory.evaluate(model, run, x, y, cache=path, **kw) == plain and len(calls) == 4
  trajectory.evaluate(model, run, x, y, cache=path, **dict(kw, recalibration_key=jax.random.key(1)))
  assert len(calls) == 5  # only the recalibration key changed since the last call
  open(path, "w").write('{"key": "trunc')
  assert trajectory.evaluate(model, run, x, y, cache=path, **kw) == plain and len(calls) == 6
  assert trajectory.evaluate(model, run, x, y, cache=path, **kw) == plain and len(calls) == 6


def test_evaluate_rejects_bad_input_before_any_work(digits, monkeypatch):
  model, grid = _bn_runs(2, 3)
  end = dict(jax.tree.map(lambda a: a[:, -1], grid), step=np.zeros(2, np.int32))
  sse = trajectory.Trajectory(trajectory.sse_plan(base_lr=0.1, total_steps=12, num_cycles=3),
                              end, grid, None, [], "vmap")
  monkeypatch.setattr(members, "predict", lambda *a, **k: pytest.fail("evaluated"))
  x, y = digits.x_test[:50], digits.y_test[:50]
  with pytest.raises(ValueError, match="x has 50 examples but y has 49"):
    trajectory.evaluate(model, sse, x, y[:49], recalibration_x=x)
  with pytest.raises(ValueError, match=r"recalibrating each snapshot .* pass recalibration_x"):
    trajectory.evaluate(model, sse, x, y)
  swa = sse._replace(plan=trajectory.swa_plan(base_lr=0.1, total_steps=12, pretrain_steps=6,
                                              swa_lr=0.01, anneal_steps=0, every=2),
                     snapshots=None, average=jax.tree.map(lambda a: a[:, 0], grid))
  with pytest.raises(ValueError, match="recalibrating the swa average needs training inputs"):
    trajectory.evaluate(model, swa, x, y)
  with pytest.raises(ValueError, match="the SWA has BatchNorm statistics, so its first row needs"):
    trajectory.average_rows(model, jax.tree.map(lambda a: a[:, 0], grid), x, y, name="SWA")


@pytest.mark.parametrize("kw,match", [
    (dict(x=None), "x .* is None"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_examples=101), "num_examples"),
    (dict(num_examples=20), "20 examples make no full batch of 32"),
])
def test_recalibrate_rejects_bad_input(digits, kw, match):
  model, grid = _bn_runs(2, 1)
  args = {"x": digits.x_train[:100], "batch_size": 32, **kw}
  with pytest.raises(ValueError, match=match):
    trajectory.recalibrate(model, jax.tree.map(lambda a: a[:, 0], grid), args.pop("x"), **args)
