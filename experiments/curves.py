"""Mode-connecting curves (Garipov et al. 2018): four paths between two trained models.

`configlib.train_members_from_config` trains the two end points, `ensembling.align`
weight-matches the second to the first, `curves.fit_curve` trains the Bezier and
PolyChain bends and `curves.evaluate_path` evaluates every path on a grid of t (BatchNorm
recomputed at each point). This file maps configs/curves.py onto them and writes
curves.png (training logs: workdir/{ends,bezier,polychain}/).
"""

import os

import jax
import numpy as np

from ensembling import align, configlib, curves, data, members, optim, report, schedules
from ensembling import tree as tree_lib

SPECS = {"mlp": align.mlp_permutation_spec, "cnn": align.cnn_permutation_spec}


def validate(config):
  bad = sorted(set(config.curve.kinds) - set(curves.KINDS))
  if bad:
    raise ValueError(f"Unknown curve kind(s) {bad}; choose from {curves.KINDS}.")
  if config.model.name not in SPECS:
    raise ValueError(f"curves needs a permutation spec for the model; have {sorted(SPECS)}, "
                     f"got {config.model.name!r}.")
  if int(config.curve.num_points) < 2:
    raise ValueError(f"curve.num_points must be >= 2, got {config.curve.num_points}.")


def _row(name, ev):
  best = int(np.argmax(ev["accuracy"]))
  return dict(path=name, loss_barrier=curves.barrier(ev["loss"]),
              error_barrier=curves.barrier(ev["error"]),
              end_accuracy=[float(ev["accuracy"][0]), float(ev["accuracy"][-1])],
              mid_accuracy=float(ev["accuracy"][len(ev["t"]) // 2]),
              min_accuracy=float(ev["accuracy"].min()),
              best_accuracy=float(ev["accuracy"][best]), best_t=float(ev["t"][best]))


def run(config, workdir: str):
  splits = configlib.load_data(config)
  cc, seed, bs = config.curve, int(config.seed), int(config.batch_size)
  if int(config.members) != 2:
    raise ValueError(f"curves joins two end points: members must be 2, got {config.members}.")
  model, res = configlib.train_members_from_config(config, splits, os.path.join(workdir, "ends"),
                                                   desc="end points")
  start, end = tree_lib.unstack(members.variables_of(res.state))
  spec = SPECS[config.model.name](start)
  perm = align.weight_matching(jax.random.key(seed), spec, start, end,
                               max_iter=int(cc.match_iters))
  matched = align.apply_permutation(spec, perm, end)
  ts = np.linspace(0.0, 1.0, int(cc.num_points))
  bn_x = splits.x_train[:int(cc.bn_examples)]
  evaluate = lambda s, b, e, kind: curves.evaluate_path(
      model, s, b, e, splits.x_test, splits.y_test, kind=kind, ts=ts, bn_x=bn_x,
      bn_batch_size=int(cc.bn_batch_size), batch_size=int(config.eval_batch_size),
      strategy=config.members_strategy, key=jax.random.key(seed + 3))
  paths = {"straight line": evaluate(start, curves.midpoint(start, end), end, "bezier"),
           "straight line, weight-matched": evaluate(start, curves.midpoint(start, matched),
                                                     matched, "bezier")}
  spe = data.num_steps_per_epoch(len(splits.x_train), bs)
  steps = spe * int(cc.epochs)
  histories = {}
  for kind in cc.kinds:
    sched = schedules.warmup_cosine(float(cc.learning_rate), steps)
    tx = optim.make_optimizer(name="sgd", learning_rate=sched, momentum=0.9,
                              weight_decay=float(cc.weight_decay))
    fitted = curves.fit_curve(model, start, end, splits.x_train, splits.y_train, kind=kind,
                              tx=tx, num_steps=steps, batch_size=bs, seed=seed + 10,
                              workdir=os.path.join(workdir, kind), schedule=sched,
                              progress=bool(config.progress))
    histories[kind] = fitted.history
    paths[{"bezier": "Bezier curve", "polychain": "PolyChain"}[kind]] = evaluate(
        start, fitted.bend, end, kind)
  rows = [_row(n, ev) for n, ev in paths.items()]
  report.plot_panels(os.path.join(workdir, "curves.png"), ts, {
      "test loss": {n: ev["loss"] for n, ev in paths.items()},
      "test accuracy": {n: ev["accuracy"] for n, ev in paths.items()}}, xlabel="t",
      title=f"{config.model.name}: paths between two independently trained models")
  pct = lambda v: f"{100 * v:.2f}"
  table = report.cells_table(
      ["path", "loss barrier", "error barrier (pts)", "acc at t=0 / t=1", "acc at t=0.5",
       "min acc", "best acc (t)"],
      [[r["path"], f"{r['loss_barrier']:.4f}", pct(r["error_barrier"]),
        " / ".join(pct(a) for a in r["end_accuracy"]), pct(r["mid_accuracy"]),
        pct(r["min_accuracy"]), f"{pct(r['best_accuracy'])} ({r['best_t']:.2f})"] for r in rows])
  markdown = (f"# Mode-connecting curves: {config.model.name} on {splits.name}, two models "
              f"from different seeds ({config.epochs} epochs), curves trained {cc.epochs} "
              f"epochs; test split, {len(ts)} points of t, BatchNorm recomputed at each on "
              f"{len(bn_x)} training images\n\n" + table
              + "\nBarrier: max along the path minus the mean of the two ends (loss; test "
              "error in points).\n")
  out = {"data": splits.describe(), "model": config.model.to_dict(), "t": ts.tolist(),
         "rows": rows, "paths": {n: {k: np.asarray(v).tolist() for k, v in ev.items()}
                                 for n, ev in paths.items()},
         "curve_train_loss": {k: [h["train_loss"] for h in hs] for k, hs in histories.items()}}
  return out, markdown
