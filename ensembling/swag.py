"""SWAG (Maddox et al. 2019): a Gaussian over the weights, fitted along the SWA trajectory.

SWAG collects the iterates theta_1..theta_n of an SWA run (a `trajectory.swa_plan`'s
`average_steps`) into

  first moment    theta_SWA = mean_i theta_i                      (the SWA solution)
  second moment   mean_i theta_i^2
  diagonal        Sigma_diag = max(mean_i theta_i^2 - theta_SWA^2, var_clamp)
  deviations      D = [theta_i - theta_bar_i] of the last `rank` iterates, theta_bar_i the
                  running mean after theta_i entered it (the paper's Algorithm 1, and
                  `swag.py` of wjmaddox/swa_gaussian)

and samples theta = theta_SWA + sqrt(scale) (Sigma_diag^1/2 z_1 + D z_2 / sqrt(R - 1)),
z_1 ~ N(0, I_d), z_2 ~ N(0, I_R), R = `rank`: a Gaussian with mean theta_SWA and covariance
scale (Sigma_diag + D D^T / (R - 1)); the paper's scale is 1/2. `rank=0` is SWAG-Diagonal.
Models with BatchNorm need their statistics recomputed for every sample (`recalibrate`).

The collector plugs into `train.fit` / `train.fit_members` as `on_step` / `extra`, so the
moments are checkpointed with the run and a resumed run continues collecting exactly;
`fit` does it all for a plan.

>>> import jax, numpy as np, flax.linen as nn
>>> from ensembling import optim, trajectory
>>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
>>> y = (x[:, 0] > 0).astype(np.int32)
>>> plan = trajectory.swa_plan(base_lr=0.05, total_steps=24, pretrain_steps=8, swa_lr=0.02,
...                            anneal_steps=4, every=2)
>>> run = fit(nn.Dense(2), plan, x, y, rank=4, optimizer=lambda lr: optim.make_optimizer(
...           learning_rate=lr), batch_size=16, seed=0, progress=False)
>>> state = run_state(run.swag, 0)                       # run 0 of the (1,) run axis
>>> int(state["num_collected"]), state["deviations"]["kernel"].shape
(7, (4, 4, 2))
>>> params_S = sample(jax.random.key(1), state, num_samples=5, rank=4)
>>> params_S["kernel"].shape                             # 5 samples, stacked
(5, 4, 2)
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ensembling import checks, train, trajectory
from ensembling import tree as tree_lib

PyTree = Any
VAR_CLAMP = 1e-30  # the reference implementation's floor on the diagonal variance


# --------------------------------------------------------------------------- moments

def _check_rank(rank, what="rank"):
  message = (f"{what} must be 0 (SWAG-Diagonal) or an integer >= 2 (the low-rank part "
             f"divides by rank - 1), got {rank!r}.")
  try:
    r = checks.integer(rank, name=what, low=0)
  except ValueError:
    raise ValueError(message) from None
  if r == 1:
    raise ValueError(message)
  return r


def init_state(params: PyTree, *, rank: int, stacked: bool = False) -> dict:
  """An empty SWAG state for `params` (their values do not matter, only shapes).

  Args:
    params: one model's parameters, or K runs' stacked on axis 0 with `stacked=True`.
    rank: R, the deviation columns kept (0: diagonal only).
    stacked: `params` carry a leading run axis; every entry of the state then does too.

  Returns:
    {"mean", "sq_mean" (like params), "deviations" (R, ...) per leaf ((K, R, ...) if
    stacked; absent when R = 0), "num_collected" (int32, (K,) if stacked)}.
  """
  rank = _check_rank(rank)
  zeros = lambda a: jnp.zeros(jnp.shape(a), jnp.result_type(a))
  state = {"mean": jax.tree.map(zeros, params), "sq_mean": jax.tree.map(zeros, params)}
  lead = jnp.shape(jax.tree.leaves(params)[0])[:1] if stacked else ()
  if rank:
    def dev(a):
      s = jnp.shape(a)
      return jnp.zeros((s[0], rank) + s[1:] if stacked else (rank,) + s, jnp.result_type(a))
    state["deviations"] = jax.tree.map(dev, params)
  state["num_collected"] = jnp.zeros(lead, jnp.int32)
  return state


def _collect_one(state, params):
  n = state["num_collected"]
  c = n.astype(jnp.float32) + 1.0
  mean = jax.tree.map(lambda m, p: m + (p - m) / c.astype(m.dtype), state["mean"], params)
  sq = jax.tree.map(lambda s, p: s + (p * p - s) / c.astype(s.dtype), state["sq_mean"], params)
  out = {"mean": mean, "sq_mean": sq, "num_collected": n + 1}
  if "deviations" in state:
    rank = jax.tree.leaves(state["deviations"])[0].shape[0]
    slot = n % rank  # a ring buffer: the oldest column is overwritten
    out["deviations"] = jax.tree.map(lambda d, p, m: d.at[slot].set(p - m),
                                     state["deviations"], params, mean)
  return out


@functools.partial(jax.jit, static_argnames=("stacked",))
def collect(state: dict, params: PyTree, *, stacked: bool = False) -> dict:
  """`state` with `params` added: running moments, and its deviation from the new mean.

  mean <- mean + (theta - mean) / (n + 1), sq_mean likewise with theta^2, then
  theta - mean goes into deviation slot n mod R.

  Args:
    state: from `init_state` (or a previous `collect`).
    params: the iterate, shaped like the state's `mean`.
    stacked: a run axis leads (K runs collected at once).

  Returns:
    The new state.
  """
  tree_lib.check_same_structure([state["mean"], params], what="SWAG mean and params")
  return jax.vmap(_collect_one)(state, params) if stacked else _collect_one(state, params)


def swag_collector(*, collect_steps: Sequence[int], rank: int,
                   stacked: bool = True) -> trajectory.Collector:
  """Collects SWAG moments along a training run, for `train.fit`'s on_step / extra.

  Args:
    collect_steps: completed-update counts at which the parameters are collected (a
      plan's `average_steps`: SWAG collects where SWA averages).
    rank: R deviation columns kept (0: SWAG-Diagonal); at least R models must be
      collected.
    stacked: the trained state has a leading member (run) axis (`train.fit_members`);
      False for a single state (`members.init_state`).

  Returns:
    A `trajectory.Collector`: `init(state) -> extra` ({"swag": state}) and
    `on_step(step, state, extra) -> extra`.
  """
  rank = _check_rank(rank)
  steps = np.asarray(sorted(set(int(s) for s in collect_steps)), np.int64)
  if len(steps) != len(collect_steps):
    raise ValueError("collect_steps must not repeat a step.")
  if len(steps) and steps[0] < 1:
    raise ValueError("collect_steps count completed updates and must be >= 1.")
  if len(steps) < max(rank, 1):
    raise ValueError(f"rank={rank} needs at least {max(rank, 1)} collected models; "
                     f"collect_steps has {len(steps)}.")
  at = set(int(s) for s in steps)

  def init(state):
    return {"swag": init_state(state["params"], rank=rank, stacked=stacked)}

  def on_step(step, state, extra):
    if int(step) + 1 in at:
      extra = {**extra, "swag": collect(extra["swag"], state["params"], stacked=stacked)}
    return extra

  return trajectory.Collector(init, on_step, np.array([], np.int64), steps)


def run_state(swag_K: dict, k: int) -> dict:
  """Run `k`'s SWAG state out of a stacked one (K runs)."""
  return jax.tree.map(lambda a: a[k], swag_K)


def diagonal_variance(state: dict, *, var_clamp: float = VAR_CLAMP) -> PyTree:
  """Sigma_diag = max(sq_mean - mean^2, var_clamp), leaf by leaf."""
  return jax.tree.map(lambda s, m: jnp.maximum(s - m * m, var_clamp), state["sq_mean"],
                      state["mean"])


def deviation_columns(state: dict, *, rank: int) -> PyTree:
  """The deviations of the last `rank` collected models, newest first: (rank, ...) leaves.

  Raises a ValueError unless 0 <= rank <= the buffer size and `rank` models have been
  collected (`state` of one run).
  """
  rank = _check_rank(rank)
  n = np.asarray(state["num_collected"])
  if n.ndim:
    raise ValueError(f"state holds {n.shape[0]} runs; pick one with run_state(state, k).")
  n = int(n)
  have = jax.tree.leaves(state["deviations"])[0].shape[0] if "deviations" in state else 0
  if rank > have:
    raise ValueError(f"rank={rank} exceeds the {have} deviation columns the collector kept.")
  if n < max(rank, 1):
    raise ValueError(f"rank={rank} needs {max(rank, 1)} collected models, have {n}.")
  if not rank:
    return None
  idx = jnp.asarray([(n - 1 - j) % have for j in range(rank)])
  return jax.tree.map(lambda d: d[idx], state["deviations"])


# --------------------------------------------------------------------------- sampling

def sample_from_normals(state: dict, z_diag: PyTree, z_low, *, rank: int,
                        scale: float = 0.5, var_clamp: float = VAR_CLAMP) -> PyTree:
  """One SWAG sample for given standard normals (the construction `sample` draws).

  theta = mean + sqrt(scale) (Sigma_diag^1/2 z_diag + D z_low / sqrt(rank - 1)), D the
  last `rank` deviations (`deviation_columns`).

  Args:
    state: one run's SWAG state.
    z_diag: a tree like the parameters.
    z_low: (rank,) (ignored for rank 0).
    rank: R.
    scale: the covariance scale (the paper's 0.5).
    var_clamp: floor of the diagonal variance.

  Returns:
    The parameters.
  """
  if not scale >= 0:
    raise ValueError(f"scale must be >= 0, got {scale}.")
  cols = deviation_columns(state, rank=rank)
  return _sample_one(state, cols, z_diag, z_low, rank=int(rank), scale=float(scale),
                     var_clamp=float(var_clamp))


def _construct(state, cols, z_diag, z_low, *, rank, scale, var_clamp):
  var = diagonal_variance(state, var_clamp=var_clamp)
  out = jax.tree.map(lambda m, v, z: m + jnp.sqrt(scale) * jnp.sqrt(v) * z,
                     state["mean"], var, z_diag)
  if rank:
    z_low = jnp.asarray(z_low)
    out = jax.tree.map(lambda o, d: o + jnp.sqrt(scale) * jnp.tensordot(
        z_low.astype(d.dtype), d, 1) / jnp.sqrt(rank - 1.0), out, cols)
  return out


_sample_one = jax.jit(_construct, static_argnames=("rank", "scale", "var_clamp"))


@functools.partial(jax.jit, static_argnames=("num_samples", "rank", "scale", "var_clamp"))
def _sample_many(key, state, cols, *, num_samples, rank, scale, var_clamp):
  flat, unravel = ravel_pytree(state["mean"])

  def draw(k):
    k_diag, k_low = jax.random.split(k)
    z_diag = unravel(jax.random.normal(k_diag, flat.shape, flat.dtype))
    return _construct(state, cols, z_diag, jax.random.normal(k_low, (max(rank, 1),)),
                      rank=rank, scale=scale, var_clamp=var_clamp)

  return jax.vmap(draw)(jax.random.split(key, num_samples))


def sample(key: jax.Array, state: dict, *, num_samples: int, rank: int,
           scale: float = 0.5, var_clamp: float = VAR_CLAMP) -> PyTree:
  """`num_samples` SWAG samples of the parameters, stacked on a new leading axis.

  Sample s uses `k_diag, k_low = split(split(key, S)[s])`: z_diag = normal(k_diag, (d,))
  over the d parameters in `jax.flatten_util.ravel_pytree` order, z_low =
  normal(k_low, (rank,)).

  Args:
    key: PRNG key.
    state: one run's SWAG state (`run_state` picks one of K).
    num_samples: S >= 1.
    rank: R low-rank columns (0: SWAG-Diagonal; at most the collector's rank).
    scale: covariance scale (0.5 as in the paper).
    var_clamp: floor of the diagonal variance.

  Returns:
    Parameters with a leading axis of size S (member axis first, like an ensemble).
  """
  num_samples = checks.integer(num_samples, name="num_samples")
  if not scale >= 0:
    raise ValueError(f"scale must be >= 0, got {scale}.")
  cols = deviation_columns(state, rank=rank)
  return _sample_many(key, state, cols, num_samples=int(num_samples), rank=int(rank),
                      scale=float(scale), var_clamp=float(var_clamp))


def recalibrate(model, params_S: PyTree, x: np.ndarray, *, batch_stats: PyTree,
                batch_size: int, num_examples: int = 0,
                key: jax.Array | None = None) -> dict:
  """Variables for every sample, each with its own BatchNorm statistics recomputed.

  The S samples get `batch_stats` (any statistics of the right shapes, e.g. the last
  iterate's) and then one pass over `x` in training mode
  (`trajectory.recalibrate`, i.e. `averaging.recompute_batch_stats` stacked).

  Args:
    model: anything `models.as_model` accepts.
    params_S: stacked samples from `sample`.
    x: training inputs.
    batch_stats: one model's statistics (shapes only).
    batch_size, num_examples, key: see `trajectory.recalibrate`.

  Returns:
    {"params": params_S, "batch_stats": (S, ...)}.
  """
  s = tree_lib.num_members(params_S)
  v = {"params": params_S, "batch_stats": tree_lib.broadcast(batch_stats, s)}
  return trajectory.recalibrate(model, v, x, batch_size=batch_size, num_examples=num_examples,
                                key=key)


# --------------------------------------------------------------------------- training

class SwagRun(NamedTuple):
  """What `fit` returns (K = the parallel runs).

  Attributes:
    plan: the plan that ran.
    state: the runs' end states (K, ...).
    swag: the stacked SWAG state (K, ...); `run_state(swag, k)` for one run; its `mean`
      is the SWA solution.
    history: the metrics records.
    strategy: the member-parallel strategy that ran.
    seconds: wall time of the training call.
  """
  plan: trajectory.Plan
  state: PyTree
  swag: dict
  history: list
  strategy: str
  seconds: float


def fit(model, plan: trajectory.Plan, x: np.ndarray, y: np.ndarray, *, rank: int,
        optimizer: Callable[[optax.Schedule], optax.GradientTransformation],
        batch_size: int, seed: int, num_runs: int = 1, workdir: str | None = None,
        weight_decay=None, init_variables: PyTree = None, **fit_kwargs) -> SwagRun:
  """Trains `num_runs` runs under `plan` and collects SWAG at its `average_steps`.

  Initialisation, data order and checkpoints as `trajectory.fit` (checkpoints in
  `workdir/run`, so a rerun resumes and keeps collecting).

  Args:
    model: anything `models.as_model` accepts.
    plan: a plan with averaging steps (`trajectory.swa_plan`).
    x, y: training data.
    rank: deviation columns kept (the paper's K = 20; 0: SWAG-Diagonal).
    optimizer: `schedule -> optax transformation`.
    batch_size: per run.
    seed: init, data order and dropout derive from it.
    num_runs: K runs trained at once.
    workdir: checkpoints and metrics (None: nothing written).
    weight_decay: scalar or per-run values (with `optim.make_optimizer`).
    init_variables: stacked (K, ...) variables to start from instead of a fresh init.
    **fit_kwargs: passed to `train.fit_members` (eval_data, eval_every, strategy, ...).

  Returns:
    A `SwagRun`.
  """
  if not len(plan.average_steps):
    raise ValueError(f"plan {plan.method!r} has no average_steps to collect SWAG at; use "
                     "trajectory.swa_plan.")
  tx = optimizer(plan.schedule)
  state = train.init_member_state(model, x[:1], num_members=num_runs, tx=tx, seed=seed,
                                  weight_decay=weight_decay, init_variables=init_variables)
  collector = swag_collector(collect_steps=plan.average_steps, rank=rank)
  res = train.fit_members(state, model, x, y, tx=tx, num_steps=plan.total_steps,
                          batch_size=batch_size, seed=seed,
                          workdir=os.path.join(workdir, "run") if workdir else None,
                          schedule=plan.schedule, on_step=collector.on_step,
                          extra=collector.init(state), desc=f"swag x {num_runs} runs",
                          **fit_kwargs)
  return SwagRun(plan, res.state, res.extra["swag"], res.history, res.strategy, res.seconds)
