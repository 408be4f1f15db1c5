"""Trajectory ensembles at an equal training budget: SGD, SSE, FGE, SWA, StarSSE.

Every method trains `config.members` independent runs (seeds) at once (member axis =
seed), so every table row is a mean ± std over seeds. Each method runs in
`workdir/<method>/` with its own checkpoints (a rerun resumes); the combined table,
plots and JSON go to `workdir/`. Configs: configs/{snapshot,fge,swa,starsse}.py, which
all build on `make_config` below.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ensembling import averaging, configlib, data, ensemble, members, metrics, models, optim
from ensembling import report, schedules, train
from ensembling import tree as tree_lib

METHODS = ("sgd", "snapshot", "fge", "swa", "starsse")
COLUMNS = ("accuracy", "nll", "ece")


# --------------------------------------------------------------------------- config

def make_config(method: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The shared config; `method` is what `configs/<method>.py` compares with SGD.

  Args (after ':' on the command line): preset (fashion_mnist | digits), arch
  (mlp | cnn), epochs, seeds, methods ('+'-separated, or 'all'), runlocal.
  """
  a = configlib.parse_arg(arg, preset="fashion_mnist", arch="mlp", epochs=0, seeds=3,
                          methods="", limit_train=0, runlocal=False)
  c = configlib.base_config()
  c.experiment = "trajectory"
  chosen = a.methods or f"sgd+{method}"
  c.methods = METHODS if chosen == "all" else tuple(chosen.split("+"))
  bad = sorted(set(c.methods) - set(METHODS))
  if bad:
    raise ValueError(f"Unknown method(s) {bad}; choose from {METHODS}.")
  c.members = a.seeds              # independent trajectory runs, trained in one vmapped step
  c.eval_per_epoch = 2             # test-accuracy points per epoch for the training curves
  c.recalibration_examples = 0     # BN recalibration pass: 0 = the whole training split
  if a.preset == "fashion_mnist":
    c.data = configlib.fashion_mnist_data()
    c.epochs = 8                   # shared 2-core CPU: 8 epochs x 5 methods x 3 seeds ~ 20 min
    c.batch_size = 128
    c.optim.learning_rate = 0.05
    c.optim.weight_decay = 5e-4
  elif a.preset == "digits":
    c.epochs = 24
    c.batch_size = 32
    c.optim.learning_rate = 0.05
    c.optim.weight_decay = 1e-4
  else:
    raise ValueError(f"Unknown preset {a.preset!r}; use fashion_mnist or digits.")
  if a.arch == "mlp":
    c.model = configlib.model_config("mlp", widths=(256, 256), dropout=0.0)
    c.model.batch_norm = True      # SWA's BatchNorm problem needs BatchNorm
  elif a.arch == "cnn":
    c.model = configlib.model_config("cnn")  # thesis CNN: ELU + BN, dropout .2/.3/.4
    c.optim.weight_decay = 1e-4
  else:
    raise ValueError(f"Unknown arch {a.arch!r}; use mlp or cnn.")
  c.optim.schedule = "cosine"      # the SGD baseline: cosine decay over the whole budget
  c.traj = ml_collections.ConfigDict(dict(
      num_cycles=4,                # SSE / StarSSE: M cycles = M snapshots (M | epochs)
      sse_lr=0.1,                  # SSE / StarSSE: α0 at every restart
      pretrain_frac=0.5,           # FGE / SWA: share of the budget before cycling / averaging
      fge_cycle_epochs=1,          # FGE: cycle length c (epochs)
      fge_lr_1=0.02,               # FGE: cycle start / end rate
      fge_lr_2=0.0005,             # FGE: midpoint rate (snapshots)
      swa_lr=0.01,                 # SWA: constant rate while averaging
      swa_anneal_epochs=1,         # SWA: cosine anneal from learning_rate to swa_lr
      swa_every_epochs=0.5,        # SWA: average every half epoch after annealing
      star_reset_optimizer=False,  # StarSSE: fresh optimizer state for every star cycle
      recalibrate_snapshots=True,  # BN models: also report the snapshot ensemble with every
                                   # snapshot's BN statistics recomputed (one pass each)
  ))
  if a.epochs:
    c.epochs = a.epochs
  if a.limit_train:
    c.data.limit_train = a.limit_train
  if a.runlocal:
    c.members, c.epochs = 2, 4
    c.data.limit_train = 512
    c.traj.num_cycles = 2
    c.traj.fge_cycle_epochs = 1
    c.progress = False
  return c


# --------------------------------------------------------------------------- plans

def plan(method: str, config, steps_per_epoch: int) -> dict[str, Any]:
  """Schedule and collection steps of `method` at the budget `config.epochs`."""
  t = config.traj
  lr = float(config.optim.learning_rate)
  total = steps_per_epoch * int(config.epochs)
  if method == "sgd":
    return dict(schedule=schedules.warmup_cosine(lr, total), total=total,
                snapshot_steps=np.array([], np.int64), average_steps=np.array([], np.int64))
  if method in ("snapshot", "starsse"):
    m = int(t.num_cycles)
    return dict(schedule=schedules.cosine_restarts(float(t.sse_lr), total, m), total=total,
                snapshot_steps=schedules.cosine_restarts_steps(total, m),
                average_steps=np.array([], np.int64),
                cycle=schedules.cycle_length(total, m))
  pre = int(round(float(t.pretrain_frac) * int(config.epochs))) * steps_per_epoch
  if not 0 < pre < total:
    raise ValueError(f"traj.pretrain_frac={t.pretrain_frac} leaves no pre-training or no "
                     f"{method} phase in {config.epochs} epochs.")
  if method == "fge":
    c = int(t.fge_cycle_epochs) * steps_per_epoch
    lr1 = float(t.fge_lr_1)
    return dict(
        schedule=schedules.after_pretraining(
            schedules.fge_cyclic(lr1, float(t.fge_lr_2), c), pretrain_steps=pre,
            pretrain_schedule=schedules.warmup_cosine(lr, pre, end_lr=lr1)),
        total=total, snapshot_steps=schedules.offset_steps(schedules.fge_steps(c, total - pre), pre),
        average_steps=np.array([], np.int64))
  if method == "swa":
    anneal = int(t.swa_anneal_epochs) * steps_per_epoch
    every = max(1, int(round(float(t.swa_every_epochs) * steps_per_epoch)))
    start = pre + anneal
    return dict(
        schedule=schedules.after_pretraining(
            schedules.swa_schedule(lr, float(t.swa_lr), anneal_steps=anneal),
            pretrain_steps=pre, pretrain_schedule=lr),
        total=total, snapshot_steps=np.array([], np.int64),
        average_steps=schedules.swa_steps(start - every, total, every=every))
  raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")


# --------------------------------------------------------------------------- training

def _init(config, splits, schedule, num_members: int):
  model = models.make_model(config.model, num_classes=splits.num_classes)
  tx = optim.optimizer_from_config(config.optim, schedule=schedule)
  v = members.init_members(jax.random.key(int(config.seed)), model, splits.x_train[:1], num_members)
  state = members.init_states(v, tx)
  state["opt_state"] = optim.set_hyperparams(
      state["opt_state"], weight_decay=optim.per_member_values(
          config.optim.weight_decay, num_members, name="optim.weight_decay"))
  return model, tx, state


def _fit(config, splits, *, model, tx, state, num_steps, workdir, collector, data_seed,
         eval_every, desc):
  k = tree_lib.num_members(state["step"])
  strategy, step_fn, eval_fn = train.member_fns(config, model, tx, state, eval_x=splits.x_test,
                                                eval_y=splits.y_test)
  batch_fn, spe = train.make_batch_fn(splits.x_train, splits.y_train, seed=data_seed,
                                      batch_size=config.batch_size, num_members=k)
  extra = collector.init(state) if collector else None
  state, extra, history = train.fit(
      state, step_fn=step_fn, batch_fn=batch_fn, num_steps=num_steps,
      key=jax.random.key(data_seed + 1), workdir=workdir, eval_fn=eval_fn, eval_every=eval_every,
      checkpoint_every=config.checkpoint_every_steps or spe,
      on_step=collector.on_step if collector else None, extra=extra,
      progress=config.progress, desc=desc, steps_per_epoch=spe, eval_split="test")
  return state, extra, history, strategy


def _vars(tree):
  return {"params": tree["params"], **({"batch_stats": tree["batch_stats"]}
                                       if jax.tree.leaves(tree.get("batch_stats", {})) else {})}


def _logits(model, variables_K, x, config, strategy):
  return members.predict(model.apply, _vars(variables_K), x, batch_size=config.eval_batch_size,
                         strategy=strategy)


def recalibrate(model, variables, x_train, *, batch_size: int, num_examples: int = 0,
                seed: int = 0, member_dims: int = 1):
  """BN statistics of every model in `variables` recomputed on one pass of `x_train`.

  `variables` ({"params", "batch_stats"}) carry `member_dims` leading member axes (1:
  seeds; 2: seeds x snapshots); all models are recalibrated at once on the same batches.
  """
  n = int(num_examples) or len(x_train)
  lead = jax.tree.leaves(variables["params"])[0].shape[:member_dims]
  flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[member_dims:]), variables)
  batches = (x_train[i:i + batch_size] for i in range(0, (n // batch_size) * batch_size,
                                                      batch_size))
  out = averaging.recompute_batch_stats(model.apply, flat, batches, stacked=True,
                                        key=jax.random.key(int(seed)))
  return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), out)


def _per_seed(logits_SxMxNxC, y):
  """Ensemble metrics (prob. average over M) and mean disagreement, one per seed."""
  out = []
  for lg in logits_SxMxNxC:
    m = metrics.classification_metrics(np.asarray(ensemble.average_probs(lg)), y)
    preds = np.asarray(lg).argmax(-1)
    m["disagreement"] = metrics.mean_disagreement(preds)
    m["_matrix"] = metrics.disagreement_matrix(preds)
    out.append(m)
  return out


def _single(logits_SxNxC, y):
  return [metrics.classification_metrics(p, y)
          for p in ensemble.members_probs(np.asarray(logits_SxNxC))]


def run_method(method: str, config, splits, workdir: str) -> dict[str, Any]:
  """Trains `method` (all seeds at once) and evaluates its rows on the test split."""
  k = int(config.members)
  spe = data.num_steps_per_epoch(len(splits.x_train), config.batch_size)
  p = plan(method, config, spe)
  eval_every = max(1, spe // int(config.eval_per_epoch))
  y = splits.y_test
  model, tx, state = _init(config, splits, p["schedule"], k)
  rows: dict[str, list] = {}
  curves = []
  if method == "starsse":
    # Cycle 1 from scratch; cycles 2..M all start from its end point, in parallel.
    m, cyc = int(config.traj.num_cycles), p["cycle"]
    state, _, hist1, strategy = _fit(config, splits, model=model, tx=tx, state=state,
                                     num_steps=cyc, workdir=os.path.join(workdir, "first"),
                                     collector=None, data_seed=config.seed, eval_every=eval_every,
                                     desc="starsse cycle 1")
    star = averaging.star_restart(state, num_copies=m - 1, tx=tx,
                                  reset_optimizer=bool(config.traj.star_reset_optimizer))
    star, _, hist2, _ = _fit(config, splits, model=model, tx=tx, state=star, num_steps=cyc,
                             workdir=os.path.join(workdir, "star"), collector=None,
                             data_seed=config.seed + 1000, eval_every=eval_every,
                             desc=f"starsse {m - 1} star cycles x {k} seeds")
    star_K = averaging.unflatten_star(_vars(star), m - 1)           # (S, M-1, ...)
    first = jax.tree.map(lambda a: a[:, None], _vars(state))        # (S, 1, ...)
    snaps = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 1), first, star_K)
    curves = [(hist1, 0), (hist2, cyc)]
    snapshot_steps = np.full(m, cyc)
  else:
    collector = averaging.trajectory_collector(snapshot_steps=p["snapshot_steps"],
                                               average_steps=p["average_steps"])
    state, extra, hist, strategy = _fit(config, splits, model=model, tx=tx, state=state,
                                        num_steps=p["total"], workdir=os.path.join(workdir, "run"),
                                        collector=collector, data_seed=config.seed,
                                        eval_every=eval_every, desc=f"{method} x {k} seeds")
    snaps = extra.get("snapshots") if extra else None
    curves = [(hist, 0)]
    snapshot_steps = p["snapshot_steps"]
  end = _logits(model, state, splits.x_test, config, strategy)       # (S, N, C)
  rows["cycle-1 end point (single model, 1/M budget)" if method == "starsse"
       else "end point (single model)"] = _single(end, y)
  if snaps is not None:
    def snapshot_logits(tree):                                       # (S, M, N, C)
      return np.stack([_logits(model, tree_lib.index(tree, s), splits.x_test, config, strategy)
                       for s in range(k)])
    snaps = _vars(snaps)
    lg = snapshot_logits(snaps)
    rows[f"ensemble of {lg.shape[1]} snapshots"] = _per_seed(lg, y)
    rows["mean snapshot (single model)"] = [
        {n: float(np.mean([metrics.classification_metrics(ensemble.members_probs(l[None])[0], y)[n]
                           for l in seed_lg])) for n in COLUMNS} for seed_lg in lg]
    if "batch_stats" in snaps and config.traj.get("recalibrate_snapshots", True):
      # Each snapshot's running statistics lag its weights after a restart (badly so
      # with Keras's momentum 0.99): the same ensemble with every snapshot recalibrated.
      recal_snaps = recalibrate(model, snaps, splits.x_train, batch_size=config.batch_size,
                                num_examples=config.recalibration_examples, seed=config.seed,
                                member_dims=2)
      rows[f"ensemble of {lg.shape[1]} snapshots, each BN recalibrated"] = _per_seed(
          snapshot_logits(recal_snaps), y)
  if method == "sgd":
    rows[f"independent ensemble of the {k} seeds ({k}x budget)"] = _per_seed(end[None], y)
  if method in ("swa", "starsse"):
    if method == "swa":
      avg = extra["average"]
    else:  # a uniform soup of the StarSSE snapshots
      avg = jax.tree.map(lambda a: a.mean(1), snaps)
    has_bn = bool(jax.tree.leaves(avg.get("batch_stats", {})))
    name = "SWA" if method == "swa" else "uniform soup"
    if has_bn:
      recal = recalibrate(model, {"params": avg["params"], "batch_stats": avg["batch_stats"]},
                          splits.x_train, batch_size=config.batch_size,
                          num_examples=config.recalibration_examples, seed=config.seed)
      rows[f"{name} (BN recalibrated)"] = _single(_logits(model, recal, splits.x_test, config,
                                                          strategy), y)
      stale = "last iterate's" if method == "swa" else "cycle-1 end point's"
      rows[f"{name}, no recalibration: {stale} BN stats"] = _single(_logits(
          model, {"params": avg["params"], "batch_stats": state["batch_stats"]}, splits.x_test,
          config, strategy), y)
      rows[f"{name}, no recalibration: averaged BN stats"] = _single(_logits(
          model, avg, splits.x_test, config, strategy), y)
    else:
      rows[name] = _single(_logits(model, avg, splits.x_test, config, strategy), y)
  return {"rows": rows, "plan": p, "history": curves, "snapshot_steps": snapshot_steps,
          "steps_per_epoch": spe}


# --------------------------------------------------------------------------- report

def _summary(per_seed: list[dict]) -> dict[str, Any]:
  out = {}
  for n in COLUMNS + ("disagreement",):
    vals = [r[n] for r in per_seed if n in r]
    if vals:
      out[n] = float(np.mean(vals))
      out[n + "_std"] = float(np.std(vals))
  return out


def _table(results: dict[str, dict]) -> str:
  cols = COLUMNS + ("disagreement",)
  head = "| method | row | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols) + "\n"
  body = ""
  for method, res in results.items():
    for row, per_seed in res["rows"].items():
      s = _summary(per_seed)
      cells = [f"{s[c]:.4f} ± {s[c + '_std']:.4f}" if c in s else "-" for c in cols]
      body += f"| {method} | {row} | " + " | ".join(cells) + " |\n"
  return head + body


def _plot(path, results, config):
  plt = report._pyplot()
  fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  for method, res in results.items():
    spe, p = res["steps_per_epoch"], res["plan"]
    steps = np.arange(p["total"])
    if method == "starsse":
      lrs = np.asarray(jax.vmap(p["schedule"])(jnp.arange(p["cycle"])))
      lrs = np.tile(lrs, 2)[: 2 * p["cycle"]]
      steps = np.arange(len(lrs))
    else:
      lrs = np.asarray(jax.vmap(p["schedule"])(jnp.asarray(steps)))
    line, = ax0.plot(steps / spe, lrs, label=method, lw=1,
                     ls="--" if method == "starsse" else "-")
    snap = np.asarray(res["snapshot_steps"])
    if method == "starsse":
      snap = snap[:1]  # one cycle-1 end point; the star cycles end in parallel at 2 cycles
    if len(snap):
      ax0.plot(snap / spe, np.interp(snap - 1, steps, lrs), "o", color=line.get_color(), ms=4)
    avg = np.asarray(p["average_steps"])
    if len(avg):
      ax0.plot(avg / spe, np.interp(avg - 1, steps, lrs), "x", color=line.get_color(), ms=4)
    for hist, offset in res["history"]:
      recs = [r for r in hist if "test_accuracy" in r]
      xs = sorted({r["step"] for r in recs})
      acc = [np.mean([r["test_accuracy"] for r in recs if r["step"] == s]) for s in xs]
      ax1.plot((np.asarray(xs) + offset) / spe, acc, color=line.get_color(), lw=1,
               label=method if offset == 0 else None)
    for s in snap:
      ax1.axvline(s / spe, color=line.get_color(), alpha=0.25, lw=0.8)
  ax0.set_ylabel("learning rate")
  ax0.set_title("o: snapshots, x: SWA averaging points", fontsize=8)
  ax0.legend(fontsize=7)
  ax0.grid(alpha=0.3)
  ax1.set_ylabel("test accuracy (mean over seeds)")
  ax1.set_xlabel("epoch (StarSSE: cycle 1, then the parallel star cycles)")
  lo = min((np.min([r["test_accuracy"] for h, _ in res["history"] for r in h
                    if "test_accuracy" in r]) for res in results.values()), default=0)
  ax1.set_ylim(max(lo, 0.5 if lo > 0.55 else 0.0), None)
  ax1.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  splits = data.load(config.data, seed=config.seed)
  results = {m: run_method(m, config, splits, os.path.join(workdir, m)) for m in config.methods}
  out = {
      "data": splits.describe(),
      "model": config.model.to_dict(),
      "epochs": int(config.epochs),
      "seeds": int(config.members),
      "methods": {m: {row: {"summary": _summary(ps),
                            "per_seed": [{k: v for k, v in r.items() if k != "_matrix"} for r in ps]}
                      for row, ps in res["rows"].items()} for m, res in results.items()},
      "snapshot_steps": {m: np.asarray(res["snapshot_steps"]).tolist() for m, res in results.items()},
  }
  report.write_json(os.path.join(workdir, "results.json"), out)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"# Trajectory ensembles on {splits.name}: {config.model.name}, "
            f"{config.epochs} epochs per method, mean ± std over {config.members} seeds "
            "(test split)\n\n")
    f.write(_table(results))
    f.write("\n`disagreement`: mean pairwise test disagreement between the ensemble's "
            "members (snapshots, or the independent seeds).\n")
  _plot(os.path.join(workdir, "trajectory.png"), results, config)
  for m, res in results.items():
    for row, ps in res["rows"].items():
      if "_matrix" in ps[0] and len(ps[0]["_matrix"]) > 1:
        mat = np.mean([r["_matrix"] for r in ps], 0) if "snapshots" in row else ps[0]["_matrix"]
        report.plot_matrix(os.path.join(workdir, f"disagreement_{m}.png"), mat,
                           title=f"{m}: {row} (test)")
  return out
