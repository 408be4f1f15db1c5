"""The one training loop, and what it is fed.

`fit` runs any step function `(state, batch, key) -> (state, metrics)` for a number of
steps: members of an ensemble (a state with a leading member axis), SuperNet heads,
shared-head and text adapters, learned soups. It owns the batch order (a pure function of
the step, so resumption is exact), periodic evaluation written to `metrics.jsonl`, orbax
checkpoints, the NaN policy and the progress bar. `train_members` is the deep-ensemble
recipe on top of it: K members of any model (`models.as_model`) from keyword arguments.

Example (two members of a plain Linen module, one epoch on random data):

>>> import numpy as np, jax, flax.linen as nn, optax
>>> x = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
>>> y = (x[:, 0] > 0).astype(np.int32)
>>> res = train_members(nn.Dense(2), x, y, num_members=2, tx=optax.sgd(0.1), epochs=1,
...                     batch_size=16, seed=0, progress=False)
>>> res.state["params"]["kernel"].shape, res.strategy
((2, 5, 2), 'vmap')
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from ensembling import (checkpoint, checks, data, distributed, ensemble, losses, members, metrics,
                        optim)
from ensembling.models.contract import as_model

PyTree = Any
log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or infinite."""


# --------------------------------------------------------------------------- batches

def make_batch_fn(x: np.ndarray, y: np.ndarray, *, seed: int, batch_size: int,
                  num_members: int | None = None) -> tuple[Callable[[int], dict], int]:
  """`batch_fn(step) -> {"x": (K, B, ...), "y": (K, B)}` and the steps per epoch.

  Each member has its own shuffle for every epoch; `batch_fn` is a pure function of the
  global step, which is what makes resumption exact. With `num_members=None` the batches
  have no member axis ({"x": (B, ...), "y": (B,)}: member 0's order of K = 1).
  """
  checks.paired(x, y)
  k = 1 if num_members is None else members.check_num_members(num_members)
  indices, steps_per_epoch = data.batch_indices_fn(seed, num_examples=len(x),
                                                   batch_size=batch_size, num_members=k)

  def batch_fn(step: int) -> dict:
    idx = indices(step) if num_members is not None else indices(step)[0]
    return {"x": x[idx], "y": y[idx]}

  return batch_fn, steps_per_epoch


# --------------------------------------------------------------------------- pytree training

def init_pytree_state(params: PyTree, tx: optax.GradientTransformation) -> dict:
  """The state `fit` trains for one pytree (a head, an adapter, soup coefficients)."""
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def pytree_step(loss_fn: Callable, tx: optax.GradientTransformation, *,
                has_aux: bool = False) -> Callable:
  """A jitted `(state, batch, key) -> (state, {"loss", ...})` for `init_pytree_state` states.

  Args:
    loss_fn: `(params, batch, key) -> loss` (or `(loss, {name: value})` with `has_aux`).
    tx: the optimizer (frozen leaves: `optim.freeze`).
    has_aux: `loss_fn` also returns a dict of metrics to log.
  """
  def step(state, batch, key):
    (loss, aux), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, key) if has_aux else (loss_fn(p, batch, key), {}),
        has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return ({"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
             "step": state["step"] + 1}, {"loss": loss, **aux})
  return jax.jit(step)


# --------------------------------------------------------------------------- the loop

def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, records: Iterable[Mapping]) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def show_progress(progress: bool) -> bool:
  """Progress bars only when asked for and stderr is a terminal (no \\r in log files)."""
  return bool(progress) and sys.stderr.isatty()


def num_members_of(state: PyTree) -> int | None:
  """K for a stacked state (its `step` has shape (K,)), None for a single one."""
  step = state.get("step") if isinstance(state, Mapping) else None
  if step is None:
    raise ValueError("fit trains a state dict with a 'step' entry (see members.init_states "
                     "or train.init_pytree_state).")
  return int(np.shape(step)[0]) if np.ndim(step) == 1 else None


def _lr_hint(schedule, state, step, member):
  if schedule is None:
    return ""
  lr = float(schedule(step))
  hp = getattr(state.get("opt_state"), "hyperparams", {}) or {}
  if "lr_scale" in hp:
    scale = np.asarray(hp["lr_scale"])
    lr *= float(scale[member] if scale.ndim and member is not None else scale)
  if lr < 0:
    return f" The learning rate at this step is {lr:g}: negative, so the loss is maximised."
  return f" The learning rate at this step is {lr:g}; a smaller one may help."


def _non_finite(loss, batch, step, k, schedule, state, restored_from):
  bad = np.flatnonzero(~np.isfinite(np.reshape(loss, -1))).tolist()
  who = f"member(s) {bad}" if k is not None else "the model"
  member = bad[0] if k is not None else None
  hints = [_lr_hint(schedule, state, step, member).strip()]
  xb = batch.get("x") if isinstance(batch, Mapping) else None
  if xb is not None and np.issubdtype(np.asarray(xb).dtype, np.floating):
    xb = np.asarray(xb if k is None else xb[member])
    if not np.isfinite(xb).all():
      hints.append("The batch itself holds NaN or inf inputs: check the data.")
  if restored_from is not None:
    hints.append(f"The run resumed from the checkpoint of step {restored_from} (it verified).")
  values = np.reshape(loss, -1)[bad].tolist()
  return NonFiniteLossError(f"Loss became non-finite at step {step} for {who}: {values}. "
                            + " ".join(h for h in hints if h))


def fit(state: PyTree, *, step_fn: Callable, batch_fn: Callable[[int], Any],
        num_steps: int, key: jax.Array, workdir: str | None = None,
        eval_fn: Callable[[PyTree], Mapping[str, Any]] | None = None,
        eval_every: int = 0, eval_at_start: bool = False, checkpoint_every: int = 0,
        on_step: Callable[[int, PyTree, PyTree], PyTree] | None = None,
        extra: PyTree = None, progress: bool = True, desc: str = "train",
        steps_per_epoch: int | None = None, eval_split: str = "val", start_step: int = 0,
        schedule: optax.Schedule | None = None, best_by: str | None = None,
        read_only: bool = False) -> tuple[PyTree, PyTree, list[dict]]:
  """Runs `step_fn` up to `num_steps`; resumes from `workdir/checkpoints`.

  The state passed in is copied first, so step functions that donate their input never
  invalidate the caller's arrays.

  Args:
    state: a stacked member state (`members.init_states`: member keys and per-member
      records) or a single one (`init_pytree_state`); used as is unless a checkpoint
      exists.
    step_fn: `(state, batch, key) -> (state, metrics)`; metrics must hold "loss".
      For a member state `key` is the (K,) member keys of the step
      (`members.ensemble_step`), otherwise one key.
    batch_fn: `step -> batch`, deterministic in `step`.
    num_steps: the step count to reach (a resumed run continues up to it).
    key: base PRNG key; member k, step t uses fold_in(split(key, K)[k], t), a single
      state fold_in(key, t).
    workdir: where `metrics.jsonl` and `checkpoints/` go (None: nothing written).
    eval_fn: `state -> {name: (K,) array or scalar}`, called every `eval_every` steps
      and at the end; records go to metrics.jsonl, one per member.
    eval_at_start: also evaluate before the first step (a record at step 0).
    checkpoint_every: steps between checkpoints (0: only at the end).
    on_step: `(step, state, extra) -> extra` after every step (host side), e.g. to
      collect snapshots; `extra` is checkpointed with the state.
    extra: the initial value of `extra` (a pytree of arrays, or None).
    progress: a tqdm bar (only on a terminal).
    desc: the bar's and the log's label.
    steps_per_epoch: adds an "epoch" field to the records.
    eval_split: the prefix of `eval_fn`'s entries in the records ("val_accuracy"; None:
      the names as `eval_fn` gives them).
    start_step: the step to start from without a checkpoint (continuing in memory).
    schedule: the learning-rate schedule, named in the non-finite-loss message.
    best_by: a scalar eval entry, e.g. "val_accuracy": return the state of the eval
      point where it was highest (ties: the earliest) instead of the last one (single
      states only).
    read_only: load what a finished run left in `workdir` instead of training: its
      checkpoint at `num_steps` (verified) and its metrics.jsonl; nothing is written,
      and a workdir without that checkpoint is an error.

  Returns:
    (state, extra, history): history holds the metrics.jsonl records.
  """
  k = num_members_of(state)
  if best_by and k is not None:
    raise ValueError("best_by selects one state; it is for single (unstacked) states.")
  if k is not None:
    keys = members.member_keys(key, k)
    key_of = lambda t: members.step_keys(keys, t)
  else:
    key_of = lambda t: jax.random.fold_in(key, t)
  state = jax.tree.map(jnp.array, state)  # our own copy: the caller's arrays stay valid
  # Running sums of the train metrics since the last eval; checkpointed, so a resumed
  # run logs exactly what an uninterrupted one would.
  metrics_shape = jax.eval_shape(step_fn, state, batch_fn(start_step), key_of(start_step))[1]
  if "loss" not in metrics_shape:
    raise ValueError(f"step_fn's metrics must hold 'loss'; got {sorted(metrics_shape)}.")
  window = {"sum": jax.tree.map(lambda m: np.zeros(m.shape, np.float32), metrics_shape),
            "count": np.zeros((), np.int32)}
  mgr, start, restored_from = None, int(start_step), None
  metrics_path = os.path.join(workdir, "metrics.jsonl") if workdir else None
  if not distributed.is_primary():
    metrics_path = None  # process 0 writes the records; every process keeps them
  history: list[dict] = []
  best = None
  if read_only:
    state, extra = _load_finished(workdir, {"state": state, "extra": extra, "window": window},
                                  num_steps=int(num_steps))
    records = os.path.join(workdir, "metrics.jsonl")
    history = _read_jsonl(records) if os.path.exists(records) else []
    return state, extra, [r for r in history if r["step"] <= int(num_steps)]
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    restored = checkpoint.restore_latest_valid(mgr, {"state": state, "extra": extra,
                                                     "window": window})
    if restored is not None:
      restored_from, tree = restored
      state, extra, window = tree["state"], tree["extra"], tree["window"]
      start = restored_from
      log.info("%s: resumed from step %d", desc, start)
      if metrics_path:
        history = [r for r in _read_jsonl(metrics_path) if r["step"] <= start]
        _write_jsonl(metrics_path, history)
    elif metrics_path and os.path.exists(metrics_path):
      os.remove(metrics_path)
  if k is not None:
    state = members.shard_members(state)
  # A member step may hold the state in its own form between steps (`MemberStep.hold`:
  # K separate states for the 'loop' strategy); the stacked state is rebuilt only when
  # something reads it (an eval, `on_step`, a checkpoint, the end).
  holds = k is not None and hasattr(step_fn, "step_held")
  held, stacked = (step_fn.hold(state, copy=False), state) if holds else (state, state)

  def current():
    nonlocal stacked
    if stacked is None:
      stacked = step_fn.release(held)
    return stacked

  initial_loss = None  # the loss of the very first step (before any update), per member

  def record(step, train_m, eval_m):
    nonlocal initial_loss
    rows = range(k) if k is not None else [None]
    recs = []
    for m in rows:
      r = {"step": int(step)} if m is None else {"step": int(step), "member": m}
      if initial_loss is not None:
        r["train_initial_loss"] = float(initial_loss if m is None else initial_loss[m])
      if steps_per_epoch:
        r["epoch"] = step / steps_per_epoch
      pick = lambda v: float(np.asarray(v) if m is None or np.ndim(v) == 0 else np.asarray(v)[m])
      r.update({f"train_{n}": pick(v) for n, v in train_m.items()})
      r.update({(f"{eval_split}_{n}" if eval_split else n): pick(v) for n, v in eval_m.items()})
      recs.append(r)
    initial_loss = None
    history.extend(recs)
    if metrics_path:
      with open(metrics_path, "a") as f:
        for r in recs:
          f.write(json.dumps(r) + "\n")
    return recs

  def evaluate(done, train_m):
    nonlocal best
    state = current()
    eval_m = dict(eval_fn(state)) if eval_fn else {}
    recs = record(done, train_m, eval_m)
    if best_by:
      if best_by not in recs[0]:
        raise ValueError(f"best_by={best_by!r} is not a recorded metric; have {sorted(recs[0])}.")
      if best is None or recs[0][best_by] > best[0]:
        best = (recs[0][best_by], jax.tree.map(jnp.array, state))
    return eval_m

  bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not show_progress(progress),
             dynamic_ncols=True, mininterval=1.0)
  t0 = time.time()
  if eval_at_start and start == int(start_step) and not history:
    evaluate(start, {})
  try:
    for step in range(start, num_steps):
      batch = batch_fn(step)
      keys_t = key_of(step)
      if k is not None and not (holds and isinstance(held, list)):
        batch = members.shard_members(batch)  # a held list takes its members' own batches
        keys_t = members.shard_members(keys_t)
      if holds:
        held, m = step_fn.step_held(held, batch, keys_t)
        stacked = None
      else:
        held, m = step_fn(held, batch, keys_t)
        stacked = held
      m = distributed.to_host(m)
      loss = np.asarray(m["loss"])
      if not np.isfinite(loss).all():
        raise _non_finite(loss, batch, step, k, schedule, current(), restored_from)
      if step == 0:
        initial_loss = loss
      window = {"sum": jax.tree.map(lambda a, b: a + np.asarray(b, np.float32), window["sum"], m),
                "count": window["count"] + 1}
      if on_step is not None:
        extra = on_step(step, current(), extra)
      done = step + 1
      bar.update(1)
      is_last = done == num_steps
      if (eval_every and done % eval_every == 0) or is_last:
        train_m = {n: v / max(int(window["count"]), 1) for n, v in window["sum"].items()}
        window = {"sum": jax.tree.map(np.zeros_like, window["sum"]), "count": np.zeros((), np.int32)}
        eval_m = evaluate(done, train_m)
        shown = eval_m.get("accuracy", train_m.get("accuracy"))
        post = {"loss": f"{np.mean(train_m['loss']):.3f}"}
        if shown is not None:
          post["acc"] = f"{np.mean(shown):.3f}"
        bar.set_postfix(**post)
        if not show_progress(progress) and progress:
          log.info("%s: step %d/%d %s", desc, done, num_steps,
                   " ".join(f"{n}={v}" for n, v in post.items()))
      if mgr and ((checkpoint_every and done % checkpoint_every == 0) or is_last):
        checkpoint.save(mgr, done, {"state": current(), "extra": extra, "window": window})
  finally:
    bar.close()
    if mgr is not None:
      mgr.close()
  log.info("%s: %d steps in %.1fs", desc, max(num_steps - start, 0), time.time() - t0)
  if best_by and best is not None:
    return best[1], extra, history
  return current(), extra, history


def _load_finished(workdir: str | None, target: PyTree, *, num_steps: int):
  """(state, extra) of the verified checkpoint at `num_steps` in `workdir/checkpoints`."""
  if not workdir:
    raise ValueError("read_only loads a finished run: give its workdir.")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):  # checked first: the manager would create it
    raise ValueError(f"{workdir} holds no finished training: it holds no checkpoint. "
                     "Rerun its own command to finish it.")
  mgr = checkpoint.manager(ckpt_dir)
  try:
    steps = sorted(mgr.all_steps())
    if num_steps not in steps:
      where = f"its checkpoints are at steps {steps}" if steps else "it holds no checkpoint"
      raise ValueError(f"{workdir} holds no finished training: {where}, and the run ends at "
                       f"step {num_steps}. Rerun its own command to finish it.")
    tree = checkpoint.restore(mgr, target, step=num_steps)
  finally:
    mgr.close()
  return tree["state"], tree["extra"]


def divergence_warnings(history: list[dict], *, num_classes: int, num_examples: int,
                        split: str = "val") -> list[str]:
  """Members that diverged without a NaN: at chance accuracy, or above their initial loss.

  A member is at chance when its last `<split>_accuracy` (else `train_accuracy`) is below
  1/C + 3 standard errors of a chance classifier on `num_examples` examples; its loss
  rose when its last `train_loss` exceeds `train_initial_loss` (the loss of step 0,
  before any update). Each finding is logged as a warning and returned as a sentence.

  Args:
    history: `fit` records (one per member and evaluation).
    num_classes: C.
    num_examples: examples behind the accuracy (the eval split's size).
    split: the eval records' prefix.

  Returns:
    One message per diverged member (empty when all is well).
  """
  chance = 1.0 / num_classes
  bar = chance + 3.0 * np.sqrt(chance * (1 - chance) / max(int(num_examples), 1))
  out = []
  by_member: dict = {}
  for r in history:
    by_member.setdefault(r.get("member"), []).append(r)
  for member, recs in sorted(by_member.items(), key=lambda kv: (kv[0] is None, kv[0])):
    who = "the model" if member is None else f"member {member}"
    last = max(recs, key=lambda r: r["step"])
    acc_key = f"{split}_accuracy" if f"{split}_accuracy" in last else "train_accuracy"
    first = next((r for r in recs if "train_initial_loss" in r), None)
    if acc_key in last and last[acc_key] < bar:
      out.append(f"{who} ended at chance accuracy ({acc_key} {last[acc_key]:.4f}, chance "
                 f"{chance:.4f}): it diverged or never learned.")
    if first is not None and "train_loss" in last and last["train_loss"] > first["train_initial_loss"]:
      out.append(f"{who} ended above its initial loss (train_loss {last['train_loss']:.4f} > "
                 f"{first['train_initial_loss']:.4f} at step 0): training diverged.")
  for msg in out:
    log.warning(msg)
  return out


# --------------------------------------------------------------------------- deep ensembles

def evaluate_members(model, state_K: PyTree, x: np.ndarray, y: np.ndarray, *,
                     strategy: str = "auto", batch_size: int = 1000) -> dict[str, np.ndarray]:
  """Per-member accuracy and NLL on (x, y): arrays of shape (K,)."""
  logits = members.predict(model, state_K, x, batch_size=batch_size, strategy=strategy)
  probs = ensemble.members_probs(logits)
  return {
      "accuracy": np.array([metrics.accuracy(p, y) for p in probs]),
      "nll": np.array([metrics.nll(p, y) for p in probs]),
  }


class TrainResult(NamedTuple):
  """What `train_members` returns.

  Attributes:
    state: the stacked member states.
    strategy: the member-parallel strategy that ran.
    seconds: wall time of the training call (0-ish when everything was restored).
    history: the metrics records (one per member and evaluation).
    extra: what `on_step` collected (None without it).
  """
  state: PyTree
  strategy: str
  seconds: float
  history: list
  extra: PyTree = None


def init_member_state(model, sample_input, *, num_members: int,
                      tx: optax.GradientTransformation, seed: int, lr_scale=1.0,
                      weight_decay=None, init_variables: PyTree = None) -> PyTree:
  """The stacked initial state of K members (`members.init_states`).

  Args:
    model: anything `models.as_model` accepts.
    sample_input: an example batch (shape only matters).
    num_members: K.
    tx: the optimizer; per-member `lr_scale` / `weight_decay` need `optim.make_optimizer`.
    seed: member k is initialised from `split(key(seed), K)[k]`.
    lr_scale, weight_decay: scalars or length-K sequences (None / 1: keep `tx`'s).
    init_variables: stacked variables to start from instead of a fresh init.

  Returns:
    The state dict with a leading member axis.
  """
  k = members.check_num_members(num_members)
  variables = init_variables if init_variables is not None else members.init_members(
      jax.random.key(seed), model, sample_input, k)
  state = members.init_states(variables, tx)
  hp = {}
  if lr_scale is not None and np.any(np.asarray(lr_scale) != 1.0):
    hp["lr_scale"] = optim.per_member_values(lr_scale, k, name="lr_scale")
  if weight_decay is not None:
    hp["weight_decay"] = optim.per_member_values(weight_decay, k, name="weight_decay")
  if hp:
    state["opt_state"] = optim.set_hyperparams(state["opt_state"], **hp)
  return state


def fit_members(state: PyTree, model, x: np.ndarray, y: np.ndarray, *,
                tx: optax.GradientTransformation, num_steps: int, batch_size: int, seed: int,
                workdir: str | None = None, eval_data: tuple | None = None,
                eval_split: str = "val", strategy: str = "auto",
                loss_fn: Callable = losses.softmax_cross_entropy,
                step_fn: Callable = members.train_step, eval_every: int = 0,
                checkpoint_every: int = 0, eval_batch_size: int = 1000,
                progress: bool = True, desc: str = "members",
                schedule: optax.Schedule | None = None, on_step=None,
                extra=None, read_only: bool = False) -> TrainResult:
  """Trains the stacked member `state` for `num_steps` steps, each member on its own batches.

  Member k sees the batches of `make_batch_fn(x, y, seed=seed, ...)` and gets dropout
  keys from `key(seed + 1)`. Validation metrics (on `eval_data`) are logged and
  checkpoints written every epoch unless told otherwise, so a rerun on the same workdir
  resumes.

  Args:
    state: from `init_member_state` (or any stacked `members.init_states`).
    model: anything `models.as_model` accepts.
    x, y: training data.
    tx: the optimizer the state was made with.
    num_steps: steps to reach.
    batch_size: per member.
    seed: data order and dropout derive from it.
    workdir: metrics.jsonl and checkpoints (None: nothing written).
    eval_data: (x, y) evaluated every `eval_every` steps (default: each epoch).
    eval_split: the records' prefix for `eval_data` ("val").
    strategy: member-parallel strategy (`members.STRATEGIES`).
    loss_fn, step_fn: the members' loss and one-member step.
    eval_every, checkpoint_every: in steps; 0 means once per epoch.
    eval_batch_size: inference chunk size.
    progress, desc: the progress bar.
    schedule: the learning-rate schedule inside `tx` (for error messages).
    on_step, extra: passed to `fit` (e.g. a snapshot collector).
    read_only: load the members a finished run of this same call left in `workdir`
      (verified, nothing written; see `fit`) instead of training them.

  Returns:
    A `TrainResult`.
  """
  k = num_members_of(state)
  if k is None:
    raise ValueError("fit_members trains a stacked state (leading member axis).")
  batch_fn, spe = make_batch_fn(x, y, seed=seed, batch_size=batch_size, num_members=k)
  step = members.ensemble_step(model=model, tx=tx, num_members=k, strategy=strategy,
                               loss_fn=loss_fn, step_fn=step_fn, donate=True)
  step.resolve(state["params"])
  eval_fn = None
  if eval_data is not None:
    eval_fn = lambda s: evaluate_members(model, s, *eval_data, strategy=step.strategy,
                                         batch_size=eval_batch_size)
  t0 = time.perf_counter()
  state, extra, history = fit(
      state, step_fn=step, batch_fn=batch_fn, num_steps=int(num_steps),
      key=jax.random.key(seed + 1), workdir=workdir, eval_fn=eval_fn,
      eval_every=eval_every or spe, checkpoint_every=checkpoint_every or spe,
      progress=progress, desc=f"{desc}: {k} x {_model_name(model)} ({step.strategy})",
      steps_per_epoch=spe, eval_split=eval_split, schedule=schedule, on_step=on_step,
      extra=extra, read_only=read_only)
  return TrainResult(state, step.strategy, time.perf_counter() - t0, history, extra)


def train_members(model, x: np.ndarray, y: np.ndarray, *, num_members: int,
                  tx: optax.GradientTransformation, epochs: int, batch_size: int, seed: int,
                  lr_scale=1.0, weight_decay=None, init_variables: PyTree = None,
                  **fit_kwargs) -> TrainResult:
  """A deep ensemble: `init_member_state` then `fit_members` for `epochs` epochs.

  Args:
    model: anything `models.as_model` accepts.
    x, y: training data.
    num_members: K.
    tx: the optimizer (per-member hyperparameters: `optim.make_optimizer`).
    epochs: passes over (x, y).
    batch_size: per member.
    seed: init, data order and dropout derive from it.
    lr_scale, weight_decay, init_variables: see `init_member_state`.
    **fit_kwargs: see `fit_members` (workdir, eval_data, strategy, progress, ...).

  Returns:
    A `TrainResult`.
  """
  state = init_member_state(model, x[:1], num_members=num_members, tx=tx, seed=seed,
                            lr_scale=lr_scale, weight_decay=weight_decay,
                            init_variables=init_variables)
  steps = data.num_steps_per_epoch(len(x), batch_size) * int(epochs)
  return fit_members(state, model, x, y, tx=tx, num_steps=steps, batch_size=batch_size,
                     seed=seed, **fit_kwargs)


def _model_name(model) -> str:
  m = as_model(model)
  obj = m.module[1] if m.kind == "functions" else m.module
  return getattr(obj, "__name__", type(obj).__name__)
