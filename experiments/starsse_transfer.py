"""StarSSE in the transfer setting: local deep ensemble vs SSE vs StarSSE from one checkpoint.

Pre-train on the source classes, re-initialise the head for the target classes, then
fine-tune M models per method at an equal budget of M cycles (configs/starsse_transfer.py).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ensembling import configlib, data, members, report, train, trajectory
from ensembling import tree as tree_lib


def run(config, workdir: str):
  splits = configlib.load_data(config)
  t, seed, bs = config.transfer, int(config.seed), int(config.batch_size)
  held = [c for c in range(splits.num_classes) if c not in tuple(t.pretrain_classes)]
  source, target = data.split_classes(splits, held_out=held)
  src_model = configlib.model_from_config(config.model, num_classes=source.num_classes)
  sched = configlib.schedule_from_config(config.optim, total_steps=int(t.pretrain_epochs)
                                         * data.num_steps_per_epoch(len(source.x_train), bs))
  pre = train.train_members(
      src_model, source.x_train, source.y_train, num_members=1, epochs=int(t.pretrain_epochs),
      tx=configlib.optimizer_from_config(config.optim, schedule=sched), batch_size=bs,
      seed=seed, workdir=os.path.join(workdir, "pretrain"), schedule=sched,
      **configlib.fit_kwargs(config, eval_data=(source.x_val, source.y_val)))
  pretrained = tree_lib.index(members.variables_of(pre.state), 0)

  model = configlib.model_from_config(config.model, num_classes=target.num_classes)
  s, m = int(config.members), int(t.num_models)
  fresh = members.init_members(jax.random.key(seed + 1), model, target.x_train[:1], s * m)
  start = tree_lib.transplant(tree_lib.broadcast(pretrained, s * m), fresh, exclude=t.head)
  cyc = int(t.cycle_epochs) * data.num_steps_per_epoch(len(target.x_train), bs)
  lr = float(t.cycle_lr)
  plans = {"local deep ensemble": trajectory.sgd_plan(base_lr=lr, total_steps=cyc),
           "SSE": trajectory.sse_plan(base_lr=lr, total_steps=m * cyc, num_cycles=m),
           "StarSSE": trajectory.starsse_plan(base_lr=lr, total_steps=m * cyc, num_cycles=m)}
  recal = lambda v, dims: trajectory.recalibrate(model, v, target.x_train, batch_size=bs,
                                                 key=jax.random.key(seed), member_dims=dims)
  kw = dict(batch_size=int(config.eval_batch_size))
  rows = {}
  for name, plan in plans.items():
    local = name == "local deep ensemble"
    runs = s * m if local else s
    init = start if local else tree_lib.take(start, np.arange(s) * m)  # one head per run
    res = trajectory.fit(
        model, plan, target.x_train, target.y_train, num_runs=runs, batch_size=bs,
        seed=seed + 2, init_variables=init, workdir=os.path.join(workdir, name.replace(" ", "_")),
        optimizer=lambda sch: configlib.optimizer_from_config(config.optim, schedule=sch),
        eval_data=(target.x_val, target.y_val), strategy=config.members_strategy,
        weight_decay=configlib._plain(config.optim.weight_decay),
        progress=bool(config.progress))
    snaps = (jax.tree.map(lambda a: a.reshape((s, m) + a.shape[1:]), members.variables_of(res.state))
             if local else res.snapshots)
    rows[name] = {**trajectory.snapshot_rows(model, snaps, target.x_test, target.y_test,
                                             recalibrate_fn=recal, **kw),
                  **trajectory.average_rows(model, jax.tree.map(lambda a: a.mean(1), snaps),
                                            target.x_test, target.y_test, name="uniform soup",
                                            recalibrate_fn=recal, **kw)}
  out = {"source": source.describe(), "target": target.describe(),
         "pretrained_val_accuracy": pre.history[-1].get("val_accuracy"),
         "models": m, "cycle_steps": cyc, "seeds": s,
         "methods": {n: {r: {"summary": report.seed_summary(ps),
                             "per_seed": [{k: v for k, v in p.items() if k != "_matrix"}
                                          for p in ps]}
                         for r, ps in rs.items()} for n, rs in rows.items()}}
  markdown = (f"# StarSSE in the transfer setting: {config.model.name}, pre-trained on classes "
              f"{list(t.pretrain_classes)}, fine-tuned on {held}; {m} models per method, "
              f"{t.cycle_epochs} epochs per cycle, mean ± std over {s} seeds (target test "
              "split)\n\n" + report.seed_table(rows)
              + "\nEqual budget: M cycles of fine-tuning per method (the local deep ensemble's "
              "M cycles run in parallel, StarSSE's last M - 1 too, SSE's in a chain).\n")
  return out, markdown
