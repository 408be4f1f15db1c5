"""Trajectory ensembles: SSE, FGE, SWA and StarSSE as plans, collected along one run.

A `Plan` says what a method does at a training budget: the learning-rate schedule and
the completed-update counts at which snapshots are copied (SSE, FGE) or weights enter
the running SWA mean. `fit` trains K independent runs of any model at once (member axis
= run, e.g. seeds) under a plan, collecting snapshots and the average in `train.fit`'s
checkpointed `extra`, so an interrupted run resumes exactly; `recalibrate` recomputes
BatchNorm statistics for averaged or snapshot weights.

- SGD baseline (`sgd_plan`): cosine decay over the budget; the end point.
- Snapshot Ensembles (Huang et al. 2017, `sse_plan`): M cosine cycles restarted at
  `base_lr`, a snapshot at the end of each.
- Fast Geometric Ensembling (Garipov et al. 2018, `fge_plan`): pre-training, then
  cycles of the triangular FGE schedule, a snapshot at each cycle's midpoint (lr_2).
- SWA (Izmailov et al. 2018, `swa_plan`): pre-training, a cosine anneal to `swa_lr`,
  then a constant rate with the weights averaged every `every` updates; recalibrate BN.
- StarSSE (Sadrtdinov et al. 2023, `starsse_plan`): the first SSE cycle from scratch,
  then M - 1 cycles all restarted from its end point (a star, not a chain), trained in
  parallel as extra members.

Reproducing SWA in a few lines (any model; `x`, `y` the training data):

>>> import numpy as np, flax.linen as nn
>>> from ensembling import members, optim
>>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
>>> y = (x[:, 0] > 0).astype(np.int32)
>>> plan = swa_plan(base_lr=0.05, total_steps=16, pretrain_steps=8, swa_lr=0.01,
...                 anneal_steps=4, every=2)
>>> run = fit(nn.Dense(2), plan, x, y, optimizer=lambda lr: optim.make_optimizer(
...           learning_rate=lr), num_runs=2, batch_size=16, seed=0, progress=False)
>>> members.predict(nn.Dense(2), run.average, x).shape   # (runs, N, classes)
(2, 64, 2)
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import averaging, checks, members, schedules, train
PyTree = Any
METHODS = ("sgd", "snapshot", "fge", "swa", "starsse")
_EMPTY = np.array([], np.int64)


# --------------------------------------------------------------------------- plans

class Plan(NamedTuple):
  """What a trajectory method does at a budget.

  Attributes:
    method: one of `METHODS`.
    schedule: the learning rate at each 0-based update (optax schedule).
    total_steps: the updates of the whole run (StarSSE: of one chain of cycles, i.e. the
      budget of the sequential method it is compared with).
    snapshot_steps: completed-update counts at which snapshots are copied.
    average_steps: completed-update counts at which the weights enter the SWA mean.
    cycle_steps: StarSSE's cycle length (0 for the others).
    num_cycles: StarSSE's M (0 for the others).
  """
  method: str
  schedule: optax.Schedule
  total_steps: int
  snapshot_steps: np.ndarray
  average_steps: np.ndarray
  cycle_steps: int = 0
  num_cycles: int = 0


def sgd_plan(*, base_lr: float, total_steps: int) -> Plan:
  """The SGD baseline: cosine decay from `base_lr` to 0 over the budget."""
  return Plan("sgd", schedules.warmup_cosine(base_lr, total_steps), int(total_steps),
              _EMPTY, _EMPTY)


def sse_plan(*, base_lr: float, total_steps: int, num_cycles: int) -> Plan:
  """Snapshot Ensembles: `num_cycles` restarted cosine cycles, a snapshot after each."""
  return Plan("snapshot", schedules.cosine_restarts(base_lr, total_steps, num_cycles),
              int(total_steps), schedules.cosine_restarts_steps(total_steps, num_cycles),
              _EMPTY)


def _check_pretrain(method, pretrain_steps, total_steps):
  if not 0 < pretrain_steps < total_steps:
    raise ValueError(f"{method}: pretrain_steps={pretrain_steps} leaves no pre-training or no "
                     f"{method} phase in {total_steps} steps.")


def fge_plan(*, base_lr: float, total_steps: int, pretrain_steps: int, cycle_steps: int,
             lr_1: float, lr_2: float) -> Plan:
  """FGE: cosine pre-training from `base_lr` down to `lr_1`, then triangular cycles.

  A snapshot is taken right after each cycle's midpoint update (where the rate is lr_2).
  """
  _check_pretrain("fge", pretrain_steps, total_steps)
  sched = schedules.after_pretraining(
      schedules.fge_cyclic(lr_1, lr_2, cycle_steps), pretrain_steps=pretrain_steps,
      pretrain_schedule=schedules.warmup_cosine(base_lr, pretrain_steps, end_lr=lr_1))
  steps = schedules.offset_steps(schedules.fge_steps(cycle_steps, total_steps - pretrain_steps),
                                 pretrain_steps)
  return Plan("fge", sched, int(total_steps), steps, _EMPTY)


def swa_plan(*, base_lr: float, total_steps: int, pretrain_steps: int, swa_lr: float,
             anneal_steps: int, every: int) -> Plan:
  """SWA: constant `base_lr`, a cosine anneal to `swa_lr`, then averaging every `every`.

  The first model averaged is the one at the end of the anneal's last `every` updates
  (pretrain + anneal), then one every `every` updates up to the end.
  """
  _check_pretrain("swa", pretrain_steps, total_steps)
  start = pretrain_steps + anneal_steps
  sched = schedules.after_pretraining(
      schedules.swa_schedule(base_lr, swa_lr, anneal_steps=anneal_steps),
      pretrain_steps=pretrain_steps, pretrain_schedule=base_lr)
  return Plan("swa", sched, int(total_steps), _EMPTY,
              schedules.swa_steps(start - every, total_steps, every=every))


def starsse_plan(*, base_lr: float, total_steps: int, num_cycles: int) -> Plan:
  """StarSSE: cycle 1 from scratch, then M - 1 parallel cycles restarted from its end."""
  cycle = schedules.cycle_length(total_steps, num_cycles)
  return Plan("starsse", schedules.cosine_restarts(base_lr, total_steps, num_cycles),
              int(total_steps), np.full(num_cycles, cycle), _EMPTY, cycle, int(num_cycles))


# --------------------------------------------------------------------------- collection

def init_snapshots(tree: PyTree, num_snapshots: int, *, stacked: bool = True) -> PyTree:
  """A zero buffer with room for `num_snapshots` copies of `tree`.

  With `stacked=True` (K parallel runs on axis 0) leaves get shape (K, M, ...);
  otherwise (M, ...).
  """
  if num_snapshots < 1:
    raise ValueError(f"num_snapshots must be >= 1, got {num_snapshots}.")

  def zeros(x):
    x = jnp.asarray(x)
    shape = (x.shape[0], num_snapshots) + x.shape[1:] if stacked else (num_snapshots,) + x.shape
    return jnp.zeros(shape, x.dtype)

  return jax.tree.map(zeros, tree)


@functools.partial(jax.jit, static_argnames=("stacked",))
def put_snapshot(buffer: PyTree, tree: PyTree, index, *, stacked: bool = True) -> PyTree:
  """`buffer` with snapshot slot `index` set to `tree` (axis 1 if stacked, else 0)."""
  if stacked:
    return jax.tree.map(lambda b, x: b.at[:, index].set(x.astype(b.dtype)), buffer, tree)
  return jax.tree.map(lambda b, x: b.at[index].set(x.astype(b.dtype)), buffer, tree)


class Collector(NamedTuple):
  """`init(state_K) -> extra` and `on_step(step, state_K, extra) -> extra` for `fit`."""
  init: Callable[[PyTree], PyTree]
  on_step: Callable[[int, PyTree, PyTree], PyTree]
  snapshot_steps: np.ndarray
  average_steps: np.ndarray


def _collected(state: PyTree) -> PyTree:
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


@jax.jit
def _average_in(avg, state_K, count):
  return {"params": averaging.swa_update(avg["params"], state_K["params"], count=count),
          "batch_stats": averaging.swa_update(avg["batch_stats"], state_K["batch_stats"],
                                              count=count)}


def trajectory_collector(*, snapshot_steps: Sequence[int] = (),
                         average_steps: Sequence[int] = ()) -> Collector:
  """Collects snapshots and/or a running SWA mean along a (stacked) training run.

  Args:
    snapshot_steps: completed-update counts at which {params, batch_stats} are copied
      into a preallocated (K, M, ...) buffer, M = len(snapshot_steps).
    average_steps: completed-update counts at which {params, batch_stats} enter the
      running equal mean (`averaging.swa_update`). Averaging `batch_stats` is what a
      naive user would do; recompute them with `recalibrate` instead.

  Returns:
    A `Collector`. `extra` holds "snapshots" (+ "num_snapshots") and "average"
    (+ "num_averaged") as needed; it is checkpointed by `train.fit`, so a resumed run
    continues collecting where it stopped.
  """
  snap = np.asarray(sorted(set(int(s) for s in snapshot_steps)), np.int64)
  avg = np.asarray(sorted(set(int(s) for s in average_steps)), np.int64)
  if len(snap) != len(snapshot_steps) or len(avg) != len(average_steps):
    raise ValueError("snapshot_steps and average_steps must not repeat a step.")
  if (len(snap) and snap[0] < 1) or (len(avg) and avg[0] < 1):
    raise ValueError("Collection steps count completed updates and must be >= 1.")
  snap_index = {int(s): i for i, s in enumerate(snap)}
  avg_set = set(int(s) for s in avg)

  def init(state_K):
    extra = {}
    v = _collected(state_K)
    if len(snap):
      extra["snapshots"] = init_snapshots(v, len(snap))
      extra["num_snapshots"] = jnp.zeros((), jnp.int32)
    if len(avg):
      extra["average"] = jax.tree.map(jnp.zeros_like, v)
      extra["num_averaged"] = jnp.zeros((), jnp.int32)
    return extra

  def on_step(step, state_K, extra):
    done = int(step) + 1
    if done in snap_index:
      i = snap_index[done]
      extra = {**extra, "snapshots": put_snapshot(extra["snapshots"], _collected(state_K), i),
               "num_snapshots": jnp.asarray(i + 1, jnp.int32)}
    if done in avg_set:
      n = extra["num_averaged"]
      extra = {**extra, "average": _average_in(extra["average"], _collected(state_K), n),
               "num_averaged": n + 1}
    return extra

  return Collector(init, on_step, snap, avg)


# --------------------------------------------------------------------------- StarSSE

def star_restart(state_K: PyTree, *, num_copies: int,
                 tx: optax.GradientTransformation | None = None,
                 reset_optimizer: bool = False) -> PyTree:
  """StarSSE starts: `num_copies` copies of each run's state, to train in parallel.

  StarSSE restarts every cycle from the same first fine-tuned checkpoint (a star around
  it) instead of from the previous snapshot (a chain). Here the K runs' states (K, ...)
  become (K·C, ...) with run k's copies at rows k·C .. k·C + C - 1, so all C cycles of
  all runs train as one member axis.

  Args:
    state_K: stacked states {params, batch_stats, opt_state, step}.
    num_copies: C, cycles started from each checkpoint.
    tx: the optimizer; needed with `reset_optimizer`.
    reset_optimizer: start every cycle from `tx.init(params)` (keeping injected
      hyperparameters such as per-member `lr_scale`) instead of the checkpoint's
      optimizer state (momentum buffers, step count).

  Returns:
    The (K·C, ...) stacked states.
  """
  if num_copies < 1:
    raise ValueError(f"num_copies must be >= 1, got {num_copies}.")
  out = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), num_copies, axis=0), state_K)
  if reset_optimizer:
    if tx is None:
      raise ValueError("reset_optimizer=True needs the optimizer `tx`.")
    fresh = jax.vmap(tx.init)(out["params"])
    old = out["opt_state"]
    if hasattr(old, "hyperparams") and hasattr(fresh, "hyperparams"):
      fresh = fresh._replace(hyperparams=old.hyperparams)
    out = {**out, "opt_state": fresh}
  return out


def unflatten_star(tree: PyTree, num_copies: int) -> PyTree:
  """(K·C, ...) -> (K, C, ...): undoes the member layout of `star_restart`."""
  return jax.tree.map(lambda x: jnp.reshape(x, (-1, num_copies) + x.shape[1:]), tree)


# --------------------------------------------------------------------------- training

class Trajectory(NamedTuple):
  """What `fit` returns (K = the parallel runs).

  Attributes:
    plan: the plan that ran.
    state: the runs' end states (K, ...); for StarSSE the cycle-1 end points.
    snapshots: {"params", "batch_stats"} (K, M, ...) or None (SWA, SGD).
    average: SWA's running mean (K, ...), `batch_stats` averaged too, or None.
    history: [(records, step offset)], one entry per training phase.
    strategy: the member-parallel strategy that ran.
  """
  plan: Plan
  state: PyTree
  snapshots: PyTree
  average: PyTree
  history: list
  strategy: str


def fit(model, plan: Plan, x: np.ndarray, y: np.ndarray, *,
        optimizer: Callable[[optax.Schedule], optax.GradientTransformation], num_runs: int,
        batch_size: int, seed: int, workdir: str | None = None, eval_data: tuple | None = None,
        eval_split: str = "val", eval_every: int = 0, checkpoint_every: int = 0,
        weight_decay=None, strategy: str = "auto", eval_batch_size: int = 1000,
        star_reset_optimizer: bool = False, progress: bool = True,
        init_variables: PyTree = None) -> Trajectory:
  """Trains `num_runs` independent runs of `model` under `plan`, collecting what it says.

  Run k is initialised from `split(key(seed), K)[k]` and reads its own batch order
  (`train.make_batch_fn(x, y, seed=seed)`); StarSSE's star cycles read the order of
  `seed + 1000`. Each phase checkpoints into `workdir/run` (StarSSE: `workdir/first` and
  `workdir/star`), so a rerun resumes.

  Args:
    model: anything `models.as_model` accepts.
    plan: from `sgd_plan`, `sse_plan`, `fge_plan`, `swa_plan` or `starsse_plan`.
    x, y: training data.
    optimizer: `schedule -> optax transformation` (e.g. SGD with momentum).
    num_runs: K, the runs trained at once.
    batch_size: per run.
    seed: init, data order and dropout derive from it.
    workdir: checkpoints and metrics (None: nothing written).
    eval_data: (x, y) evaluated every `eval_every` steps (default: each epoch).
    eval_split: the records' prefix for `eval_data`.
    checkpoint_every: in steps (0: once per epoch).
    weight_decay: a scalar or per-run values (with `optim.make_optimizer`).
    strategy: member-parallel strategy.
    eval_batch_size: inference chunk size.
    star_reset_optimizer: StarSSE cycles start from a fresh optimizer state.
    progress: progress bars.
    init_variables: stacked (K, ...) variables to start from instead of a fresh init: a
      pre-trained checkpoint for fine-tuning (StarSSE's transfer setting).

  Returns:
    A `Trajectory`.
  """
  if plan.method not in METHODS:
    raise ValueError(f"Unknown plan method {plan.method!r}; choose one of {METHODS}.")
  tx = optimizer(plan.schedule)
  sub = (lambda name: os.path.join(workdir, name)) if workdir else (lambda name: None)
  common = dict(model=model, x=x, y=y, tx=tx, batch_size=batch_size, eval_data=eval_data,
                eval_split=eval_split, eval_every=eval_every, checkpoint_every=checkpoint_every,
                strategy=strategy, eval_batch_size=eval_batch_size, progress=progress,
                schedule=plan.schedule)
  state = train.init_member_state(model, x[:1], num_members=num_runs, tx=tx, seed=seed,
                                  weight_decay=weight_decay, init_variables=init_variables)
  if plan.method == "starsse":
    m, cyc = plan.num_cycles, plan.cycle_steps
    first = train.fit_members(state, seed=seed, num_steps=cyc, workdir=sub("first"),
                              desc="starsse cycle 1", **common)
    star = star_restart(first.state, num_copies=m - 1, tx=tx,
                        reset_optimizer=star_reset_optimizer)
    star = train.fit_members(star, seed=seed + 1000, num_steps=cyc, workdir=sub("star"),
                             desc=f"starsse {m - 1} star cycles x {num_runs} runs", **common)
    star_K = unflatten_star(members.variables_of(star.state), m - 1)      # (K, M-1, ...)
    head = jax.tree.map(lambda a: a[:, None], members.variables_of(first.state))
    snaps = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 1), head, star_K)
    return Trajectory(plan, first.state, snaps, None, [(first.history, 0), (star.history, cyc)],
                      first.strategy)
  collector = trajectory_collector(snapshot_steps=plan.snapshot_steps,
                                   average_steps=plan.average_steps)
  res = train.fit_members(state, seed=seed, num_steps=plan.total_steps, workdir=sub("run"),
                          desc=f"{plan.method} x {num_runs} runs", on_step=collector.on_step,
                          extra=collector.init(state), **common)
  extra = res.extra or {}
  snaps = members.variables_of(extra["snapshots"]) if "snapshots" in extra else None
  return Trajectory(plan, res.state, snaps, extra.get("average"), [(res.history, 0)],
                    res.strategy)


def recalibrate(model, variables: PyTree, x: np.ndarray, *, batch_size: int,
                num_examples: int = 0, key: jax.Array | None = None,
                member_dims: int = 1, strategy: str = "auto") -> PyTree:
  """BN statistics of every model in `variables` recomputed on one pass over `x`.

  `variables` ({"params", "batch_stats"}) carry `member_dims` leading member axes (1:
  runs; 2: runs x snapshots); all models are recalibrated at once on the same batches
  (`averaging.recompute_batch_stats`, PyTorch `update_bn` semantics, its `strategy`),
  the first `num_examples` examples (0: all) in order, the last incomplete batch dropped.
  """
  if x is None:
    raise ValueError("recalibrate: x (the training inputs to recompute statistics on) is None.")
  batch_size = checks.integer(batch_size, name="recalibrate: batch_size")
  n = checks.integer(num_examples, name="recalibrate: num_examples", low=0, high=len(x)) or len(x)
  if n < batch_size:
    raise ValueError(f"recalibrate: {n} examples make no full batch of {batch_size} (the last "
                     "incomplete batch is dropped); lower batch_size.")
  lead = jax.tree.leaves(variables["params"])[0].shape[:member_dims]
  flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[member_dims:]),
                      members.variables_of(variables))
  batches = (x[i:i + batch_size] for i in range(0, (n // batch_size) * batch_size, batch_size))
  out = averaging.recompute_batch_stats(model, flat, batches, stacked=True, key=key,
                                        strategy=strategy)
  return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), out)


# --------------------------------------------------------------------------- evaluation

def _per_run(logits_RxMxNxC, y):
  """Ensemble metrics (prob. average over M) and disagreement, one dict per run."""
  from ensembling import ensemble, metrics
  out = []
  for lg in logits_RxMxNxC:
    m = metrics.classification_metrics(np.asarray(ensemble.average_probs(lg)), y)
    preds = np.asarray(lg).argmax(-1)
    m["disagreement"] = metrics.mean_disagreement(preds)
    m["_matrix"] = metrics.disagreement_matrix(preds)
    out.append(m)
  return out


def _singles(logits_RxNxC, y):
  from ensembling import ensemble, metrics
  return [metrics.classification_metrics(p, y)
          for p in ensemble.members_probs(np.asarray(logits_RxNxC))]


def snapshot_rows(model, snapshots: PyTree, x: np.ndarray, y: np.ndarray, *,
                  recalibrate_fn: Callable | None = None, batch_size: int = 1000,
                  strategy: str = "auto") -> dict[str, list[dict]]:
  """The rows of M models per run (R, M, ...): their ensemble, the mean one, recalibrated.

  Args:
    model: the models' model.
    snapshots: {"params", "batch_stats"?} with two leading axes (runs, models).
    x, y: the evaluation split.
    recalibrate_fn: `(variables, member_dims) -> variables` with BatchNorm statistics
      recomputed; given, BatchNorm models also get the recalibrated ensemble's row.
    batch_size, strategy: for `members.predict`.

  Returns:
    {"ensemble of M snapshots": per run (with `disagreement` and `_matrix`), "mean snapshot
    (single model)": per run, and "ensemble of M snapshots, each BN recalibrated"}.
  """
  from ensembling import metrics, ensemble
  runs = int(np.shape(jax.tree.leaves(snapshots["params"])[0])[0])
  snap_logits = lambda tree: np.stack([members.predict(
      model, jax.tree.map(lambda a: a[r], tree), x, batch_size=batch_size, strategy=strategy)
      for r in range(runs)])                                          # (R, M, N, C)
  lg = snap_logits(snapshots)
  rows = {f"ensemble of {lg.shape[1]} snapshots": _per_run(lg, y),
          "mean snapshot (single model)": [
              {n: float(np.mean([metrics.classification_metrics(p, y)[n]
                                 for p in ensemble.members_probs(run_lg)]))
               for n in ("accuracy", "nll", "ece")} for run_lg in lg]}
  if "batch_stats" in members.variables_of(snapshots) and recalibrate_fn is not None:
    # Each snapshot's running statistics lag its weights after a restart (badly so with
    # Keras's momentum 0.99): the same ensemble with every snapshot recalibrated.
    rows[f"ensemble of {lg.shape[1]} snapshots, each BN recalibrated"] = _per_run(
        snap_logits(recalibrate_fn(snapshots, 2)), y)
  return rows


def average_rows(model, average: PyTree, x: np.ndarray, y: np.ndarray, *, name: str,
                 recalibrate_fn: Callable | None = None, stale_stats: PyTree = None,
                 stale: str = "", batch_size: int = 1000, strategy: str = "auto"
                 ) -> dict[str, list[dict]]:
  """The rows of an average (SWA, a soup) per run (R, ...): recalibrated and not.

  With BatchNorm: "<name> (BN recalibrated)", then (given `stale_stats`) "<name>, no
  recalibration: <stale> BN stats" and "<name>, no recalibration: averaged BN stats";
  without BatchNorm one row "<name>".
  """
  logits = lambda v: members.predict(model, v, x, batch_size=batch_size, strategy=strategy)
  avg = members.variables_of(average)
  if "batch_stats" not in avg:
    return {name: _singles(logits(avg), y)}
  if recalibrate_fn is None:
    raise ValueError(f"average_rows: the {name} has BatchNorm statistics, so its first row "
                     "needs recalibrate_fn, e.g. lambda v, dims: trajectory.recalibrate("
                     "model, v, x_train, batch_size=128, member_dims=dims).")
  rows = {f"{name} (BN recalibrated)": _singles(logits(recalibrate_fn(avg, 1)), y)}
  if stale_stats is not None:
    rows[f"{name}, no recalibration: {stale} BN stats"] = _singles(logits(
        {"params": avg["params"], "batch_stats": stale_stats}), y)
  rows[f"{name}, no recalibration: averaged BN stats"] = _singles(logits(avg), y)
  return rows


def evaluate(model, run: Trajectory, x: np.ndarray, y: np.ndarray, *,
             recalibration_x: np.ndarray | None = None, recalibration_batch_size: int = 128,
             recalibration_examples: int = 0, recalibration_key: jax.Array | None = None,
             recalibrate_snapshots: bool = True, batch_size: int = 1000,
             strategy: str = "auto", cache: str | None = None) -> dict[str, list[dict]]:
  """Every row a trajectory method reports, one metrics dict per run, on (x, y).

  Rows: the end point; for snapshot methods the ensemble of the snapshots (with
  `disagreement` and the `_matrix` of pairwise disagreement), the mean single snapshot
  and, for BatchNorm models, the ensemble with every snapshot recalibrated
  (`snapshot_rows`); for SGD the independent ensemble of the K runs; for SWA (and
  StarSSE's uniform soup of its snapshots) the average with recalibrated BN statistics,
  with the last iterate's (or the cycle-1 end point's) and with the averaged statistics
  (`average_rows`: what goes wrong without recalibration).

  Args:
    model: the runs' model.
    run: what `fit` returned.
    x, y: the evaluation split.
    recalibration_x: training inputs for BatchNorm recalibration (needed with BN).
    recalibration_batch_size, recalibration_examples, recalibration_key: see
      `recalibrate` (`num_examples`, `key`).
    recalibrate_snapshots: also report the recalibrated snapshot ensemble.
    batch_size, strategy: for `members.predict` and the recalibration passes.
    cache: a JSON file for the rows (`report.cached`): a later call whose run (end
      states, snapshots, average), evaluation split, recalibration inputs and key, and
      settings are the same returns the stored rows without evaluating; anything else
      (or a damaged file) is evaluated again and overwrites it. The key does not cover
      the model's code: give each model its own path. With a cache, the rows are their
      JSON round trip (arrays become lists) on every call.

  Returns:
    {row name: [metrics of run 0, run 1, ...]}.
  """
  checks.paired(x, y, where="evaluate")
  if recalibration_x is None and "batch_stats" in members.variables_of(run.state):
    needs = ([f"the {run.plan.method} average"] if run.plan.method in ("swa", "starsse") else []) + (
        ["each snapshot (recalibrate_snapshots=True)"]
        if run.snapshots is not None and recalibrate_snapshots else [])
    if needs:
      raise ValueError(f"evaluate: the model has BatchNorm statistics and recalibrating "
                       f"{' and '.join(needs)} needs training inputs: pass recalibration_x.")
  settings = dict(recalibration_batch_size=recalibration_batch_size,
                  recalibration_examples=recalibration_examples,
                  recalibrate_snapshots=recalibrate_snapshots, batch_size=batch_size,
                  strategy=strategy)
  rows = functools.partial(_evaluate, model, run, x, y, recalibration_x=recalibration_x,
                           recalibration_key=recalibration_key, **settings)
  if cache is None:
    return rows()
  from ensembling import checkpoint, report
  key = checkpoint.checksum({
      "trained": (run.state, run.snapshots, run.average), "eval": (x, y),
      "recalibration": (recalibration_x, None if recalibration_key is None
                        else jax.random.key_data(recalibration_key)),
      "settings": repr(sorted(dict(settings, method=run.plan.method).items()))})
  return report.cached(cache, key=key, compute=rows)


def _evaluate(model, run, x, y, *, recalibration_x, recalibration_batch_size,
              recalibration_examples, recalibration_key, recalibrate_snapshots, batch_size,
              strategy):
  method, k = run.plan.method, int(np.shape(run.state["step"])[0])
  kw = dict(batch_size=batch_size, strategy=strategy)
  recal = lambda v, dims: recalibrate(model, v, recalibration_x,
                                      batch_size=recalibration_batch_size,
                                      num_examples=recalibration_examples,
                                      key=recalibration_key, member_dims=dims,
                                      strategy=strategy)
  rows: dict[str, list] = {}
  end = members.predict(model, run.state, x, **kw)
  rows["cycle-1 end point (single model, 1/M budget)" if method == "starsse"
       else "end point (single model)"] = _singles(end, y)
  if run.snapshots is not None:
    rows.update(snapshot_rows(model, run.snapshots, x, y,
                              recalibrate_fn=recal if recalibrate_snapshots else None, **kw))
  if method == "sgd":
    rows[f"independent ensemble of the {k} seeds ({k}x budget)"] = _per_run(end[None], y)
  if method in ("swa", "starsse"):
    avg = run.average if method == "swa" else jax.tree.map(lambda a: a.mean(1), run.snapshots)
    rows.update(average_rows(
        model, avg, x, y, name="SWA" if method == "swa" else "uniform soup",
        recalibrate_fn=recal, stale_stats=run.state.get("batch_stats"),
        stale="last iterate's" if method == "swa" else "cycle-1 end point's", **kw))
  return rows
