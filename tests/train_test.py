"""The training loop: resumption is exact, NaNs fail fast."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ensembling import members, models, optim, train


class _Stop(Exception):
  pass


def _setup(digits, k=2):
  model = models.MLP(widths=(16,), dropout=0.1)
  tx = optim.make_optimizer(learning_rate=0.05)
  v = members.init_members(jax.random.key(0), model, digits.x_train[:1], k)
  state = members.init_states(v, tx)
  step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=k, strategy="vmap")
  batch_fn, spe = train.make_batch_fn(digits.x_train[:256], digits.y_train[:256], seed=0,
                                      batch_size=32, num_members=k)
  eval_fn = lambda s: train.evaluate_members(model.apply, s, digits.x_val, digits.y_val)
  return state, step, batch_fn, spe, eval_fn


def test_resume_after_interruption_equals_uninterrupted(digits, tmp_path):
  state, step, batch_fn, spe, eval_fn = _setup(digits)
  total = 2 * spe + 3
  kw = dict(step_fn=step, batch_fn=batch_fn, num_steps=total, key=jax.random.key(5),
            eval_fn=eval_fn, eval_every=4, checkpoint_every=5, progress=False)
  ref, _, ref_hist = train.fit(jax.tree.map(jnp.copy, state), workdir=str(tmp_path / "a"), **kw)

  def crash(step_i, s, extra):
    if step_i == 11:  # dies after step 12 ran; last checkpoint was at step 10
      raise _Stop()
    return extra

  with pytest.raises(_Stop):
    train.fit(jax.tree.map(jnp.copy, state), workdir=str(tmp_path / "b"), on_step=crash, **kw)
  got, _, hist = train.fit(jax.tree.map(jnp.copy, state), workdir=str(tmp_path / "b"), **kw)
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


def test_non_finite_loss_names_the_member(digits):
  state, step, batch_fn, _, _ = _setup(digits)
  state["params"]["Dense_0"]["kernel"] = state["params"]["Dense_0"]["kernel"].at[1].set(jnp.nan)
  with pytest.raises(train.NonFiniteLossError, match=r"member\(s\) \[1\]"):
    train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=2, key=jax.random.key(0),
              progress=False)


def test_resumes_a_checkpoint_without_metric_window(digits, tmp_path):
  """Checkpoints written before the metric window was saved still resume exactly."""
  from ensembling import checkpoint
  state, step, batch_fn, spe, _ = _setup(digits)
  kw = dict(step_fn=step, batch_fn=batch_fn, key=jax.random.key(5), progress=False)
  ref, _, _ = train.fit(jax.tree.map(jnp.copy, state), num_steps=6, **kw)
  half, _, _ = train.fit(jax.tree.map(jnp.copy, state), num_steps=3, **kw)
  mgr = checkpoint.manager(str(tmp_path / "checkpoints"))
  checkpoint.save(mgr, 3, {"state": jax.device_get(half), "extra": None})  # the old format
  got, _, hist = train.fit(jax.tree.map(jnp.copy, state), num_steps=6, workdir=str(tmp_path),
                           **kw)
  chex.assert_trees_all_equal(jax.device_get(got), jax.device_get(ref))
  assert [r["step"] for r in hist] == [6, 6]


def test_fit_members_is_the_hand_built_loop(digits):
  """`fit_members(config)` = build_state + member_fns + fit written out by hand."""
  from ensembling import configlib
  c = configlib.base_config()
  c.members, c.epochs, c.batch_size, c.progress = 2, 1, 64, False
  c.model = configlib.model_config("mlp", widths=(16,), dropout=0.1)
  c.optim.lr_scale = [1.0, 0.5]
  small = dataclasses.replace(digits, x_train=digits.x_train[:256], y_train=digits.y_train[:256])
  model, got, strategy, _ = train.fit_members(c, small, None, eval_every_epoch=False)
  batch_fn, spe = train.make_batch_fn(small.x_train, small.y_train, seed=c.seed,
                                      batch_size=c.batch_size, num_members=2)
  _, tx, _, state = train.build_state(c, small, total_steps=spe)
  strategy2, step_fn, _ = train.member_fns(c, model, tx, state, eval_x=small.x_val,
                                           eval_y=small.y_val)
  assert strategy == strategy2
  ref, _, _ = train.fit(state, step_fn=step_fn, batch_fn=batch_fn, num_steps=spe,
                        key=jax.random.key(c.seed + 1), progress=False)
  chex.assert_trees_all_close(jax.device_get(got["params"]), jax.device_get(ref["params"]))
  # the per-member lr_scale made the two members' updates differ
  assert not np.allclose(got["params"]["head"]["kernel"][0], got["params"]["head"]["kernel"][1])
