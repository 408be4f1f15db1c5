"""Weight averaging and trajectory snapshots: SWA, snapshot buffers, BN recalibration, StarSSE.

Everything is a pure function on pytrees. Snapshots of a run are kept in a
preallocated stacked buffer (member axis = snapshot), so memory is bounded by the
number of snapshots, and the buffer lives in `train.fit`'s checkpointed `extra`:

    collect = trajectory_collector(snapshot_steps=[100, 200], average_steps=[150, 200])
    extra = collect.init(state_K)
    state_K, extra, _ = train.fit(state_K, ..., on_step=collect.on_step, extra=extra)
    extra["snapshots"]["params"]   # (K, M, ...): K parallel runs (seeds), M snapshots
    extra["average"]["params"]     # (K, ...): SWA running mean of each run
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import tree as tree_lib

PyTree = Any


# --------------------------------------------------------------------------- SWA

def swa_update(avg_params: PyTree, params: PyTree, *, count) -> PyTree:
  """The running equal-weight mean after adding `params` to `count` averaged models.

  avg + (params - avg) / (count + 1); with count = 0 the result is `params` itself.
  This is PyTorch `AveragedModel`'s default `avg_fn` (with `n_averaged = count`).

  Args:
    avg_params: the mean of the `count` models seen so far (ignored when count = 0).
    params: the model to add.
    count: how many models `avg_params` already averages (int or int array; under
      `jax.vmap` one per member).

  Returns:
    The mean of the `count + 1` models.
  """
  tree_lib.check_same_structure([avg_params, params], what="avg_params and params")
  count = jnp.asarray(count)

  def upd(a, p):
    c = count.astype(jnp.result_type(a, jnp.float32))
    new = a + (p - a) / (c + 1)
    return jnp.where(count == 0, p, new).astype(a.dtype)

  return jax.tree.map(upd, avg_params, params)


# --------------------------------------------------------------------------- snapshots

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


def _model_vars(state: PyTree) -> PyTree:
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


@jax.jit
def _average_in(avg, state_K, count):
  return {"params": swa_update(avg["params"], state_K["params"], count=count),
          "batch_stats": swa_update(avg["batch_stats"], state_K["batch_stats"], count=count)}


def trajectory_collector(*, snapshot_steps: Sequence[int] = (),
                         average_steps: Sequence[int] = ()) -> Collector:
  """Collects snapshots and/or a running SWA mean along a (stacked) training run.

  Args:
    snapshot_steps: completed-update counts at which {params, batch_stats} are copied
      into a preallocated (K, M, ...) buffer, M = len(snapshot_steps).
    average_steps: completed-update counts at which {params, batch_stats} enter the
      running equal mean (`swa_update`). Averaging `batch_stats` is what a naive
      user would do; recompute them with `recompute_batch_stats` instead.

  Returns:
    A `Collector`. `extra` holds "snapshots" (+ "num_snapshots") and "average"
    (+ "num_averaged") as needed; it is checkpointed by `fit`, so a resumed run
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
    v = _model_vars(state_K)
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
      extra = {**extra, "snapshots": put_snapshot(extra["snapshots"], _model_vars(state_K), i),
               "num_snapshots": jnp.asarray(i + 1, jnp.int32)}
    if done in avg_set:
      n = extra["num_averaged"]
      extra = {**extra, "average": _average_in(extra["average"], _model_vars(state_K), n),
               "num_averaged": n + 1}
    return extra

  return Collector(init, on_step, snap, avg)


# --------------------------------------------------------------------------- BatchNorm

def _bn_capture(unbiased_var: bool):
  """An interceptor making every BatchNorm store its *batch* statistics.

  Flax updates ra = m·ra + (1 - m)·batch_stat. The caller zeroes the running
  statistics, so after the call ra = (1 - m)·batch_stat and dividing by (1 - m)
  recovers the statistic Flax computed (same reduction axes, same variance formula).
  """
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if not isinstance(module, nn.BatchNorm) or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if module.is_initializing():
      return out
    if module.momentum >= 1.0:
      raise ValueError(f"BatchNorm {module.name!r} has momentum {module.momentum}: its "
                       "running statistics never change, nothing to recompute.")
    scale = 1.0 - module.momentum
    mean = module.get_variable("batch_stats", "mean") / scale
    var = module.get_variable("batch_stats", "var") / scale
    if unbiased_var:
      n = args[0].size // mean.size  # elements reduced per feature
      if n < 2:
        raise ValueError("unbiased_var needs at least 2 values per feature in a batch.")
      var = var * (n / (n - 1))
    module.put_variable("batch_stats", "mean", mean)
    module.put_variable("batch_stats", "var", var)
    return out
  return interceptor


def batch_statistics(apply_fn: Callable, variables: PyTree, x, *, unbiased_var: bool = False,
                     rngs=None) -> PyTree:
  """The statistics every BatchNorm layer computes on batch `x` in training mode.

  Returns a tree shaped like `variables["batch_stats"]` holding each layer's batch
  mean and variance (biased, as Flax normalises with; `unbiased_var=True` applies
  Bessel's correction as PyTorch does for its running variance). Layers see the
  activations of a training-mode forward pass, so earlier layers normalise with
  their own batch statistics, as in PyTorch's `update_bn`.
  """
  if "batch_stats" not in variables or not jax.tree.leaves(variables["batch_stats"]):
    raise ValueError("variables have no 'batch_stats': the model has no BatchNorm.")
  zeroed = {**variables, "batch_stats": jax.tree.map(jnp.zeros_like, variables["batch_stats"])}
  with nn.intercept_methods(_bn_capture(unbiased_var)):
    _, new = apply_fn(zeroed, x, train=True, mutable=["batch_stats"], rngs=rngs or {})
  return new["batch_stats"]


def recompute_batch_stats(apply_fn: Callable, variables: PyTree, batches: Iterable, *,
                          unbiased_var: bool = False, stacked: bool = False,
                          key: jax.Array | None = None) -> PyTree:
  """BatchNorm statistics recomputed for (e.g. averaged) weights: PyTorch `update_bn`.

  As `torch.optim.swa_utils.update_bn` does (momentum=None: a cumulative average),
  every layer's running mean/var become the equal-weight mean, over the batches, of
  its batch statistics in a training-mode forward pass; the stored statistics are
  not used (a model whose stats were zeroed gets the same result).

  Difference from PyTorch: Flax stores and normalises with the biased batch variance,
  PyTorch stores the unbiased one (n/(n-1), n = values per feature in a batch). The
  default keeps Flax's convention, consistent with how the model was trained;
  `unbiased_var=True` reproduces PyTorch's numbers.

  Args:
    apply_fn: `model.apply` taking `(variables, x, *, train, mutable, rngs)`.
    variables: {"params", "batch_stats", ...} of one model, or of K models stacked
      on axis 0 when `stacked=True` (every model sees the same batches).
    batches: an iterable of input arrays (B, ...) or dicts with key "x".
    unbiased_var: store Bessel-corrected variances (PyTorch's convention).
    stacked: `variables` carry a leading member axis.
    key: PRNG key for dropout (as in PyTorch, the pass runs in training mode);
      batch i uses fold_in(key, i). Needed only if the model has dropout.

  Returns:
    `variables` with "batch_stats" replaced.
  """
  fn = functools.partial(batch_statistics, apply_fn, unbiased_var=unbiased_var)
  if stacked:
    stats_fn = jax.jit(jax.vmap(lambda v, x, r: fn(v, x, rngs=r), in_axes=(0, None, None)))
  else:
    stats_fn = jax.jit(lambda v, x, r: fn(v, x, rngs=r))
  running = None
  n = 0
  for i, batch in enumerate(batches):
    x = batch["x"] if isinstance(batch, dict) else batch
    rngs = {"dropout": jax.random.fold_in(key, i)} if key is not None else None
    stats = stats_fn(variables, jnp.asarray(x), rngs)
    n += 1
    # PyTorch's cumulative moving average: running += (batch - running) / n.
    running = stats if running is None else jax.tree.map(
        lambda r, s: r + (s - r) / n, running, stats)
  if running is None:
    raise ValueError("recompute_batch_stats needs at least one batch, got no batches.")
  return {**variables, "batch_stats": running}


# --------------------------------------------------------------------------- StarSSE

def star_restart(state_K: PyTree, *, num_copies: int, tx: optax.GradientTransformation | None = None,
                 reset_optimizer: bool = False) -> PyTree:
  """StarSSE starts: `num_copies` copies of each run's state, to train in parallel.

  StarSSE (Sadrtdinov et al., 2023) restarts every cycle from the same first
  fine-tuned checkpoint (a star around it) instead of from the previous snapshot
  (a chain). Here the K runs' states (K, ...) become (K·C, ...) with run k's copies
  at rows k·C .. k·C + C - 1, so all C cycles of all runs train as one member axis.

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
