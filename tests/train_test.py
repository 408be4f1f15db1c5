"""The one training loop: exact resumption, NaN policy, single states, train_members."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ensembling import members, models, optim, train


class _Stop(Exception):
  pass


def _setup(digits, k=2):
  model = models.MLP(widths=(16,), dropout=0.1)
  tx = optim.make_optimizer(learning_rate=0.05)
  state = members.init_states(members.init_members(jax.random.key(0), model,
                                                   digits.x_train[:1], k), tx)
  step = members.ensemble_step(model=model, tx=tx, num_members=k, strategy="vmap")
  batch_fn, spe = train.make_batch_fn(digits.x_train[:256], digits.y_train[:256], seed=0,
                                      batch_size=32, num_members=k)
  eval_fn = lambda s: train.evaluate_members(model, s, digits.x_val, digits.y_val)
  return state, step, batch_fn, spe, eval_fn


def test_resume_after_interruption_equals_uninterrupted(digits, tmp_path):
  state, step, batch_fn, spe, eval_fn = _setup(digits)
  total = 2 * spe + 3
  kw = dict(step_fn=step, batch_fn=batch_fn, num_steps=total, key=jax.random.key(5),
            eval_fn=eval_fn, eval_every=4, checkpoint_every=5, progress=False)
  ref, _, ref_hist = train.fit(state, workdir=str(tmp_path / "a"), **kw)

  def crash(step_i, s, extra):
    if step_i == 11:  # dies after step 12 ran; last checkpoint was at step 10
      raise _Stop()
    return extra

  with pytest.raises(_Stop):
    train.fit(state, workdir=str(tmp_path / "b"), on_step=crash, **kw)
  got, _, hist = train.fit(state, workdir=str(tmp_path / "b"), **kw)
  chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(ref))
  assert [r["step"] for r in hist] == [r["step"] for r in ref_hist]
  for a, b in zip(hist, ref_hist):
    assert a == pytest.approx(b)
  with open(tmp_path / "b" / "metrics.jsonl") as f:
    assert len(f.readlines()) == len(ref_hist)


def test_extra_is_checkpointed_with_state(digits, tmp_path):
  state, step, batch_fn, spe, _ = _setup(digits)
  count = lambda i, s, extra: {"n": extra["n"] + 1}
  kw = dict(step_fn=step, batch_fn=batch_fn, key=jax.random.key(0), progress=False,
            checkpoint_every=3, workdir=str(tmp_path), on_step=count)
  _, extra, _ = train.fit(state, num_steps=4, extra={"n": jnp.zeros(())}, **kw)
  assert int(extra["n"]) == 4
  _, extra, _ = train.fit(state, num_steps=7, extra={"n": jnp.zeros(())}, **kw)
  assert int(extra["n"]) == 7


def test_non_finite_loss_names_member_step_and_rate(digits):
  state, step, batch_fn, _, _ = _setup(digits)
  state["params"]["Dense_0"]["kernel"] = state["params"]["Dense_0"]["kernel"].at[1].set(jnp.nan)
  with pytest.raises(train.NonFiniteLossError,
                     match=r"at step 0 for member\(s\) \[1\].*learning rate at this step is 0.05"):
    train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=2, key=jax.random.key(0),
              progress=False, schedule=optax.constant_schedule(0.05))


def test_fit_trains_a_single_pytree_and_keeps_the_best(tmp_path):
  """A single (unstacked) state: one key per step, scalar records, best_by, start_step."""
  x = np.linspace(-1, 1, 32, dtype=np.float32)[:, None]
  y = 3.0 * x
  tx = optax.sgd(0.1)
  loss = lambda p, batch, key: jnp.mean((batch["x"] * p["w"] - batch["y"]) ** 2)
  step = train.pytree_step(loss, tx)
  batch_fn = lambda t: {"x": x, "y": y}
  state = train.init_pytree_state({"w": jnp.zeros((1,))}, tx)
  evals = iter([0.5, 0.9, 0.2, 0.9])  # a fake validation score per eval point
  got, _, hist = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=4,
                           key=jax.random.key(0), eval_fn=lambda s: {"score": next(evals)},
                           eval_every=1, best_by="val_score", progress=False)
  assert [r["step"] for r in hist] == [1, 2, 3, 4] and "member" not in hist[0]
  w = 0.0  # plain gradient descent by hand: dL/dw = 2 mean(x (wx - y))
  ws = []
  for _ in range(4):
    w -= 0.1 * float(np.mean(2 * x * (w * x - y)))
    ws.append(w)
  np.testing.assert_allclose(float(got["params"]["w"][0]), ws[1], rtol=1e-5)  # first 0.9
  # Continuing in memory from step 2 equals the uninterrupted run.
  half, _, _ = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=2,
                         key=jax.random.key(0), progress=False)
  rest, _, _ = train.fit(half, step_fn=step, batch_fn=batch_fn, num_steps=4, start_step=2,
                         key=jax.random.key(0), progress=False)
  np.testing.assert_allclose(float(rest["params"]["w"][0]), ws[3], rtol=1e-5)
  with pytest.raises(ValueError, match="must hold 'loss'"):
    train.fit(state, step_fn=lambda s, b, k: (s, {"l": 0.0}), batch_fn=batch_fn, num_steps=1,
              key=jax.random.key(0), progress=False)


def test_train_members_is_the_hand_built_loop(digits):
  small = dataclasses.replace(digits, x_train=digits.x_train[:256], y_train=digits.y_train[:256])
  model = models.MLP(widths=(16,), dropout=0.1)
  tx = optim.make_optimizer(learning_rate=0.05)
  res = train.train_members(model, small.x_train, small.y_train, num_members=2, tx=tx,
                            epochs=1, batch_size=64, seed=3, lr_scale=[1.0, 0.5],
                            progress=False)
  state = members.init_states(members.init_members(jax.random.key(3), model, small.x_train[:1],
                                                   2), tx)
  state["opt_state"] = optim.set_hyperparams(state["opt_state"], lr_scale=np.array([1.0, 0.5]))
  batch_fn, spe = train.make_batch_fn(small.x_train, small.y_train, seed=3, batch_size=64,
                                      num_members=2)
  step = members.ensemble_step(model=model, tx=tx, num_members=2)
  keys = members.member_keys(jax.random.key(4), 2)
  for t in range(spe):
    state, _ = step(state, batch_fn(t), members.step_keys(keys, t))
  chex.assert_trees_all_close(jax.device_get(res.state), jax.device_get(state))
  assert res.strategy == "vmap"
  # the per-member lr_scale made the two members' updates differ
  assert not np.allclose(res.state["params"]["head"]["kernel"][0],
                         res.state["params"]["head"]["kernel"][1])


def test_batches_are_a_pure_function_of_the_step(digits):
  batch_fn, spe = train.make_batch_fn(digits.x_train, digits.y_train, seed=1, batch_size=16,
                                      num_members=3)
  single, _ = train.make_batch_fn(digits.x_train, digits.y_train, seed=1, batch_size=16)
  a, b = batch_fn(spe + 2), batch_fn(spe + 2)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert a["x"].shape[:2] == (3, 16) and single(0)["x"].shape[0] == 16
  np.testing.assert_array_equal(single(5)["y"], batch_fn(5)["y"][0])  # member 0's order
  assert not np.array_equal(batch_fn(0)["y"][0], batch_fn(0)["y"][1])  # own orders
  with pytest.raises(ValueError, match="x has 3 examples but y has 2"):
    train.make_batch_fn(np.zeros((3, 1)), np.zeros(2), seed=0, batch_size=1)
