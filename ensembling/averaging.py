"""Weight averaging: the SWA running mean and BatchNorm recalibration of averaged weights.

Both are pure functions on pytrees and work for any model of the contract
(`models.as_model`: Linen, NNX, pure functions).

Example:

>>> import jax.numpy as jnp
>>> avg = swa_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, count=0)   # = the first model
>>> swa_update(avg, {"w": jnp.array([3.0, 5.0])}, count=1)["w"]
Array([2., 3.], dtype=float32)
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from ensembling import members
from ensembling import tree as tree_lib
from ensembling.models.contract import as_model

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


# --------------------------------------------------------------------------- BatchNorm

def _stats_after(model, variables, x, key, value):
  """The `batch_stats` after one training-mode pass from running statistics = `value`."""
  start = {**variables, "batch_stats": jax.tree.map(lambda a: jnp.full_like(a, value),
                                                    variables["batch_stats"])}
  _, new = model.apply(start, x, train=True, key=key)
  return new


def batch_statistics(model, variables: PyTree, x, *, key: jax.Array | None = None,
                     momentum: PyTree | None = None) -> PyTree:
  """The statistics every BatchNorm layer computes on batch `x` in training mode.

  Works for any model whose running statistics are exponential moving averages,
  new = m * old + (1 - m) * batch (Flax Linen and NNX BatchNorm, PyTorch-style layers),
  without knowing the layers: a training-mode pass from zeroed statistics gives
  (1 - m) * batch; unless `momentum` is given, a second pass from statistics of one
  gives m + (1 - m) * batch, hence m. Layers see the activations of a training-mode
  forward pass, so earlier layers normalise with their own batch statistics, as in
  PyTorch's `update_bn`. Variances are the biased ones Flax normalises with.

  Args:
    model: anything `models.as_model` accepts.
    variables: {"params", "batch_stats"} of one model.
    x: a batch.
    key: dropout key (the pass runs in training mode).
    momentum: the layers' m (a float or a tree like `batch_stats`); None: measured.

  Returns:
    A tree shaped like `variables["batch_stats"]` with each layer's batch mean and var.
  """
  if not jax.tree.leaves(variables.get("batch_stats", {})):
    raise ValueError("variables have no 'batch_stats': the model has no BatchNorm.")
  m = as_model(model)
  from_zero = _stats_after(m, variables, x, key, 0.0)
  if momentum is None:
    momentum = jax.tree.map(lambda a, z: a - z, _stats_after(m, variables, x, key, 1.0), from_zero)
  elif not isinstance(momentum, dict):
    momentum = jax.tree.map(lambda a: jnp.full_like(a, momentum), from_zero)
  return jax.tree.map(lambda z, mom: z / (1.0 - mom), from_zero, momentum)


def _check_momentum(momentum):
  frozen = [n for n, mom in tree_lib.named_leaves(momentum)
            if float(jnp.max(jnp.abs(1.0 - mom))) < 1e-6]
  if frozen:
    raise ValueError(f"BatchNorm statistics {frozen[:3]} do not change in a training pass "
                     "(momentum 1): nothing to recompute.")


def _over_models(fn, strategy: str, num: int):
  """`fn(v, x, key, *rest)` of one model run for `num` stacked models on one shared batch.

  'vmap' maps the models over the one batch; any other (resolved) strategy
  (`members.over_members`) gets the batch and key repeated along the member axis.
  """
  if strategy == "vmap":
    return jax.jit(lambda v, x, k, *rest: jax.vmap(lambda v1, *r: fn(v1, x, k, *r))(v, *rest))
  per_member = members.over_members(fn, strategy=strategy, num_members=num)
  repeat = lambda a: jnp.broadcast_to(a, (num,) + a.shape)
  return lambda v, x, k, *rest: per_member(v, repeat(x), repeat(k), *rest)


@functools.lru_cache(maxsize=16)
def _recalibration_fns(m, strategy: str | None, num: int):
  """(momentum, statistics) functions of model `m` (`as_model`), compiled once per
  (model, strategy, number of stacked models); strategy None: one unstacked model."""
  momentum_fn = lambda v, x, k: jax.tree.map(
      lambda a, z: a - z, _stats_after(m, v, x, k, 1.0), _stats_after(m, v, x, k, 0.0))
  one = lambda v, x, k, mom: batch_statistics(m, v, x, key=k, momentum=mom)
  if strategy is None:
    return jax.jit(momentum_fn), jax.jit(one)
  return _over_models(momentum_fn, strategy, num), _over_models(one, strategy, num)


def recompute_batch_stats(model, variables: PyTree, batches: Iterable, *,
                          stacked: bool = False, key: jax.Array | None = None,
                          strategy: str = "auto") -> PyTree:
  """BatchNorm statistics recomputed for (e.g. averaged) weights: PyTorch `update_bn`.

  As `torch.optim.swa_utils.update_bn` does (momentum=None: a cumulative average),
  every layer's running mean/var become the equal-weight mean, over the batches, of
  its batch statistics in a training-mode forward pass; the stored statistics are not
  used (a model whose stats were zeroed gets the same result). Each layer's momentum is
  measured once, on the first batch (see `batch_statistics`).

  The passes are compiled once per (model, strategy, number of stacked models); later
  calls with other weights of the same shapes (SWAG samples, curve points) reuse them.

  Difference from PyTorch: Flax stores and normalises with the biased batch variance,
  PyTorch stores the unbiased one (n/(n-1), n = values per feature in a batch); we keep
  Flax's convention, consistent with how the model was trained.

  Args:
    model: anything `models.as_model` accepts (a Linen `model.apply` works too).
    variables: {"params", "batch_stats"} of one model, or of K models stacked on axis 0
      when `stacked=True` (every model sees the same batches).
    batches: an iterable of input arrays (B, ...) or dicts with key "x".
    stacked: `variables` carry a leading member axis.
    key: PRNG key for dropout (as in PyTorch, the pass runs in training mode); batch i
      uses fold_in(key, i); None means `jax.random.key(0)`.
    strategy: with `stacked`, how the K models' passes run (`members.STRATEGIES`; 'auto'
      as for training: on one CPU, convolutional models run one after the other in one
      program: vmapped convolutions were 5x slower there, benchmarks/recalibration.py).

  Returns:
    `variables` with "batch_stats" replaced.
  """
  m = as_model(model)
  if not jax.tree.leaves(variables.get("batch_stats", {})):
    raise ValueError("variables have no 'batch_stats': the model has no BatchNorm.")
  key = jax.random.key(0) if key is None else key
  if stacked:
    momentum_fn, one = _recalibration_fns(
        m, members.resolve_strategy(strategy, variables["params"]),
        members.num_members_in(variables["params"]))
  else:
    momentum_fn, one = _recalibration_fns(m, None, 0)
  running, momentum = None, None
  n = 0
  for i, batch in enumerate(batches):
    x = jnp.asarray(batch["x"] if isinstance(batch, dict) else batch)
    k = jax.random.fold_in(key, i)
    if momentum is None:
      momentum = momentum_fn(variables, x, k)
      _check_momentum(momentum)
    stats = one(variables, x, k, momentum)
    n += 1
    # PyTorch's cumulative moving average: running += (batch - running) / n.
    running = stats if running is None else jax.tree.map(
        lambda r, s: r + (s - r) / n, running, stats)
  if running is None:
    raise ValueError("recompute_batch_stats needs at least one batch, got no batches.")
  return {**variables, "batch_stats": running}
