"""The training loop: resumption is exact, NaNs fail fast."""

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
