"""Amortized Model Ensembling (AME): model differences as pseudo-gradients, no data.

Lee & Ngo (2025), "On Defining Neural Averaging" (arXiv:2508.14832). K experts theta_i
(fine-tuned from one shared start on different data) are merged into one model by
running an optimizer in weight space, starting from a base point, with the
pseudo-gradient

    g(theta) = sum_i w_i (theta - theta_i)        (w_i >= 0, sum_i w_i = 1)

in place of a data gradient: `ame_merge(base, experts, *, tx, steps)` applies any optax
transformation `tx` for `steps` steps and returns the merged parameters. The model soup
is the special case `tx=optax.sgd(1.0)`, one step: theta_1 = base - (base - soup) = soup,
from any base. The paper also reads the soup as *online* gradient descent over the
experts (one expert per step, rate 1/t, one pass gives the running mean): that is
`pseudo_gradient="cyclic"` (step t uses g = theta - theta_{t mod K} alone).

What the optimizer can and cannot do (derived here, not stated in the paper): in the
full mode the pseudo-gradient is theta - soup, the gradient of |theta - soup|^2 / 2.
Any optimizer whose update is a linear function of past gradients (SGD, heavy-ball
momentum, Nesterov, at any schedule) therefore keeps theta on the line through the
base and the soup: theta_T = soup + c_T (base - soup) with a scalar c_T that the
optimizer alone fixes (`line_coefficients`). With the base at the experts' shared start
this is task arithmetic, base + (1 - c_T) * mean task vector: momentum's overshoot is
an extrapolation past the soup (c_T < 0). Only coordinate-wise adaptive optimizers
(Adam, Adagrad, ...) leave that line: their first step moves every coordinate by about
the learning rate towards the soup, whatever its distance.

The experts themselves: `fit_experts` fine-tunes K copies of one start in one
member-parallel `train.fit` run, expert k on shard k only (`data.shards`).

Departures from the paper:
- The default pseudo-gradient is the full weighted sum over the experts at every step
  (the definition in issue 15); the paper's online, one-expert-per-step view is offered
  as `pseudo_gradient="cyclic"` (a fixed order 0, 1, ..., K-1, no reshuffling).
- We could not check the paper's exact optimizer settings, weighting or starting point
  (its "pivot"); the experiment (configs/ame.py) starts from the experts' shared
  initialisation and sweeps a few optimizers and step counts.
- Inputs are checked strictly: NaN or inf in an expert is an error, not a skipped
  ingredient (the soups skip them with a warning).

Example (three scalar "experts"; SGD at rate 1 gives their mean in one step):

>>> import optax, numpy as np
>>> base = {"w": np.float32(5.0)}
>>> experts = [{"w": np.float32(v)} for v in (0.0, 1.0, 2.0)]
>>> float(ame_merge(base, experts, tx=optax.sgd(1.0), steps=1)["w"])
1.0
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import checks, members, train
from ensembling import tree as tree_lib
from ensembling.data import shards as shards_lib

PyTree = Any
PSEUDO_GRADIENTS = ("full", "cyclic")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")


def optimizer(name: str, *, learning_rate: float, momentum: float = 0.9
              ) -> optax.GradientTransformation:
  """The weight-space optimizers the experiment compares, by name.

  Args:
    name: "sgd" (plain), "momentum" (heavy ball), "nesterov" or "adam".
    learning_rate: the rate (> 0).
    momentum: heavy-ball / Nesterov coefficient in [0, 1) (ignored by "sgd" and "adam").

  Returns:
    An optax transformation for `ame_merge`.

  >>> optimizer("nesterov", learning_rate=0.5)  # doctest: +ELLIPSIS
  GradientTransformation...
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}.")
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=momentum)
  if name == "nesterov":
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"Unknown AME optimizer {name!r}; choose one of {OPTIMIZERS}.")


# --------------------------------------------------------------------------- input checks

def _check_inputs(base: PyTree, experts, weights, tx, steps, pseudo_gradient
                  ) -> tuple[PyTree, jax.Array]:
  """Validated (stacked experts, normalised weights (K,)); errors name the problem."""
  if not (hasattr(tx, "init") and hasattr(tx, "update")):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}.")
  checks.integer(steps, name="steps")
  if pseudo_gradient not in PSEUDO_GRADIENTS:
    raise ValueError(f"Unknown pseudo_gradient {pseudo_gradient!r}; choose one of "
                     f"{PSEUDO_GRADIENTS}.")
  base_leaves = tree_lib.named_leaves(base)
  if not base_leaves:
    raise ValueError("base has no array leaves.")
  for name, x in base_leaves:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      raise ValueError(f"AME merges floating-point parameters; base leaf '{name}' is {x.dtype}.")
    if not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"base has NaN or inf values at '{name}'.")
  if isinstance(experts, (list, tuple)):
    if len(experts) == 0:
      raise ValueError("ame_merge needs at least one expert, got an empty list.")
    tree_lib.check_same_structure(list(experts), what="experts")
    try:
      tree_lib.check_same_structure([base, experts[0]], what="trees (base = 0, expert 0 = 1)")
    except ValueError as e:
      raise ValueError(f"base and the experts do not match: {e}") from None
    stacked = tree_lib.stack(list(experts))
  else:
    if jax.tree_util.tree_structure(experts) != jax.tree_util.tree_structure(base):
      raise ValueError("base and the stacked experts have different tree structures; pass "
                       "the experts as a list of trees shaped like base, or tree.stack(list).")
    for (name, b), (_, e) in zip(base_leaves, tree_lib.named_leaves(experts)):
      if np.shape(e)[1:] != np.shape(b) or np.ndim(e) == 0:
        raise ValueError(f"stacked experts must have a leading member axis over base's "
                         f"shapes; at '{name}' base is {np.shape(b)}, experts {np.shape(e)}.")
    stacked = experts
    if tree_lib.num_members(stacked) == 0:
      raise ValueError("ame_merge needs at least one expert, got a stack of 0.")
  k = tree_lib.num_members(stacked)
  for (name, b), (_, e) in zip(base_leaves, tree_lib.named_leaves(stacked)):
    if jnp.asarray(e).dtype != jnp.asarray(b).dtype:
      raise ValueError(f"base and the experts differ in dtype at '{name}': "
                       f"{jnp.asarray(b).dtype} vs {jnp.asarray(e).dtype}.")
  finite = tree_lib.finite_members(stacked)
  if not finite.all():
    bad = np.flatnonzero(~finite).tolist()
    raise ValueError(f"expert(s) {bad} of {k} contain NaN or inf values; drop or fix them "
                     "before merging.")
  if weights is None:
    w = np.full((k,), 1.0 / k)
  else:
    if pseudo_gradient == "cyclic":
      raise ValueError("weights are for pseudo_gradient='full'; the cyclic pass weighs every "
                       "expert by its step's learning rate.")
    w = np.asarray(weights, np.float64)
    if w.shape != (k,):
      raise ValueError(f"weights must have shape ({k},) (one per expert), got {w.shape}.")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
      raise ValueError(f"weights must be finite, >= 0 and not all 0; got {w.tolist()}.")
    w = w / w.sum()
  return stacked, jnp.asarray(w, jnp.float32)


# --------------------------------------------------------------------------- AME

def pseudo_gradient_fn(stacked: PyTree, weights, *, mode: str = "full"):
  """`(theta, t) -> g`: the pseudo-gradient of step t (0-based).

  "full": sum_i w_i (theta - theta_i), computed as theta - sum_i w_i theta_i (equal
  when the weights sum to 1, and one subtraction per step instead of K);
  "cyclic": theta - theta_{t mod K}.
  """
  if mode == "full":
    soup = tree_lib.weighted_sum(stacked, weights)
    return lambda theta, t: jax.tree.map(jnp.subtract, theta, soup)
  k = tree_lib.num_members(stacked)
  return lambda theta, t: jax.tree.map(lambda a, e: a - e[t % k], theta, stacked)


def ame_path(base: PyTree, experts: PyTree | Sequence[PyTree], *,
             tx: optax.GradientTransformation, steps: int, weights=None,
             pseudo_gradient: str = "full") -> PyTree:
  """Every iterate of AME: theta_1, ..., theta_steps stacked along a leading axis.

  One `jax.lax.scan` of `steps` optimizer steps from `base`; for a sweep over step
  counts (theta at step s is row s - 1). Memory: `steps` copies of the parameters.

  Args and checks: as `ame_merge`.

  Returns:
    A pytree shaped like `base` with a leading axis of size `steps`.
  """
  stacked, w = _check_inputs(base, experts, weights, tx, steps, pseudo_gradient)
  base = jax.tree.map(jnp.asarray, base)
  grad = pseudo_gradient_fn(stacked, w, mode=pseudo_gradient)

  def body(carry, t):
    theta, opt_state = carry
    updates, opt_state = tx.update(grad(theta, t), opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    return (theta, opt_state), theta

  run = jax.jit(lambda b: jax.lax.scan(body, (b, tx.init(b)), jnp.arange(int(steps)))[1])
  return run(base)


def ame_merge(base: PyTree, experts: PyTree | Sequence[PyTree], *,
              tx: optax.GradientTransformation, steps: int, weights=None,
              pseudo_gradient: str = "full") -> PyTree:
  """Amortized Model Ensembling: `steps` steps of `tx` on the experts' pseudo-gradient.

  Starting at theta_0 = base, step t computes g_t = sum_i w_i (theta_t - theta_i) and
  applies `tx` to it (`optax.apply_updates`); no data is touched.

  Args:
    base: the starting point (e.g. the experts' shared initialisation, or any model).
    experts: K pytrees shaped like `base`, as a list or stacked (member axis first).
    tx: any optax transformation (`optimizer` names the experiment's four).
    steps: optimizer steps (>= 1).
    weights: (K,) non-negative expert weights, normalised to sum to 1 (None: 1/K).
    pseudo_gradient: "full" (the weighted sum above, every step) or "cyclic" (step t
      uses expert t mod K alone; no `weights`).

  Returns:
    The merged parameters, shaped like `base`.

  Raises:
    ValueError: empty expert list; experts or base of different structure, shapes or
      dtypes; NaN / inf in the base or an expert (named); bad weights or steps.
    TypeError: `tx` is not an optax transformation.

  >>> import optax, numpy as np
  >>> out = ame_merge({"w": np.zeros(2, np.float32)}, [{"w": np.ones(2, np.float32)}] * 2,
  ...                 tx=optax.sgd(0.5), steps=2)
  >>> out["w"].tolist()  # halfway, then halfway again: 1 - 0.5**2
  [0.75, 0.75]
  """
  return jax.tree.map(lambda x: x[-1], ame_path(base, experts, tx=tx, steps=steps,
                                                weights=weights,
                                                pseudo_gradient=pseudo_gradient))


def line_coefficients(tx: optax.GradientTransformation, *, steps: int) -> np.ndarray:
  """(c_1, ..., c_steps) with theta_T = soup + c_T (base - soup), for linear optimizers.

  The same `tx` run on the 1-d problem x_0 = 1, g = x (soup at 0), one scan. Valid for
  SGD, heavy-ball and Nesterov momentum at any schedule (full pseudo-gradient); with the
  base at the experts' shared start, T steps are task arithmetic with scale 1 - c_T.
  Meaningless for adaptive optimizers such as Adam, which leave the line.

  >>> import optax
  >>> line_coefficients(optax.sgd(0.5), steps=3).tolist()
  [0.5, 0.25, 0.125]
  """
  one = {"x": jnp.ones((), jnp.float32)}
  path = ame_path(one, [{"x": jnp.zeros((), jnp.float32)}], tx=tx, steps=steps)
  return np.asarray(path["x"], np.float64)


# --------------------------------------------------------------------------- the experts

def fit_experts(model, variables: PyTree, x: np.ndarray, y: np.ndarray, shards_KxN, *,
                tx: optax.GradientTransformation, num_steps: int, batch_size: int, seed: int,
                strategy: str = "auto", eval_data: tuple | None = None,
                **fit_kwargs) -> train.TrainResult:
  """The paper's setting: K experts fine-tuned from one start, expert k on shard k only.

  One member-parallel `train.fit` run; batches from `data.shards.shard_batch_fn` (each
  expert shuffles its own shard every epoch), keys from `key(seed + 1)`.

  Args:
    model: anything `models.as_model` accepts.
    variables: the shared start ({"params", ...}), copied to every expert.
    x, y: the whole training set; `shards_KxN` (e.g. `data.shards.class_skewed_shards`)
      indexes it, one row per expert.
    tx: the experts' optimizer.
    num_steps, batch_size, seed: steps to run, examples per expert and step, data order.
    strategy: member-parallel strategy (`members.STRATEGIES`).
    eval_data: (x, y) scored every epoch (per expert, in metrics.jsonl).
    **fit_kwargs: passed to `train.fit` (workdir, progress, schedule, desc, ...).

  Returns:
    A `train.TrainResult`; `result.state["params"]` are the K experts, stacked.
  """
  shards_KxN = np.asarray(shards_KxN)
  k = len(shards_KxN)
  batch_fn, spe = shards_lib.shard_batch_fn(x, y, shards_KxN, seed=seed, batch_size=batch_size)
  state = train.init_member_state(model, x[:1], num_members=k, tx=tx, seed=seed,
                                  init_variables=tree_lib.broadcast(variables, k))
  step = members.ensemble_step(model=model, tx=tx, num_members=k, strategy=strategy,
                               donate=True)
  eval_fn = None if eval_data is None else (
      lambda s: train.evaluate_members(model, s, *eval_data, strategy=step.strategy))
  fit_kwargs = {"desc": f"{k} experts", "eval_every": spe, "checkpoint_every": spe,
                **fit_kwargs}
  t0 = time.perf_counter()
  state, _, history = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=int(num_steps),
                                key=jax.random.key(seed + 1), eval_fn=eval_fn,
                                steps_per_epoch=spe, **fit_kwargs)
  return train.TrainResult(state, step.strategy, time.perf_counter() - t0, history)
