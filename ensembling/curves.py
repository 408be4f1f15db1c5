"""Mode-connecting curves between two trained networks (Garipov et al. 2018).

Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, "Loss Surfaces, Mode Connectivity, and
Fast Ensembling of DNNs" (NeurIPS 2018; the paper that introduced FGE). Two
independently trained networks `start` and `end` are joined by a curve phi(t),
t in [0, 1], with phi(0) = start and phi(1) = end, whose one free point, the `bend`,
is trained to minimise the expected loss E_{t ~ U(0, 1)} L(phi(t)):

- `bezier(t, start, bend, end)` = (1 - t)^2 start + 2 t (1 - t) bend + t^2 end, the
  quadratic Bezier curve;
- `polychain(t, start, bend, end)`: start -> bend on [0, 0.5], bend -> end on [0.5, 1]
  (two straight segments);
- `fit_curve(model, start, end, x, y, *, kind, tx, num_steps, batch_size, seed)` trains
  the bend with both end points frozen (`optim.freeze`), a fresh t ~ U(0, 1) for every
  batch, through `train.fit` (checkpoints, resumption, NaN policy);
- `evaluate_path(model, start, bend, end, x, y, *, kind, ts, bn_x)` evaluates phi on a
  grid of t with every point's BatchNorm statistics recomputed on `bn_x`
  (`averaging.recompute_batch_stats`, PyTorch `update_bn`), all points of the grid at
  once (one member-parallel forward pass over a stacked tree of points);
- `barrier(values)`: max over the path minus the mean of the two ends.

The straight line start -> end is the Bezier curve with its bend at the midpoint
((s + e) / 2), so `kind="bezier"` with `midpoint(start, end)` evaluates it.

Departures from the paper and the PyTorch reference (timgaripov/dnn-mode-connectivity):
- The curve is defined on whole variable trees; BatchNorm scale and bias are on the
  curve like every other parameter (as in the reference), and the running statistics
  are not: during training each point normalises with its batch statistics (training
  mode) and at evaluation they are recomputed at every t (as the reference does).
- The reference trains curves for as many epochs as the end points (600 on CIFAR); our
  experiment trains them for a few epochs (docs/results_curves.md says how many).
- Weight decay (if `tx` has it) acts on the bend only, since the end points are frozen;
  the reference's decay acts on all of the curve's trainable points, which is the same.

Example (a Bezier curve passes through its end points; the midpoint bend gives the line):

>>> import jax.numpy as jnp
>>> s, e = {"w": jnp.zeros(2)}, {"w": jnp.array([2.0, 4.0])}
>>> bezier(0.25, s, midpoint(s, e), e)["w"]
Array([0.5, 1. ], dtype=float32)
>>> polychain(0.75, s, {"w": jnp.ones(2)}, e)["w"]
Array([1.5, 2.5], dtype=float32)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import averaging, checks, ensemble, losses, members, metrics, optim, train
from ensembling import tree as tree_lib
from ensembling.models.contract import as_model

PyTree = Any
KINDS = ("bezier", "polychain")


# --------------------------------------------------------------------------- curves

def _check_t(t) -> None:
  if isinstance(t, jax.core.Tracer):
    return  # inside jit: t comes from jax.random.uniform, in [0, 1) by construction
  v = np.asarray(t, np.float64)
  if not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v > 1):
    raise ValueError(f"t must lie in [0, 1], got {t!r}.")


def _check_points(start, bend, end) -> None:
  tree_lib.check_same_structure([start, bend, end], what="curve points (start, bend, end)")


def bezier(t, start: PyTree, bend: PyTree, end: PyTree) -> PyTree:
  """The quadratic Bezier curve (1 - t)^2 start + 2 t (1 - t) bend + t^2 end.

  Args:
    t: a scalar in [0, 1].
    start, bend, end: trees of the same structure and shapes.

  Returns:
    The point at t (a tree like `start`, in its dtypes).
  """
  _check_t(t)
  _check_points(start, bend, end)
  t = jnp.asarray(t, jnp.float32)
  a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
  return jax.tree.map(lambda s, m, e: (a * s + b * m + c * e).astype(s.dtype), start, bend, end)


def polychain(t, start: PyTree, bend: PyTree, end: PyTree) -> PyTree:
  """The two-segment polygonal chain: start -> bend on [0, 0.5], bend -> end on [0.5, 1].

  phi(t) = start + 2t (bend - start) for t <= 0.5, bend + (2t - 1)(end - bend) after.

  Args:
    t: a scalar in [0, 1].
    start, bend, end: trees of the same structure and shapes.

  Returns:
    The point at t.
  """
  _check_t(t)
  _check_points(start, bend, end)
  t = jnp.asarray(t, jnp.float32)
  first = t <= 0.5
  u = jnp.where(first, 2 * t, 2 * t - 1)

  def leaf(s, m, e):
    lo, hi = jnp.where(first, s, m), jnp.where(first, m, e)
    return (lo + u * (hi - lo)).astype(s.dtype)

  return jax.tree.map(leaf, start, bend, end)


CURVES: dict[str, Callable] = {"bezier": bezier, "polychain": polychain}


def curve_fn(kind: str) -> Callable:
  """`bezier` or `polychain` by name."""
  if kind not in CURVES:
    raise ValueError(f"Unknown curve kind {kind!r}; choose one of {KINDS}.")
  return CURVES[kind]


def midpoint(start: PyTree, end: PyTree) -> PyTree:
  """(start + end) / 2: the bend of the straight line, and the paper's initial bend."""
  return tree_lib.interpolate(start, end, 0.5)


def path_points(kind: str, ts: Sequence[float], start: PyTree, bend: PyTree,
                end: PyTree) -> PyTree:
  """The points phi(t) for every t in `ts`, stacked on a leading axis (len(ts), ...)."""
  fn = curve_fn(kind)
  ts = np.asarray(ts, np.float64).reshape(-1)
  if ts.size == 0:
    raise ValueError("ts is empty: give at least one t in [0, 1].")
  _check_t(ts)
  _check_points(start, bend, end)
  pts = jax.jit(jax.vmap(lambda t: fn(t, start, bend, end)))(jnp.asarray(ts, jnp.float32))
  return pts


# --------------------------------------------------------------------------- training

def _check_finite(tree: PyTree, what: str) -> None:
  for name, x in tree_lib.named_leaves(tree):
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f"{what} has non-finite values at '{name}'.")


class CurveResult(NamedTuple):
  """What `fit_curve` returns.

  Attributes:
    bend: the trained bend (variables like `start`: params, and batch_stats if any).
    kind: "bezier" or "polychain".
    history: `train.fit`'s records (train loss per eval window).
  """
  bend: PyTree
  kind: str
  history: list


def curve_loss_fn(model, kind: str, batch_stats: PyTree | None = None, *,
                  loss_fn: Callable = losses.softmax_cross_entropy) -> Callable:
  """`(points, batch, key) -> (loss, {"accuracy", "t"})` at a fresh t ~ U(0, 1).

  `points` = {"start", "bend", "end"} (parameter trees); the point phi(t) runs in
  training mode (BatchNorm layers normalise with the batch's statistics; the running
  statistics in `batch_stats` are only a template and are discarded).
  """
  m, fn = as_model(model), curve_fn(kind)

  def loss(points, batch, key):
    t_key, drop_key = jax.random.split(key)
    t = jax.random.uniform(t_key, ())
    params = fn(t, points["start"], points["bend"], points["end"])
    out, _ = m.apply({"params": params, "batch_stats": batch_stats or {}}, batch["x"],
                     train=True, key=drop_key)
    acc = jnp.mean(jnp.argmax(out.logits, -1) == batch["y"])
    return loss_fn(out.logits, batch["y"]), {"accuracy": acc, "t": t}

  return loss


def fit_curve(model, start: PyTree, end: PyTree, x: np.ndarray, y: np.ndarray, *,
              kind: str = "bezier", tx: optax.GradientTransformation, num_steps: int,
              batch_size: int, seed: int, bend: PyTree | None = None,
              workdir: str | None = None, loss_fn: Callable = losses.softmax_cross_entropy,
              progress: bool = True, checkpoint_every: int = 0,
              schedule: optax.Schedule | None = None) -> CurveResult:
  """Trains the bend of a curve between two frozen end points (Garipov et al. 2018).

  Every step draws t ~ U(0, 1) (from the step's key), forms phi(t) from the frozen
  `start` / `end` and the trained bend, and takes one step of `tx` on the loss of that
  point on the batch: stochastic gradient descent on E_t L(phi(t)). The loop is
  `train.fit` (checkpoints in `workdir`, exact resumption).

  Args:
    model: anything `models.as_model` accepts.
    start, end: the end points' variables ({"params", "batch_stats"?}, unstacked).
    x, y: training data.
    kind: "bezier" or "polychain".
    tx: the optimizer of the bend (wrapped in `optim.freeze`, so the end points carry
      no optimizer state and stay bit-identical).
    num_steps: optimizer steps.
    batch_size: examples per step.
    seed: data order and the t / dropout draws derive from it.
    bend: the initial bend's variables (default: `midpoint(start, end)`, the paper's
      initialisation on the straight line).
    workdir: metrics.jsonl and checkpoints (None: nothing written).
    loss_fn: `loss_fn(logits, labels) -> scalar`.
    progress, checkpoint_every, schedule: passed to `train.fit`.

  Returns:
    A `CurveResult`; its bend holds the end point's `batch_stats` unchanged (recompute
    them per t with `evaluate_path`).
  """
  curve_fn(kind)
  tree_lib.check_same_structure([start, end], what="end points (start, end)")
  if bend is not None:
    tree_lib.check_same_structure([start, bend], what="start and bend")
  checks.integer(num_steps, name="num_steps")
  _check_finite(start, "start")
  _check_finite(end, "end")
  init = midpoint(start, end) if bend is None else bend
  points = {"start": start["params"], "bend": init["params"], "end": end["params"]}
  tx = optim.freeze(tx, points, trainable="^bend/")
  step = train.pytree_step(curve_loss_fn(model, kind, start.get("batch_stats"),
                                         loss_fn=loss_fn), tx, has_aux=True)
  batch_fn, spe = train.make_batch_fn(x, y, seed=seed, batch_size=batch_size)
  state, _, history = train.fit(
      train.init_pytree_state(points, tx), step_fn=step, batch_fn=batch_fn,
      num_steps=int(num_steps), key=jax.random.key(seed + 1), workdir=workdir,
      eval_every=spe, checkpoint_every=checkpoint_every or spe, progress=progress,
      desc=f"{kind} curve", steps_per_epoch=spe, eval_split=None, schedule=schedule)
  out = {**init, "params": state["params"]["bend"]}
  return CurveResult(out, kind, history)


# --------------------------------------------------------------------------- evaluation

def barrier(values: Sequence[float], *, higher_is_better: bool = False) -> float:
  """max along the path minus the mean of the two ends (min and sign flipped if higher is better).

  >>> barrier([1.0, 3.0, 2.0])
  1.5
  """
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size < 2:
    raise ValueError(f"barrier needs a 1-d path of at least 2 values, got shape {v.shape}.")
  ends = 0.5 * (v[0] + v[-1])
  return float(ends - v.min()) if higher_is_better else float(v.max() - ends)


def evaluate_path(model, start: PyTree, bend: PyTree, end: PyTree, x: np.ndarray,
                  y: np.ndarray, *, kind: str = "bezier", ts: Sequence[float],
                  bn_x: np.ndarray | None = None, bn_batch_size: int = 256,
                  batch_size: int = 1000, strategy: str = "auto",
                  key: jax.Array | None = None) -> dict[str, np.ndarray]:
  """Loss, accuracy and error of phi(t) on (x, y) at every t in `ts`.

  All points are stacked on a member axis and evaluated in one member-parallel pass
  (`members.predict`). For a model with BatchNorm each point's running statistics are
  first recomputed on `bn_x` (full batches of `bn_batch_size`,
  `averaging.recompute_batch_stats`), as the PyTorch reference does at every t; without
  it interior points normalise with statistics that belong to no network on the path.

  Args:
    model: anything `models.as_model` accepts.
    start, bend, end: variables of the three points (bend: from `fit_curve`, or
      `midpoint(start, end)` for the straight line).
    x, y: evaluation data.
    kind: "bezier" or "polychain".
    ts: the grid, each in [0, 1].
    bn_x: inputs for the BatchNorm recomputation (needed when the model has BatchNorm).
    bn_batch_size, batch_size: batch sizes of the recomputation and of inference.
    strategy: member-parallel strategy over the points (`members.STRATEGIES`).
    key: dropout key of the recomputation pass.

  Returns:
    {"t", "loss", "accuracy", "error"}: arrays of len(ts).
  """
  ts = np.asarray(ts, np.float64).reshape(-1)
  params = path_points(kind, ts, start["params"], bend["params"], end["params"])
  variables = {"params": params}
  if jax.tree.leaves(start.get("batch_stats", {})):
    if bn_x is None:
      raise ValueError("The model has BatchNorm: pass bn_x (e.g. the training inputs) to "
                       "recompute its statistics at every t.")
    n = (len(bn_x) // bn_batch_size) * bn_batch_size
    if n == 0:
      raise ValueError(f"bn_x has {len(bn_x)} examples, fewer than bn_batch_size={bn_batch_size}.")
    variables["batch_stats"] = tree_lib.broadcast(start["batch_stats"], len(ts))
    batches = (bn_x[i:i + bn_batch_size] for i in range(0, n, bn_batch_size))
    variables = averaging.recompute_batch_stats(model, variables, batches, stacked=True, key=key)
  logits = members.predict(model, variables, x, batch_size=batch_size, strategy=strategy)
  probs = ensemble.members_probs(logits)
  acc = np.array([metrics.accuracy(p, y) for p in probs])
  return {"t": ts, "loss": np.array([metrics.nll(p, y) for p in probs]),
          "accuracy": acc, "error": 1.0 - acc}
