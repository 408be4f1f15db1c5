"""Shared-head alignment (seed 000): train ArcFace models, align them to the best one's
frozen head, and compare naive vs aligned averaging of their embeddings.

Training is `train.train_members` (one member per model: shapes differ), alignment and
evaluation `shared_head.align_group`; this file maps the config onto them."""

from __future__ import annotations

import functools
import os
import time

import numpy as np

from ensembling import configlib, data, losses, members, models, shared_head, train
from ensembling import tree as tree_lib
from ensembling.data import resize


def _train(config, spec, x, y, eval_data, *, seed: int, workdir: str):
  """One ArcFace model trained as `config` says: (model, variables)."""
  model = models.make_arcface_model(**spec.model.to_dict(), num_classes=int(y.max()) + 1,
                                    embedding_dim=config.arcface.embedding_dim,
                                    scale=config.arcface.scale)
  spe = data.num_steps_per_epoch(len(x), int(config.batch_size))
  schedule = configlib.schedule_from_config(config.optim, total_steps=spe * int(config.epochs))
  loss_fn = functools.partial(losses.arcface_loss_from_logits, scale=config.arcface.scale,
                              margin=config.arcface.margin)
  res = train.train_members(
      model, x, y, num_members=1, tx=configlib.optimizer_from_config(config.optim,
                                                                     schedule=schedule),
      epochs=int(config.epochs), batch_size=int(config.batch_size), seed=seed,
      loss_fn=loss_fn, workdir=workdir, desc=spec.name, schedule=schedule,
      **configlib.fit_kwargs(config, eval_data=eval_data))
  return model, tree_lib.index(members.variables_of(res.state), 0)


def run_group(config, name: str, group, splits, workdir: str, retrieval=None) -> dict:
  """Trains, aligns and evaluates one group of models.

  Retrieval: queries = test images, index = training images of `retrieval`: `splits`
  (closed set, plus Acc@1/Acc@5 through the heads) or the held-out classes of
  `data.split_classes` (open set: classes no model saw; mP@k only).
  """
  if config.align.method not in shared_head.ALIGN_METHODS:
    raise ValueError(f"Unknown align.method {config.align.method!r}; choose one of "
                     f"{shared_head.ALIGN_METHODS}.")
  select_on = config.align.get("select_on", "train_classes")
  if select_on not in ("train_classes", "retrieval"):
    raise ValueError(f"Unknown align.select_on {select_on!r}; use train_classes or retrieval.")
  open_set = retrieval is not None
  ret = retrieval if open_set else splits
  # "retrieval": the shared head is chosen on the retrieval classes' validation split
  # (the held-out ones in the open set) against the retrieval index, never on test.
  on_retrieval = open_set and select_on == "retrieval"
  n_index = min(int(config.eval.index_size) or len(ret.x_train), len(ret.x_train))
  n_test = min(int(config.eval.get("test_size", 0)) or len(ret.x_test), len(ret.x_test))
  labels = {"train": splits.y_train, "val": splits.y_val, "fit": splits.y_train[:n_index],
            "index": ret.y_train[:n_index], "test": ret.y_test[:n_test], "rval": ret.y_val}
  trained, inputs, t0 = [], [], time.time()
  for i, spec in enumerate(group.models):
    r = spec.resolution
    xs = {"train": resize(splits.x_train, r), "val": resize(splits.x_val, r),
          "test": resize(ret.x_test[:n_test], r)}
    xs["fit"] = xs["train"][:n_index]  # the closed-form maps' data
    xs["index"] = resize(ret.x_train[:n_index], r) if open_set else xs["fit"]
    if on_retrieval:
      xs["rval"] = resize(ret.x_val, r)
    inputs.append(xs)
    trained.append(_train(config, spec, xs["train"], splits.y_train, (xs["val"], splits.y_val),
                          seed=config.seed + 100 * i,
                          workdir=os.path.join(config.models_dir or workdir, name, spec.name)))
  t_train = time.time() - t0
  res = shared_head.align_group(
      trained, inputs, labels=labels, names=[s.name for s in group.models], mode=group.mode,
      method=config.align.method, adapter_input=config.align.adapter_input,
      k=int(config.eval.k), classify_with_heads=not open_set,
      select=("rval", "index") if on_retrieval else ("val", "fit"),
      optimizer=config.align.optimizer, epochs=int(config.align.epochs),
      learning_rate=(config.align.adapter_lr if group.mode == "adapter"
                     else config.align.finetune_lr),
      batch_size=int(config.align.batch_size), scale=config.arcface.scale,
      margin=config.arcface.margin, seed=int(config.seed))
  return {"group": name, "mode": group.mode, "adapter_input": config.align.adapter_input,
          "method": config.align.method, "open_set": open_set,
          "models": [s.name for s in group.models], **res,
          "selected_on": "retrieval" if on_retrieval else "train_classes",
          "train_seconds": t_train, "index_size": n_index, "num_queries": n_test}


def table(res: dict, k: int) -> str:
  names, mp = res["models"] + ["mean"], f"mP@{k}"
  lines = ["| | metric | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  for kind in ("traditional", "ours"):
    for metric in ("Acc@1", "Acc@5", mp):
      if metric in res["rows"][kind]["mean"]:  # open set: no head applies
        cells = [f"{res['rows'][kind][n][metric]:.4f}" for n in names]
        lines.append(f"| {kind} | {metric} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _group_markdown(res: dict, k: int, held_out) -> str:
  mp = f"mP@{k}"
  trad = res["rows"]["traditional"]
  best, top = trad[res["best"]], max(res["models"], key=lambda n: trad[n][mp])
  how = res["mode"] + (f" from {res['adapter_input']}" if res["mode"] == "adapter" else "")
  if res["method"] != "arcface":
    how = f"closed-form {res['method']} map of the embeddings, no labels"
  where = (f"held-out classes {list(held_out)} (open set: no model was trained on them)"
           if held_out else "all classes")
  sp = res["head_span"]
  out = [f"\n## {res['group']} ({how}); shared head = {res['best']}\n\n",
         f"Queries: {res['num_queries']} test images; index: {res['index_size']} training "
         f"images; {where}. 'mean' = average of the L2-normalised embeddings"
         + ("" if held_out else ", classified by the shared head")
         + " (traditional: unaligned embeddings).\n\n", table(res, k),
         f"\nShared-head model ({res['best']}): {mp} {best[mp]:.4f}"
         + (f", Acc@1 {best['Acc@1']:.4f}" if "Acc@1" in best else "")
         + f". Best single model on test {mp}: {top} {trad[top][mp]:.4f}. "]
  if res["own_heads_prob_average"] is not None:
    out.append(f"Prob. average of the models' own heads: Acc@1 "
               f"{res['own_heads_prob_average']['Acc@1']:.4f}. ")
  outside = [s[f"{mp} outside"] for s in sp]
  out.append(f"Queries' own embeddings vs the span of their own head's centres: share of the "
             f"squared norm inside {[round(s['fraction'], 3) for s in sp]}; {mp} with the "
             f"part inside {[round(s[f'{mp} inside'], 4) for s in sp]}, outside "
             f"{[None if o is None else round(o, 4) for o in outside]}. ")
  out.append(f"Validation {mp} (shared head chosen on {res['selected_on']}): "
             f"{np.round(res['val_mP'], 4).tolist()}. Frozen leaves bit-identical after "
             f"alignment: {res['frozen_leaves_unchanged']}. Train {res['train_seconds']:.0f}s, "
             f"align {res['align_seconds']:.0f}s.\n")
  return "".join(out)


def run(config, workdir: str):
  splits = configlib.load_data(config)
  held_out = tuple(config.eval.get("held_out_classes", ()))
  retrieval = None
  if held_out:  # open set: train on the other classes, retrieve the held-out ones
    splits, retrieval = data.split_classes(splits, held_out=held_out)
  results = {"data": splits.describe(), "groups": {}}
  if retrieval is not None:
    results["retrieval_data"] = retrieval.describe()
  md = [f"# Shared-head alignment of ArcFace models on {splits.name} (test split)\n"]
  for name, group in config.groups.items():
    results["groups"][name] = run_group(config, name, group, splits, workdir, retrieval)
    md.append(_group_markdown(results["groups"][name], int(config.eval.k), held_out))
  return results, "".join(md)
