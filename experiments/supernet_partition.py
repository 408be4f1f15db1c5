"""Partitioned MLPs (seed 003, Tables 4, 8 and 9): one MLP cut into P sub-networks.

For each P in `config.partition.parts`:
- SuperModel: P independent `MLP(widths / P)` members (the parts of a block-diagonal
  `PartitionedMLP(widths, parts=P)`, see `models.mlp.partitioned_from_members`),
  trained as members and merged by a SuperNet head on cached features;
- whole-trained: the `PartitionedMLP(widths, parts=P)` trained end to end as one
  network (its logits are the mean of the parts' heads) - Table 8's third row;
- classical MLP at equal neurons (P = 1, Table 4) and a classical MLP whose widths are
  scaled to the SuperModel's parameter count (Table 8).
"""

from __future__ import annotations

import copy
import os
import time

import jax
import numpy as np

from ensembling import configlib, data, ensemble, members, metrics, report, supernet, train
from ensembling import tree as tree_lib
from experiments import supernet as sn_exp


def mlp_params(in_dim: int, widths, num_classes: int) -> int:
  """Parameters of a dense `MLP(widths)`."""
  dims = [in_dim, *widths, num_classes]
  return int(sum(a * b + b for a, b in zip(dims[:-1], dims[1:])))


def supermodel_params(in_dim: int, widths, num_classes: int, parts: int) -> int:
  """Parameters of P members of `widths / P` without their heads, plus the SuperNet head."""
  sub = [w // parts for w in widths]
  body = mlp_params(in_dim, sub, num_classes) - (sub[-1] * num_classes + num_classes)
  return parts * body + parts * sub[-1] * num_classes + num_classes


def equal_param_widths(in_dim: int, widths, num_classes: int, target: int) -> tuple[int, ...]:
  """`widths` scaled by one factor so that the dense MLP has about `target` parameters."""
  lo, hi = 0.01, 4.0
  for _ in range(60):
    mid = (lo + hi) / 2
    n = mlp_params(in_dim, [max(1, round(w * mid)) for w in widths], num_classes)
    lo, hi = (mid, hi) if n < target else (lo, mid)
  return tuple(max(1, round(w * hi)) for w in widths)


def _train(config, splits, *, model_config, num_members, dropout, desc):
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model = model_config
    c.model.dropout = dropout
    c.members = num_members
  model, state, strategy, seconds = train.fit_members(c, splits, None, desc=desc,
                                                      eval_every_epoch=False)
  return c, model, state, strategy, seconds


def _metrics(probs, y):
  m = metrics.classification_metrics(probs, y)
  return {"accuracy": m["accuracy"], "nll": m["nll"]}


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  pc = config.partition
  splits = data.load(config.data, seed=config.seed)
  in_dim = int(np.prod(splits.x_train.shape[1:]))
  c_num = splits.num_classes
  widths = tuple(int(w) for w in pc.widths)
  y_test = splits.y_test
  rows = []
  for parts in pc.parts:
    parts = int(parts)
    if any(w % parts for w in widths):
      raise ValueError(f"widths {widths} are not divisible by parts={parts}.")
    sub = tuple(w // parts for w in widths)
    row = {"parts": parts, "sub_widths": sub,
           "params": supermodel_params(in_dim, widths, c_num, parts)}
    # SuperModel: P independent members, merged by a head on cached features.
    mc = copy.deepcopy(config.model)
    with mc.unlocked():
      mc.name, mc.widths = "mlp", sub
    c, model, state, strategy, secs = _train(
        config, splits, model_config=mc, num_members=parts,
        dropout=pc.dropout_single if parts == 1 else pc.dropout_sub,
        desc=f"P={parts} members")
    variables = members.variables_of(state)
    t0 = time.perf_counter()
    cache = supernet.cache_features(
        model.apply, variables, {"train": splits.x_train, "val": splits.x_val,
                                 "test": splits.x_test},
        batch_size=config.eval_batch_size, strategy=strategy)
    for name in cache:
      cache[name]["y"] = splits.split(name)[1]
    heads = supernet.member_heads(variables["params"])
    head, hist = sn_exp.build_head(config, cache, heads, num_members=parts,
                                   init=config.supernet.head_init,
                                   l2=float(config.supernet.head_l2),
                                   scale=config.supernet.head_scale or None)
    head_secs = time.perf_counter() - t0
    logits = cache["test"]["logits"]
    probs_members = ensemble.members_probs(logits)
    row["members"] = {"accuracy": float(np.mean([metrics.accuracy(p, y_test)
                                                 for p in probs_members]))}
    row["softmax_voting"] = _metrics(np.asarray(ensemble.average_probs(logits)), y_test)
    row["supermodel"] = _metrics(sn_exp.head_probs(head, cache["test"]["features"]), y_test)
    row["supermodel_val"] = hist[-1]["val_accuracy"]
    row["seconds"] = {"members": secs, "head_incl_cache": head_secs}
    if parts == 1:
      row["classical"] = {**row["members"], "nll": float(metrics.nll(probs_members[0], y_test)),
                          "widths": widths, "params": mlp_params(in_dim, widths, c_num),
                          "seconds": secs}
    if parts > 1 and pc.whole_trained:
      wc = configlib.model_config("partitioned_mlp", widths=widths, parts=parts)
      _, m2, s2, st2, secs2 = _train(config, splits, model_config=wc,
                                     num_members=1, dropout=pc.dropout_sub,
                                     desc=f"P={parts} whole")
      lg = members.predict(m2.apply, members.variables_of(s2), splits.x_test,
                           batch_size=config.eval_batch_size, strategy=st2)
      row["whole_trained"] = {**_metrics(ensemble.members_probs(lg)[0], y_test),
                              "params": tree_lib.count_params(
                                  tree_lib.index(s2["params"], 0)), "seconds": secs2}
    if parts > 1 and pc.equal_params:
      ew = equal_param_widths(in_dim, widths, c_num, row["params"])
      ec = copy.deepcopy(config.model)
      with ec.unlocked():
        ec.name, ec.widths = "mlp", ew
      _, m3, s3, st3, secs3 = _train(config, splits, model_config=ec, num_members=1,
                                     dropout=pc.dropout_single, desc=f"P={parts} dense eq")
      lg = members.predict(m3.apply, members.variables_of(s3), splits.x_test,
                           batch_size=config.eval_batch_size, strategy=st3)
      row["classical_equal_params"] = {**_metrics(ensemble.members_probs(lg)[0], y_test),
                                       "widths": ew, "params": mlp_params(in_dim, ew, c_num),
                                       "seconds": secs3}
    rows.append(row)
    report.write_json(os.path.join(workdir, "results.json"), {"data": splits.describe(),
                                                              "rows": rows})
  res = {"data": splits.describe(), "rows": rows}
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(res, config))
  return res


def markdown(res, config) -> str:
  rows = res["rows"]
  pc = config.partition
  hdr = "| | " + " | ".join(f"P={r['parts']}" for r in rows) + " |"
  sep = "|---|" + "---|" * len(rows)
  cell = lambda r, key, m: (f"{r[key][m]:.4f}" if key in r else "-")
  out = [f"# Partitioned MLP {tuple(pc.widths)} on {res['data']} (test split)\n",
         hdr, sep,
         "| sub-network widths | " + " | ".join(str(tuple(r["sub_widths"])) for r in rows) + " |",
         "| SuperModel params | " + " | ".join(f"{r['params']:,}" for r in rows) + " |"]
  for name, key, m in [("mean member acc", "members", "accuracy"),
                       ("SuperModel acc", "supermodel", "accuracy"),
                       ("SuperModel NLL", "supermodel", "nll"),
                       ("softmax voting acc", "softmax_voting", "accuracy"),
                       ("whole-trained partitioned acc", "whole_trained", "accuracy"),
                       ("classical equal-params acc", "classical_equal_params", "accuracy"),
                       ("classical equal-params NLL", "classical_equal_params", "nll")]:
    out.append(f"| {name} | " + " | ".join(cell(r, key, m) for r in rows) + " |")
  out.append("| classical equal-params widths | " + " | ".join(
      str(tuple(r["classical_equal_params"]["widths"])) if "classical_equal_params" in r
      else "-" for r in rows) + " |")
  out.append("| SuperModel seconds (members + cache + head) | " + " | ".join(
      f"{r['seconds']['members'] + r['seconds']['head_incl_cache']:.0f}" for r in rows) + " |")
  c1 = rows[0].get("classical")
  if c1:
    out.append(f"\nClassical MLP {tuple(c1['widths'])} (P=1 member, no head retraining): "
               f"acc {c1['accuracy']:.4f}, NLL {c1['nll']:.4f}, {c1['params']:,} params, "
               f"{c1['seconds']:.0f}s.")
  return "\n".join(out) + "\n"
