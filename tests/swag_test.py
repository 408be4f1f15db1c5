"""SWAG: the collected moments against NumPy, samples against the closed-form Gaussian."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from ensembling import averaging, members, optim, swag, train, trajectory
from ensembling.models.mlp import MLP


def _data(n=64, d=4, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x, (x[:, 0] + x[:, 1] > 0).astype(np.int32)


def _numpy_swag(iterates, rank):
  """Mean, second moment and the newest-first last `rank` deviations theta_i - mean_{<=i}."""
  th = np.stack(iterates).astype(np.float64)                   # (n, d)
  running = np.cumsum(th, 0) / np.arange(1, len(th) + 1)[:, None]
  devs = th - running
  return th.mean(0), (th ** 2).mean(0), devs[::-1][:rank]


def _flat(tree):
  return np.asarray(ravel_pytree(jax.tree.map(np.asarray, tree))[0], np.float64)


def _random_state(rank=3, n=7, seed=0):
  """A SWAG state over Dense(2) params (8 numbers) collected from n random iterates."""
  rng = np.random.default_rng(seed)
  p0 = {"bias": np.zeros(2, np.float32), "kernel": np.zeros((3, 2), np.float32)}
  iterates = [jax.tree.map(lambda a: (1.0 + 0.3 * rng.normal(size=a.shape)).astype(np.float32),
                           p0) for _ in range(n)]
  state = swag.init_state(p0, rank=rank)
  for p in iterates:
    state = swag.collect(state, p)
  return state, [_flat(p) for p in iterates]


def test_collect_equals_numpy_and_keeps_the_last_rank_deviations():
  state, flat = _random_state(rank=3, n=7)      # 7 > 3: the ring buffer wrapped twice
  mean, sq, devs = _numpy_swag(flat, 3)
  np.testing.assert_allclose(_flat(state["mean"]), mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_flat(state["sq_mean"]), sq, rtol=1e-6, atol=1e-6)
  cols = swag.deviation_columns(state, rank=3)
  got = np.stack([_flat(jax.tree.map(lambda a: a[j], cols)) for j in range(3)])
  np.testing.assert_allclose(got, devs, rtol=1e-5, atol=1e-6)
  assert int(state["num_collected"]) == 7


def _recorder(collector, seen):
  def on_step(step, state, extra):
    if int(step) + 1 in set(collector.average_steps.tolist()):
      seen.append(jax.tree.map(np.asarray, state["params"]))
    return collector.on_step(step, state, extra)
  return on_step


def test_collector_in_fit_members_equals_numpy_over_the_same_iterates():
  x, y = _data()
  tx = optax.sgd(0.1, momentum=0.9)
  state = train.init_member_state(nn.Dense(2), x[:1], num_members=2, tx=tx, seed=0)
  collector = swag.swag_collector(collect_steps=[3, 5, 6, 8, 9, 12], rank=4)
  seen = []
  res = train.fit_members(state, nn.Dense(2), x, y, tx=tx, num_steps=12, batch_size=16, seed=0,
                          on_step=_recorder(collector, seen), extra=collector.init(state),
                          progress=False)
  assert len(seen) == 6
  for k in range(2):   # every run (the member axis) has its own moments
    run = swag.run_state(res.extra["swag"], k)
    mean, sq, devs = _numpy_swag([_flat(jax.tree.map(lambda a: a[k], p)) for p in seen], 4)
    np.testing.assert_allclose(_flat(run["mean"]), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(run["sq_mean"]), sq, rtol=1e-5, atol=1e-6)
    cols = swag.deviation_columns(run, rank=4)
    got = np.stack([_flat(jax.tree.map(lambda a: a[j], cols)) for j in range(4)])
    np.testing.assert_allclose(got, devs, rtol=1e-4, atol=1e-6)


def test_single_state_collector_with_train_fit():
  x, y = _data()
  tx = optax.sgd(0.05)
  model = nn.Dense(2)
  state = members.init_state(model.init(jax.random.key(0), x[:1]), tx)
  step = jax.jit(lambda s, b, k: members.train_step(s, b, k, model=model, tx=tx))
  batch_fn, _ = train.make_batch_fn(x, y, seed=0, batch_size=16)
  collector = swag.swag_collector(collect_steps=[2, 4, 6], rank=2, stacked=False)
  seen = []
  _, extra, _ = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=6,
                          key=jax.random.key(1), on_step=_recorder(collector, seen),
                          extra=collector.init(state), progress=False)
  mean, sq, _ = _numpy_swag([_flat(p) for p in seen], 2)
  np.testing.assert_allclose(_flat(extra["swag"]["mean"]), mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_flat(extra["swag"]["sq_mean"]), sq, rtol=1e-5, atol=1e-6)


def test_resumed_run_collects_exactly_what_an_uninterrupted_one_does(tmp_path):
  x, y = _data()
  plan = trajectory.swa_plan(base_lr=0.05, total_steps=20, pretrain_steps=8, swa_lr=0.02,
                             anneal_steps=4, every=2)
  tx = optim.make_optimizer(learning_rate=plan.schedule)
  collector = swag.swag_collector(collect_steps=plan.average_steps, rank=3)
  kw = dict(tx=tx, batch_size=16, seed=0, progress=False, on_step=collector.on_step)

  def state():
    return train.init_member_state(nn.Dense(2), x[:1], num_members=2, tx=tx, seed=0)

  ref = train.fit_members(state(), nn.Dense(2), x, y, num_steps=20, extra=collector.init(state()),
                          **kw)
  wd = str(tmp_path / "run")
  train.fit_members(state(), nn.Dense(2), x, y, num_steps=15, extra=collector.init(state()),
                    workdir=wd, **kw)                              # "interrupted" at step 15
  res = train.fit_members(state(), nn.Dense(2), x, y, num_steps=20,
                          extra=collector.init(state()), workdir=wd, **kw)
  assert int(np.asarray(res.extra["swag"]["num_collected"])[0]) == 5
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, res.extra),
               jax.tree.map(np.asarray, ref.extra))


def test_sample_is_mean_plus_documented_construction():
  state, flat = _random_state(rank=3, n=5)
  mean, sq, devs = _numpy_swag(flat, 3)
  var = np.maximum(sq - mean ** 2, 0)
  rng = np.random.default_rng(1)
  z1 = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), state["mean"])
  z2 = rng.normal(size=3).astype(np.float32)
  got = _flat(swag.sample_from_normals(state, z1, z2, rank=3, scale=0.5))
  want = mean + np.sqrt(0.5) * (np.sqrt(var) * _flat(z1) + devs.T @ z2 / np.sqrt(2.0))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The sample is linear in the normals: its covariance is exactly J J^T.
  unravel = ravel_pytree(z1)[1]
  f = lambda z: ravel_pytree(swag.sample_from_normals(state, unravel(z[:8]), z[8:], rank=3,
                                                      scale=0.5))[0]
  jac = np.asarray(jax.jacobian(f)(jnp.zeros(11)), np.float64)
  cov = 0.5 * (np.diag(var) + devs.T @ devs / (3 - 1))
  np.testing.assert_allclose(jac @ jac.T, cov, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(_flat(swag.sample_from_normals(state, jax.tree.map(
      np.zeros_like, z1), np.zeros(3), rank=3)), mean, rtol=1e-6, atol=1e-6)


def test_sample_uses_the_documented_keys():
  state, _ = _random_state(rank=2, n=4)
  got = swag.sample(jax.random.key(3), state, num_samples=2, rank=2)
  k_diag, k_low = jax.random.split(jax.random.split(jax.random.key(3), 2)[1])
  z1 = ravel_pytree(state["mean"])[1](jax.random.normal(k_diag, (8,)))  # 8 parameters
  want = swag.sample_from_normals(state, z1, jax.random.normal(k_low, (2,)), rank=2)
  np.testing.assert_allclose(_flat(jax.tree.map(lambda a: a[1], got)), _flat(want), rtol=1e-6)


@pytest.mark.parametrize("rank", [0, 3])
def test_samples_have_the_swag_mean_and_covariance(rank):
  """20,000 samples: mean and covariance within 5 standard errors of the closed form.

  For Gaussian samples the sample mean of coordinate i has variance C_ii / N and the
  sample covariance entry (i, j) has variance (C_ii C_jj + C_ij^2) / N.
  """
  state, flat = _random_state(rank=3, n=6, seed=2)
  mean, sq, devs = _numpy_swag(flat, 3)
  cov = 0.5 * np.diag(np.maximum(sq - mean ** 2, 0))
  if rank:
    cov = cov + 0.5 * devs[:rank].T @ devs[:rank] / (rank - 1)
  n = 20000
  draws = swag.sample(jax.random.key(0), state, num_samples=n, rank=rank)
  s = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(draws), np.float64)
  assert s.shape == (n, 8)
  se_mean = np.sqrt(np.diag(cov) / n)
  assert np.all(np.abs(s.mean(0) - mean) < 5 * se_mean)
  d = np.diag(cov)
  se_cov = np.sqrt((np.outer(d, d) + cov ** 2) / n)
  assert np.all(np.abs(np.cov(s.T) - cov) < 5 * se_cov + 1e-12)


def test_recalibrate_recomputes_every_samples_batchnorm():
  x, _ = _data(n=48, d=5)
  model = MLP(widths=(6,), num_classes=3, batch_norm=True)
  v = model.init(jax.random.key(0), x[:1])
  state = swag.init_state(v["params"], rank=2)
  for i in range(3):
    state = swag.collect(state, jax.tree.map(
        lambda a: a + 0.2 * jax.random.normal(jax.random.key(i), a.shape), v["params"]))
  params_S = swag.sample(jax.random.key(1), state, num_samples=2, rank=2)
  out = swag.recalibrate(model, params_S, x, batch_stats=v["batch_stats"], batch_size=16)
  for s in range(2):
    one = {"params": jax.tree.map(lambda a: a[s], params_S), "batch_stats": v["batch_stats"]}
    ref = averaging.recompute_batch_stats(model, one, (x[i:i + 16] for i in range(0, 48, 16)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[s], b, rtol=1e-5, atol=1e-6),
                 out["batch_stats"], ref["batch_stats"])
  means = np.asarray(out["batch_stats"]["bn_0"]["mean"])
  assert not np.allclose(means[0], means[1])       # samples differ, so do their statistics


def test_bad_input_raises():
  state, _ = _random_state(rank=3, n=2)
  with pytest.raises(ValueError, match="rank"):
    swag.init_state(state["mean"], rank=1)
  with pytest.raises(ValueError, match="needs at least 4"):
    swag.swag_collector(collect_steps=[1, 2, 3], rank=4)
  with pytest.raises(ValueError, match="exceeds"):
    swag.sample(jax.random.key(0), state, num_samples=2, rank=4)
  with pytest.raises(ValueError, match="needs 3 collected"):
    swag.sample(jax.random.key(0), state, num_samples=2, rank=3)
  with pytest.raises(ValueError, match="num_samples"):
    swag.sample(jax.random.key(0), state, num_samples=0, rank=2)
  with pytest.raises(ValueError, match="scale"):
    swag.sample(jax.random.key(0), state, num_samples=1, rank=2, scale=-1.0)
  stacked = swag.init_state(jax.tree.map(lambda a: a[None], state["mean"]), rank=2,
                            stacked=True)
  with pytest.raises(ValueError, match="run_state"):
    swag.sample(jax.random.key(0), stacked, num_samples=1, rank=0)
  x, y = _data()
  with pytest.raises(ValueError, match="average_steps"):
    swag.fit(nn.Dense(2), trajectory.sgd_plan(base_lr=0.1, total_steps=4), x, y, rank=2,
             optimizer=lambda s: optax.sgd(s), batch_size=16, seed=0)
