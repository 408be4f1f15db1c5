"""The training loop shared by experiments: plain functions over a stacked state.

`fit` runs member-parallel steps with per-member data order, periodic evaluation
written to `metrics.jsonl`, orbax checkpoints, exact resumption, and NaN fail-fast.
What is trained (state, step function, batches) is passed in, so trajectory methods,
soups and SuperNet heads reuse it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ensembling import checkpoint, data, ensemble, members, metrics, models, optim, schedules
from ensembling import tree as tree_lib

PyTree = Any
log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """A member's loss became NaN or infinite."""


def make_batch_fn(x: np.ndarray, y: np.ndarray, *, seed: int, batch_size: int,
                  num_members: int) -> tuple[Callable[[int], dict], int]:
  """`batch_fn(step) -> {"x": (K, B, ...), "y": (K, B)}` and the steps per epoch.

  Each member has its own shuffle for every epoch; `batch_fn` is a pure function of
  the global step, which is what makes resumption exact.
  """
  steps_per_epoch = data.num_steps_per_epoch(len(x), batch_size)
  cache: dict[int, np.ndarray] = {}

  def batch_fn(step: int) -> dict:
    epoch, s = divmod(int(step), steps_per_epoch)
    if epoch not in cache:
      cache.clear()
      cache[epoch] = data.member_batch_indices(seed, epoch, num_examples=len(x),
                                               batch_size=batch_size, num_members=num_members)
    idx = cache[epoch][s]
    return {"x": x[idx], "y": y[idx]}

  return batch_fn, steps_per_epoch


def build_state(config, splits: data.Splits, *, total_steps: int):
  """Model, optimizer and the stacked initial state that `config` describes.

  Returns (model, tx, schedule, state_K). Per-member `optim.lr_scale` and
  `optim.weight_decay` (scalars or length-K lists) are written into the state.
  """
  k = int(config.members)
  model = models.make_model(config.model, num_classes=splits.num_classes)
  schedule = schedules.make_schedule(config.optim, total_steps=total_steps)
  tx = optim.optimizer_from_config(config.optim, schedule=schedule)
  key = jax.random.key(int(config.seed))
  variables = members.init_members(key, model, splits.x_train[:1], k)
  state = members.init_states(variables, tx)
  state["opt_state"] = optim.set_hyperparams(
      state["opt_state"],
      lr_scale=optim.per_member_values(config.optim.get("lr_scale", 1.0), k, name="optim.lr_scale"),
      weight_decay=optim.per_member_values(config.optim.get("weight_decay", 0.0), k,
                                           name="optim.weight_decay"))
  return model, tx, schedule, state


def member_fns(config, model, tx, state_K: PyTree, *, eval_x: np.ndarray, eval_y: np.ndarray,
               **step_kwargs) -> tuple[str, Callable, Callable]:
  """(strategy, step_fn, eval_fn) for training `state_K` as `config` asks.

  The strategy is `config.members_strategy` resolved for these parameters; `step_fn` is
  `members.ensemble_step` (extra keyword arguments, e.g. `loss_fn`, go to it); `eval_fn`
  is `evaluate_members` on (eval_x, eval_y).
  """
  k = tree_lib.num_members(state_K["step"])
  strategy = members.resolve_strategy(config.members_strategy, state_K["params"])
  step_fn = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=k,
                                  strategy=strategy, **step_kwargs)
  eval_fn = lambda s: evaluate_members(model.apply, s, eval_x, eval_y, strategy=strategy,
                                       batch_size=config.eval_batch_size)
  return strategy, step_fn, eval_fn


def fit_members(config, splits: data.Splits, workdir: str | None, *, desc: str = "members",
                eval_every_epoch: bool = True):
  """Trains the `config.members` members that `config` describes (a deep ensemble).

  Each member has its own init and data order; validation metrics are logged every
  epoch (`eval_every_epoch`) and checkpoints written every epoch unless the config says
  otherwise, so a rerun on the same workdir resumes.

  Returns (model, state_K, strategy, seconds).
  """
  k = int(config.members)
  batch_fn, spe = make_batch_fn(splits.x_train, splits.y_train, seed=config.seed,
                                batch_size=config.batch_size, num_members=k)
  total = spe * int(config.epochs)
  model, tx, _, state = build_state(config, splits, total_steps=total)
  strategy, step_fn, eval_fn = member_fns(config, model, tx, state, eval_x=splits.x_val,
                                          eval_y=splits.y_val)
  t0 = time.perf_counter()
  state, _, _ = fit(
      state, step_fn=step_fn, batch_fn=batch_fn, num_steps=total,
      key=jax.random.key(config.seed + 1), workdir=workdir,
      eval_fn=eval_fn if eval_every_epoch else None,
      eval_every=config.eval_every_steps or spe,
      checkpoint_every=config.checkpoint_every_steps or spe,
      progress=config.progress, desc=f"{desc}: {k} x {config.model.name} ({strategy})",
      steps_per_epoch=spe)
  return model, state, strategy, time.perf_counter() - t0


def evaluate_members(apply_fn: Callable, state_K: PyTree, x: np.ndarray, y: np.ndarray, *,
                     strategy: str = "auto", batch_size: int = 1000) -> dict[str, np.ndarray]:
  """Per-member accuracy and NLL on (x, y): arrays of shape (K,)."""
  logits = members.predict(apply_fn, members.variables_of(state_K), x,
                           batch_size=batch_size, strategy=strategy)
  probs = ensemble.members_probs(logits)
  return {
      "accuracy": np.array([metrics.accuracy(p, y) for p in probs]),
      "nll": np.array([metrics.nll(p, y) for p in probs]),
  }


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, records: Iterable[Mapping]) -> None:
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def fit(state_K: PyTree, *, step_fn: Callable, batch_fn: Callable[[int], dict],
        num_steps: int, key: jax.Array, workdir: str | None = None,
        eval_fn: Callable[[PyTree], Mapping[str, np.ndarray]] | None = None,
        eval_every: int = 0, checkpoint_every: int = 0,
        on_step: Callable[[int, PyTree, PyTree], PyTree] | None = None,
        extra: PyTree = None, progress: bool = True, desc: str = "train",
        steps_per_epoch: int | None = None, eval_split: str = "val") -> tuple[PyTree, PyTree, list[dict]]:
  """Runs `num_steps` member-parallel steps; resumes from `workdir/checkpoints`.

  Args:
    state_K: the stacked initial state (used as-is unless a checkpoint exists).
    step_fn: `(state_K, batch_K, keys_K) -> (state_K, metrics_K)` (see
      `members.ensemble_step`).
    batch_fn: `step -> batch_K`, deterministic in `step`.
    num_steps: total steps (a resumed run continues up to it).
    key: base PRNG key; member k, step t uses fold_in(split(key, K)[k], t).
    workdir: where `metrics.jsonl` and `checkpoints/` go (None: nothing written).
    eval_fn: `state_K -> {name: (K,) array}` called every `eval_every` steps and at
      the end; results go to metrics.jsonl, one record per member.
    checkpoint_every: steps between checkpoints (0: only at the end).
    on_step: `(step, state_K, extra) -> extra` after every step (host side), e.g. to
      collect snapshots; `extra` is checkpointed with the state.
    extra: the initial value of `extra` (a pytree of arrays, or None).
    eval_split: the prefix of `eval_fn`'s entries in metrics.jsonl ("val_accuracy").

  Returns:
    (state_K, extra, history): history holds the metrics.jsonl records.
  """
  k = tree_lib.num_members(state_K["step"])
  keys = members.member_keys(key, k)
  # Running sums of the train metrics since the last eval; checkpointed, so a resumed
  # run logs exactly what an uninterrupted one would.
  metrics_shape = jax.eval_shape(step_fn, state_K, batch_fn(0), members.step_keys(keys, 0))[1]
  window = {"sum": jax.tree.map(lambda m: np.zeros(m.shape, np.float32), metrics_shape),
            "count": np.zeros((), np.int32)}
  mgr = None
  start = 0
  metrics_path = os.path.join(workdir, "metrics.jsonl") if workdir else None
  history: list[dict] = []
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"))
    if checkpoint.latest_step(mgr) is not None:
      try:
        restored = checkpoint.restore(mgr, {"state": state_K, "extra": extra, "window": window})
      except ValueError as e:
        if "window" not in str(e):
          raise
        # Written before the metric window was checkpointed: the state is all there;
        # only the first record after resuming averages fewer steps.
        log.warning("Checkpoint has no metric window (older format); resuming without it.")
        restored = {**checkpoint.restore(mgr, {"state": state_K, "extra": extra}),
                    "window": window}
      state_K, extra, window = restored["state"], restored["extra"], restored["window"]
      start = int(checkpoint.latest_step(mgr))
      log.info("Resumed from step %d", start)
      history = [r for r in _read_jsonl(metrics_path) if r["step"] <= start]
      _write_jsonl(metrics_path, history)
    elif metrics_path and os.path.exists(metrics_path):
      os.remove(metrics_path)
  state_K = members.shard_members(state_K)

  def record(step, train_m, eval_m):
    recs = []
    for m in range(k):
      r = {"step": int(step), "member": m}
      if steps_per_epoch:
        r["epoch"] = step / steps_per_epoch
      r.update({f"train_{n}": float(v[m]) for n, v in train_m.items()})
      r.update({f"{eval_split}_{n}": float(v[m]) for n, v in eval_m.items()})
      recs.append(r)
    history.extend(recs)
    if metrics_path:
      with open(metrics_path, "a") as f:
        for r in recs:
          f.write(json.dumps(r) + "\n")

  bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress,
             dynamic_ncols=True, mininterval=1.0)
  t0 = time.time()
  for step in range(start, num_steps):
    batch = members.shard_members(batch_fn(step))
    state_K, m = step_fn(state_K, batch, members.step_keys(keys, step))
    loss = np.asarray(m["loss"])
    if not np.isfinite(loss).all():
      bad = np.flatnonzero(~np.isfinite(loss)).tolist()
      raise NonFiniteLossError(f"Loss became non-finite at step {step} for member(s) {bad}: "
                               f"{loss[bad].tolist()}. Lower the learning rate?")
    window = {"sum": jax.tree.map(lambda a, b: a + np.asarray(b, np.float32), window["sum"], m),
              "count": window["count"] + 1}
    if on_step is not None:
      extra = on_step(step, state_K, extra)
    done = step + 1
    bar.update(1)
    is_last = done == num_steps
    if (eval_every and done % eval_every == 0) or is_last:
      train_m = {n: v / max(int(window["count"]), 1) for n, v in window["sum"].items()}
      window = {"sum": jax.tree.map(np.zeros_like, window["sum"]), "count": np.zeros((), np.int32)}
      eval_m = dict(eval_fn(state_K)) if eval_fn else {}
      record(done, train_m, eval_m)
      shown = eval_m.get("accuracy", train_m.get("accuracy"))
      bar.set_postfix(loss=f"{np.mean(train_m['loss']):.3f}", acc=f"{np.mean(shown):.3f}")
    if mgr and ((checkpoint_every and done % checkpoint_every == 0) or is_last):
      checkpoint.save(mgr, done, {"state": state_K, "extra": extra, "window": window})
  bar.close()
  log.info("%s: %d steps in %.1fs", desc, num_steps - start, time.time() - t0)
  return state_K, extra, history
