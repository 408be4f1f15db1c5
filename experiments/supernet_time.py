"""Wall-clock time to a validation accuracy (seed 003, Tables 10 and 11).

Two arms, trained epoch by epoch with a constant learning rate on this machine:
- single: one network (`config.timing.single`);
- SuperNet: `config.timing.sub_members` sub-networks (`config.timing.sub`) trained at
  once (vmapped); after every epoch the SuperNet is built from them (features cached
  for train and validation, head trained for `config.supernet.head_epochs` epochs).

Reported time = training seconds (evaluation excluded, the first step's compilation
excluded) and, for the SuperNet, plus the seconds of the build whose head first
reaches the target (caching + head training, compiled beforehand by an untimed
warm-up build; all builds are also summed separately).
"""

from __future__ import annotations

import copy
import os
import time

import jax
import numpy as np

from ensembling import data, ensemble, members, metrics, report, supernet, train
from experiments import supernet as sn_exp


def _arm(config, splits, *, model_config, num_members, seed_offset):
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model = model_config
    c.members = num_members
    c.seed = config.seed + seed_offset
  batch_fn, spe = train.make_batch_fn(splits.x_train, splits.y_train, seed=c.seed,
                                      batch_size=c.batch_size, num_members=num_members)
  model, tx, _, state = train.build_state(c, splits, total_steps=spe * int(config.timing.max_epochs))
  strategy, step_fn, _ = train.member_fns(c, model, tx, state, eval_x=splits.x_val,
                                          eval_y=splits.y_val)
  keys = members.member_keys(jax.random.key(c.seed + 1), num_members)
  return model, state, strategy, step_fn, batch_fn, spe, keys


def _train_epoch(state, step_fn, batch_fn, keys, spe, epoch):
  """One epoch; returns (state, seconds, compile_seconds) with compilation split off."""
  compile_s = 0.0
  t0 = time.perf_counter()
  for s in range(epoch * spe, (epoch + 1) * spe):
    state, _ = step_fn(state, batch_fn(s), members.step_keys(keys, s))
    if s == 0:
      jax.block_until_ready(state)
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
  jax.block_until_ready(state)
  return state, time.perf_counter() - t0, compile_s


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  tc = config.timing
  splits = data.load(config.data, seed=config.seed)
  stop_at = max(tc.targets)
  res = {"data": splits.describe(), "targets": list(tc.targets)}

  # Single network.
  model, state, strategy, step_fn, batch_fn, spe, keys = _arm(
      config, splits, model_config=tc.single, num_members=1, seed_offset=0)
  curve, clock = [], 0.0
  for epoch in range(int(tc.max_epochs)):
    state, secs, comp = _train_epoch(state, step_fn, batch_fn, keys, spe, epoch)
    clock += secs
    ev = train.evaluate_members(model.apply, state, splits.x_val, splits.y_val,
                                strategy=strategy, batch_size=config.eval_batch_size)
    curve.append({"epoch": epoch + 1, "seconds": clock, "val_accuracy": float(ev["accuracy"][0]),
                  "val_nll": float(ev["nll"][0]), "compile_seconds": comp})
    if curve[-1]["val_accuracy"] >= stop_at:
      break
  res["single"] = {"curve": curve, "params": int(sum(np.size(x) for x in
                                                     jax.tree.leaves(state["params"])))}

  # SuperNet of sub-networks.
  k = int(tc.sub_members)
  model, state, strategy, step_fn, batch_fn, spe, keys = _arm(
      config, splits, model_config=tc.sub, num_members=k, seed_offset=100)
  def build_supernet(state):
    variables = members.variables_of(state)
    cache = supernet.cache_features(model.apply, variables,
                                    {"train": splits.x_train, "val": splits.x_val},
                                    batch_size=config.eval_batch_size, strategy=strategy)
    kern, bias = supernet.member_heads(variables["params"])
    sc = config.supernet
    head0 = supernet.init_head(jax.random.key(0), num_features=cache["train"]["features"].shape[1],
                               num_classes=splits.num_classes, init=sc.head_init,
                               kernels_KxDxC=kern, biases_KxC=bias,
                               scale=(sc.head_scale or None) if sc.head_init == "copy_scaled"
                               else None)
    head, _ = supernet.fit_head(head0, cache["train"]["features"], splits.y_train,
                                tx=sn_exp.head_optimizer(sc, len(splits.y_train)),
                                epochs=int(sc.head_epochs),
                                batch_size=int(sc.head_batch_size), seed=config.seed)
    return cache, head

  t0 = time.perf_counter()
  build_supernet(state)  # untimed warm-up: compiles the feature and head functions
  res["supernet_build_compile_seconds"] = time.perf_counter() - t0
  curve, clock, builds = [], 0.0, 0.0
  for epoch in range(int(tc.max_epochs)):
    state, secs, comp = _train_epoch(state, step_fn, batch_fn, keys, spe, epoch)
    clock += secs
    t0 = time.perf_counter()
    cache, head = build_supernet(state)
    build = time.perf_counter() - t0
    builds += build
    probs = sn_exp.head_probs(head, cache["val"]["features"])
    member_acc = [metrics.accuracy(p, splits.y_val)
                  for p in ensemble.members_probs(cache["val"]["logits"])]
    curve.append({"epoch": epoch + 1, "member_seconds": clock, "build_seconds": build,
                  "seconds": clock + build, "seconds_all_builds": clock + builds,
                  "val_accuracy": metrics.accuracy(probs, splits.y_val),
                  "val_nll": metrics.nll(probs, splits.y_val),
                  "softmax_voting_val_accuracy": metrics.accuracy(
                      np.asarray(ensemble.average_probs(cache["val"]["logits"])), splits.y_val),
                  "member_val_accuracy": member_acc, "compile_seconds": comp})
    if curve[-1]["val_accuracy"] >= stop_at:
      break
  res["supernet"] = {"curve": curve, "sub_members": k}

  for arm in ("single", "supernet"):
    res[arm]["time_to"] = {}
    for t in tc.targets:
      hit = next((r for r in res[arm]["curve"] if r["val_accuracy"] >= t), None)
      res[arm]["time_to"][str(t)] = None if hit is None else {
          "epoch": hit["epoch"], "seconds": hit["seconds"], "val_accuracy": hit["val_accuracy"],
          "val_nll": hit["val_nll"]}
  report.write_json(os.path.join(workdir, "results.json"), res)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(res, config))
  report.plot_curve(os.path.join(workdir, "val_accuracy_vs_time.png"),
                    [r["seconds"] for r in res["single"]["curve"]],
                    {"single": [r["val_accuracy"] for r in res["single"]["curve"]]},
                    xlabel="seconds", ylabel="val accuracy")
  return res


def markdown(res, config) -> str:
  tc = config.timing
  out = [f"# Time to validation accuracy on {res['data']}\n",
         f"single: {tuple(tc.single.widths)} ({res['single']['params']:,} params); SuperNet: "
         f"{res['supernet']['sub_members']} x {tuple(tc.sub.widths)}, head "
         f"{config.supernet.head_epochs} epochs. Seconds exclude evaluation and the first "
         "step's compilation; this is a shared CPU, so they are noisy.\n",
         "| target | single: epoch | single: seconds | SuperNet: epoch | SuperNet: seconds |",
         "|---|---|---|---|---|"]
  for t in tc.targets:
    cells = []
    for arm in ("single", "supernet"):
      h = res[arm]["time_to"][str(t)]
      cells += ["-", "not reached"] if h is None else [str(h["epoch"]), f"{h['seconds']:.0f}"]
    out.append(f"| {t} | " + " | ".join(cells) + " |")
  out += ["\n| epoch | single val acc | single s | SuperNet val acc | softmax voting val acc | "
          "SuperNet s (members + this build) |", "|---|---|---|---|---|---|"]
  n = max(len(res["single"]["curve"]), len(res["supernet"]["curve"]))
  for i in range(n):
    s = res["single"]["curve"][i] if i < len(res["single"]["curve"]) else None
    p = res["supernet"]["curve"][i] if i < len(res["supernet"]["curve"]) else None
    out.append(f"| {i + 1} | " + (f"{s['val_accuracy']:.4f} | {s['seconds']:.0f}" if s else "- | -")
               + " | " + (f"{p['val_accuracy']:.4f} | {p['softmax_voting_val_accuracy']:.4f} | "
                          f"{p['seconds']:.0f}" if p else "- | - | -") + " |")
  return "\n".join(out) + "\n"
