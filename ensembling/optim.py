"""Optimizers whose per-member hyperparameters live in the optimizer state.

`make_optimizer` wraps the chain in `optax.inject_hyperparams`, exposing two numeric
hyperparameters, `lr_scale` (multiplies the schedule) and `weight_decay`. Under
`jax.vmap` every member has its own copy of the state, so `set_hyperparams` can give
each member its own values: a vector over the member axis.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import tree as tree_lib

PyTree = Any

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(*, name: str = "sgd", learning_rate: optax.ScalarOrSchedule = 0.1,
                   momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
                   grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """SGD (momentum), Adam (L2 added to the gradient) or AdamW (decoupled decay).

  Returns an `inject_hyperparams` transformation with hyperparameters `lr_scale`
  (default 1) and `weight_decay`.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")

  def build(lr_scale, weight_decay):
    parts = []
    if grad_clip_norm:
      parts.append(optax.clip_by_global_norm(grad_clip_norm))
    if name == "sgd":
      parts += [optax.add_decayed_weights(weight_decay),
                optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)]
    elif name == "adam":
      parts += [optax.add_decayed_weights(weight_decay), optax.adam(learning_rate)]
    else:
      parts += [optax.adamw(learning_rate, weight_decay=weight_decay)]
    parts.append(optax.scale(lr_scale))
    return optax.chain(*parts)

  return optax.inject_hyperparams(build)(lr_scale=1.0, weight_decay=weight_decay)


def trainable_mask(params: PyTree, trainable: str | Sequence[str] | PyTree) -> PyTree:
  """A tree of bools like `params`: True where a leaf is trained.

  Args:
    params: the parameter tree (structure and paths only).
    trainable: regexes (`re.search`) over "a/b/c" paths, or already a tree of bools.

  Returns:
    The mask. Raises ValueError if nothing is trainable.
  """
  if isinstance(trainable, str) or (isinstance(trainable, (list, tuple))
                                    and all(isinstance(p, str) for p in trainable)):
    mask = tree_lib.path_mask(params, trainable)
  else:
    tree_lib.check_same_structure([params, trainable], what="params and trainable mask",
                                  check_shapes=False)
    mask = jax.tree.map(bool, trainable)
  if not any(jax.tree.leaves(mask)):
    names = [n for n, _ in tree_lib.named_leaves(params)]
    raise ValueError(f"No parameter is trainable: {trainable!r} matches no path; paths are "
                     f"{names[:12]}{' ...' if len(names) > 12 else ''}.")
  return mask


def freeze(tx: optax.GradientTransformation, params: PyTree, *,
           trainable: str | Sequence[str] | PyTree) -> optax.GradientTransformation:
  """`tx` on the trainable leaves; zero updates and no optimizer state for the rest.

  One `optax.partition` over parameter paths: frozen leaves go through
  `optax.set_to_zero()`, so they carry no optimizer state and stay bit-identical.

  Args:
    tx: the optimizer for the trained leaves.
    params: the parameter tree (structure and paths only).
    trainable: regexes over "a/b/c" paths (e.g. "^head/"), or a tree of bools.

  Returns:
    The partitioned transformation.

  Example:

  >>> import jax.numpy as jnp, optax
  >>> params = {"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
  >>> tx = freeze(optax.sgd(0.5, momentum=0.9), params, trainable="^head/")
  >>> state = tx.init(params)
  >>> updates, _ = tx.update({"body": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}},
  ...                        state, params)
  >>> updates["body"]["w"].tolist(), updates["head"]["w"].tolist()
  ([0.0, 0.0], [-0.5, -0.5])
  >>> [x.shape for x in jax.tree.leaves(state)]  # momentum for "head" only
  [(2,)]
  """
  mask = trainable_mask(params, trainable)
  labels = jax.tree.map(lambda t: "trainable" if t else "frozen", mask)
  return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def set_hyperparams(opt_state, **values):
  """Returns `opt_state` with injected hyperparameters replaced.

  Works for one member (scalars) or a stacked state (vectors of length K).
  """
  if not hasattr(opt_state, "hyperparams"):
    raise TypeError("opt_state was not made by optax.inject_hyperparams (make_optimizer).")
  unknown = sorted(set(values) - set(opt_state.hyperparams))
  if unknown:
    raise ValueError(f"Unknown hyperparameter(s) {unknown}; have {sorted(opt_state.hyperparams)}.")
  hp = dict(opt_state.hyperparams)
  for k, v in values.items():
    v = jnp.asarray(v, dtype=jnp.asarray(hp[k]).dtype)
    if v.shape != jnp.shape(hp[k]):
      raise ValueError(f"Hyperparameter {k!r} needs shape {jnp.shape(hp[k])}, got {v.shape}.")
    hp[k] = v
  return opt_state._replace(hyperparams=hp)


def per_member_values(value, num_members: int, *, name: str) -> np.ndarray:
  """A scalar broadcast to (K,), or a length-K sequence checked and returned."""
  arr = np.asarray(value, dtype=np.float32)
  if arr.ndim == 0:
    return np.full((num_members,), float(arr), np.float32)
  if arr.shape != (num_members,):
    raise ValueError(f"{name} has {arr.shape[0] if arr.ndim else 0} values for "
                     f"{num_members} members; give one value or one per member.")
  return arr
