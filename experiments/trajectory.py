"""Trajectory ensembles at an equal training budget: SGD, SSE, FGE, SWA, StarSSE.

Every method trains `config.members` independent runs (seeds) at once (member axis =
seed), so every table row is a mean ± std over seeds. Each method runs in
`workdir/<method>/` with its own checkpoints (a rerun resumes). The methods themselves
are `ensembling.trajectory`; configs: configs/{snapshot,fge,swa,starsse}.py
(`configlib.trajectory_config`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ensembling import configlib, data, report, trajectory


def _run_method(method, config, splits, model, workdir):
  spe = data.num_steps_per_epoch(len(splits.x_train), int(config.batch_size))
  plan = configlib.trajectory_plan(method, config, spe)
  run = trajectory.fit(
      model, plan, splits.x_train, splits.y_train,
      optimizer=lambda s: configlib.optimizer_from_config(config.optim, schedule=s),
      num_runs=int(config.members), batch_size=int(config.batch_size), seed=int(config.seed),
      workdir=workdir, eval_data=(splits.x_test, splits.y_test), eval_split="test",
      eval_every=max(1, spe // int(config.eval_per_epoch)),
      checkpoint_every=int(config.checkpoint_every_steps),
      weight_decay=configlib._plain(config.optim.weight_decay),
      strategy=config.members_strategy, eval_batch_size=int(config.eval_batch_size),
      star_reset_optimizer=bool(config.traj.star_reset_optimizer),
      progress=bool(config.progress))
  # The rows are stored with what they were computed from, so a resumed run does not
  # re-evaluate (and recalibrate) the methods that had finished.
  rows = trajectory.evaluate(
      model, run, splits.x_test, splits.y_test, recalibration_x=splits.x_train,
      recalibration_key=jax.random.key(int(config.seed)),
      recalibration_batch_size=int(config.batch_size),
      recalibration_examples=int(config.recalibration_examples),
      recalibrate_snapshots=bool(config.traj.recalibrate_snapshots),
      batch_size=int(config.eval_batch_size), strategy=run.strategy,
      cache=os.path.join(workdir, "rows.json"))
  return run, rows, spe


def _markdown(splits, config, rows, pending=()):
  head = (f"# Trajectory ensembles on {splits.name}: {config.model.name}, {config.epochs} "
          f"epochs per method, mean ± std over {config.members} seeds (test split)\n\n")
  if pending:
    head += (f"**Partial**: {', '.join(rows)} done; {', '.join(pending)} not yet "
             "(rerun the command to resume).\n\n")
  return (head + report.seed_table(rows) + "\n`disagreement`: mean pairwise test "
          "disagreement between the ensemble's members (snapshots, or the independent "
          "seeds).\n")


def _plot(path, runs, spe):
  plt = report._pyplot()
  fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  for method, run in runs.items():
    p = run.plan
    n = 2 * p.cycle_steps if method == "starsse" else p.total_steps
    steps = np.arange(n)
    # StarSSE: cycle 1, then the star cycles (all in parallel), each with the cycle's rates
    lrs = np.asarray(jax.vmap(p.schedule)(jnp.asarray(steps % p.cycle_steps if method ==
                                                       "starsse" else steps)))
    line, = ax0.plot(steps / spe, lrs, label=method, lw=1,
                     ls="--" if method == "starsse" else "-")
    for marks, sym in ((p.snapshot_steps[:1] if method == "starsse" else p.snapshot_steps, "o"),
                       (p.average_steps, "x")):
      idx = np.asarray(marks, np.int64) - 1  # the update that produced the collected model
      if len(idx):
        ax0.plot(idx / spe, lrs[idx], sym, color=line.get_color(), ms=4)
    for hist, offset in run.history:
      recs = [r for r in hist if "test_accuracy" in r]
      xs = sorted({r["step"] for r in recs})
      acc = [np.mean([r["test_accuracy"] for r in recs if r["step"] == s]) for s in xs]
      ax1.plot((np.asarray(xs) + offset) / spe, acc, color=line.get_color(), lw=1,
               label=method if offset == 0 else None)
  ax0.set_ylabel("learning rate")
  ax0.set_title("o: snapshots, x: SWA averaging points", fontsize=8)
  ax0.legend(fontsize=7)
  ax0.grid(alpha=0.3)
  ax1.set_ylabel("test accuracy (mean over seeds)")
  ax1.set_xlabel("epoch" + (" (StarSSE: cycle 1, then the parallel star cycles)"
                            if "starsse" in runs else ""))
  ax1.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir: str):
  splits = configlib.load_data(config)
  model = configlib.model_from_config(config.model, num_classes=splits.num_classes)
  runs, rows, spe = {}, {}, None
  partial = os.path.join(workdir, "results_partial.md")
  for i, method in enumerate(config.methods):
    runs[method], rows[method], spe = _run_method(method, config, splits, model,
                                                  os.path.join(workdir, method))
    if report._primary():
      with open(partial, "w") as f:
        f.write(_markdown(splits, config, rows, pending=config.methods[i + 1:]))
  out = {
      "data": splits.describe(), "model": config.model.to_dict(), "epochs": int(config.epochs),
      "seeds": int(config.members),
      "methods": {m: {row: {"summary": report.seed_summary(ps),
                            "per_seed": [{k: v for k, v in r.items() if k != "_matrix"}
                                         for r in ps]}
                      for row, ps in rs.items()} for m, rs in rows.items()},
      "snapshot_steps": {m: np.asarray(r.plan.snapshot_steps).tolist() for m, r in runs.items()},
  }
  markdown = _markdown(splits, config, rows)
  if report._primary() and os.path.exists(partial):
    os.remove(partial)  # results.md (written by main) supersedes it
  _plot(os.path.join(workdir, "trajectory.png"), runs, spe)
  for m, rs in rows.items():
    for row, ps in rs.items():
      if "_matrix" in ps[0] and len(ps[0]["_matrix"]) > 1:
        mat = np.mean([r["_matrix"] for r in ps], 0) if "snapshots" in row else ps[0]["_matrix"]
        report.plot_matrix(os.path.join(workdir, f"disagreement_{m}.png"), mat,
                           title=f"{m}: {row} (test)")
  return out, markdown
