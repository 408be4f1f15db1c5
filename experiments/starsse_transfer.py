"""StarSSE in the transfer setting: local deep ensemble vs SSE vs StarSSE from one checkpoint.

Images: pre-train on the source classes, re-initialise the head for the target classes.
Text (`config.text`): MiniLM is the pre-trained checkpoint, with a new head for the task.
Then fine-tune M models per method at an equal budget of M cycles
(configs/starsse_transfer.py).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ensembling import (checkpoint, configlib, data, lm_ensembles, members, report, train,
                        trajectory)
from ensembling import tree as tree_lib
from ensembling.models import bert


def _from_source_classes(config, workdir, runs):
  """Pre-trains on the source classes: (model, `runs` start variables, target splits, info)."""
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
  fresh = members.init_members(jax.random.key(seed + 1), model, target.x_train[:1], runs)
  start = tree_lib.transplant(tree_lib.broadcast(pretrained, runs), fresh, exclude=t.head)
  info = {"source": source.describe(), "pretrained_val_accuracy": pre.history[-1].get(
      "val_accuracy"), "task": f"{config.model.name} pre-trained on classes {list(t.pretrain_classes)}, "
      f"fine-tuned on {held}"}
  return model, start, target, info


def _from_text_encoder(config, workdir, runs):
  """The pre-trained text encoder with `runs` new heads: (model, start, token-id splits, info)."""
  x, seed = config.text, int(config.seed)
  raw, c = lm_ensembles.task_splits(x.task, config.data_dir, seed=seed, train=x.train,
                                    stack=x.val, test=x.test)
  folder = bert.encoder_folder(x.path, scratch_dir=workdir, num_layers=int(x.num_layers),
                               sentences=lm_ensembles.task_sentences(x.task, raw["train"][0]),
                               seed=seed)
  cfg = bert.bert_config_from_dir(folder)
  ids = lm_ensembles.task_ids(x.task, bert.load_tokenizer(folder), raw, max_length=x.max_length)
  target = data.Splits(ids["train"], raw["train"][1], ids["stack"], raw["stack"][1],
                       ids["test"], raw["test"][1], c, name=f"{x.task} token ids")
  model, start = lm_ensembles.finetune_init(
      jax.random.key(seed + 1), bert.load_pretrained_params(folder, cfg)["params"], cfg,
      num_layers=int(x.num_layers), num_members=runs, num_classes=c)
  return model, start, target, {"task": f"{x.path} ({x.num_layers} layers) fine-tuned on {x.task}"}


def run(config, workdir: str):
  t, seed, bs = config.transfer, int(config.seed), int(config.batch_size)
  s, m = int(config.members), int(t.num_models)
  text = "text" in config
  model, start, target, info = (_from_text_encoder if text else _from_source_classes)(
      config, workdir, s * m)
  cyc = int(t.cycle_epochs) * data.num_steps_per_epoch(len(target.x_train), bs)
  lr = float(t.cycle_lr)
  plans = {"local deep ensemble": trajectory.sgd_plan(base_lr=lr, total_steps=cyc),
           "SSE": trajectory.sse_plan(base_lr=lr, total_steps=m * cyc, num_cycles=m),
           "StarSSE": trajectory.starsse_plan(base_lr=lr, total_steps=m * cyc, num_cycles=m)}
  recal = None if text else (lambda v, dims: trajectory.recalibrate(
      model, v, target.x_train, batch_size=bs, key=jax.random.key(seed), member_dims=dims))
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
        checkpoint_every=int(config.checkpoint_every_steps),
        weight_decay=configlib._plain(config.optim.weight_decay),
        progress=bool(config.progress))
    snaps = (jax.tree.map(lambda a: a.reshape((s, m) + a.shape[1:]), members.variables_of(res.state))
             if local else res.snapshots)
    # Stored with what they were computed from: a resumed run does not re-evaluate.
    key = checkpoint.checksum({"models": snaps, "test": (target.x_test, target.y_test),
                               "recalibration": None if text else target.x_train,
                               "seed": np.int64(seed), "settings": repr(kw)})
    rows[name] = report.cached(os.path.join(workdir, name.replace(" ", "_"), "rows.json"),
                               key=key, compute=lambda: {
        **trajectory.snapshot_rows(model, snaps, target.x_test, target.y_test,
                                   recalibrate_fn=recal, **kw),
        **trajectory.average_rows(model, jax.tree.map(lambda a: a.mean(1), snaps),
                                  target.x_test, target.y_test, name="uniform soup",
                                  recalibrate_fn=recal, **kw)})
  out = {**info, "target": target.describe(), "models": m, "cycle_steps": cyc, "seeds": s,
         "methods": {n: {r: {"summary": report.seed_summary(ps),
                             "per_seed": [{k: v for k, v in p.items() if k != "_matrix"}
                                          for p in ps]}
                         for r, ps in rs.items()} for n, rs in rows.items()}}
  markdown = (f"# StarSSE in the transfer setting: {info['task']}; {m} models per "
              f"method, {t.cycle_epochs} epochs per cycle, mean ± std over {s} seeds (target "
              "test split)\n\n" + report.seed_table(rows)
              + "\nEqual budget: M cycles of fine-tuning per method (the local deep ensemble's "
              "M cycles run in parallel, StarSSE's last M - 1 too, SSE's in a chain).\n")
  return out, markdown
