"""Recomputing BatchNorm statistics for averaged weights (soups, SWA).

Averaged weights need their own running statistics: the average of the ingredients'
statistics does not describe the activations of the averaged network.
`recompute_batch_stats` follows `torch.optim.swa_utils.update_bn`: forget the running
statistics, run the network in training mode over the given batches, and keep the
cumulative (equal-weight) average of every BatchNorm layer's per-batch mean and
variance (PyTorch's `momentum=None`). The variance is the biased batch variance that
Flax's `nn.BatchNorm` normalises with and stores (PyTorch stores the unbiased one).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ensembling import tree as tree_lib

PyTree = Any


def _batch_moments(module: nn.BatchNorm, x):
  axes = tuple(i for i in range(x.ndim)
               if i not in {a % x.ndim for a in ((module.axis,) if isinstance(module.axis, int)
                                                   else module.axis)})
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x, axes)
  if module.use_fast_variance:
    var = jnp.maximum(0.0, jnp.mean(jnp.square(x), axes) - jnp.square(mean))
  else:
    var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axes)
  return mean, var


def batch_moments(apply_fn: Callable, variables: PyTree, x, *, key=None) -> dict:
  """Every BatchNorm layer's batch mean and variance in one training-mode forward pass.

  Returns {module path tuple: (mean, var)}; dropout (if any) uses `key`.
  """
  found: dict = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, nn.BatchNorm) and context.method_name == "__call__":
      if m.path in found:
        raise ValueError(f"BatchNorm {'/'.join(m.path)} is called more than once per forward.")
      found[m.path] = _batch_moments(m, args[0])
    return next_fun(*args, **kwargs)

  key = jax.random.key(0) if key is None else key
  with nn.intercept_methods(interceptor):
    apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
  return found


def recompute_batch_stats(apply_fn: Callable, variables: PyTree, batches: Sequence, *,
                          key=None) -> PyTree:
  """`variables` with `batch_stats` replaced by statistics recomputed on `batches`.

  Args:
    apply_fn: `model.apply`, taking `(variables, x, *, train)`.
    variables: {"params": ..., "batch_stats": ...} of one model (e.g. a soup).
    batches: a sequence of input arrays x (or an array whose first axis indexes
      batches). Each batch counts equally, as in PyTorch's `update_bn`.
    key: PRNG key for dropout during the training-mode passes (default key(0)).

  Returns:
    New variables; `params` are unchanged.
  """
  if "batch_stats" not in variables or not jax.tree.leaves(variables["batch_stats"]):
    return variables
  if len(batches) == 0:
    raise ValueError("recompute_batch_stats needs at least one batch.")
  key = jax.random.key(0) if key is None else key
  step = jax.jit(lambda v, x, k: batch_moments(apply_fn, v, x, key=k))
  total = None
  for i, x in enumerate(batches):
    m = step(variables, x, jax.random.fold_in(key, i))
    total = m if total is None else jax.tree.map(jnp.add, total, m)
  n = len(batches)

  def pick(path, old):
    parts = tuple(tree_lib.path_str(path).split("/"))
    mod, leaf = parts[:-1], parts[-1]
    if mod not in total or leaf not in ("mean", "var"):
      raise ValueError(f"batch_stats leaf {'/'.join(parts)} was not produced by a BatchNorm "
                       "call in the forward pass.")
    return (total[mod][0 if leaf == "mean" else 1] / n).astype(old.dtype)

  stats = jax.tree_util.tree_map_with_path(pick, variables["batch_stats"])
  return {**variables, "batch_stats": stats}
