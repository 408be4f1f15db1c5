"""Partitioned MLPs (seed 003, Tables 4, 8 and 9): one MLP cut into P sub-networks.

For each P in `config.partition.parts`:
- SuperModel: P independent `MLP(widths / P)` members (the parts of a block-diagonal
  `PartitionedMLP(widths, parts=P)`, see `models.mlp.partitioned_from_members`),
  trained as members and merged by a SuperNet head on cached features;
- whole-trained: the `PartitionedMLP(widths, parts=P)` trained end to end as one
  network (its logits are the mean of the parts' heads) - Table 8's third row;
- classical MLP at equal neurons (P = 1, Table 4) and a classical MLP whose widths are
  scaled to the SuperModel's parameter count (Table 8, `supernet.equal_param_widths`).
Training is `configlib.train_members_from_config`, heads `supernet.train_head`; every
training checkpoints into its own folder of the workdir (e.g. `P6_members`), so a rerun
resumes (the seconds reported are then those of the resumed part).
"""

import copy
import os
import time

import jax
import numpy as np

from ensembling import configlib, ensemble, members, metrics, models, report, supernet
from ensembling import tree as tree_lib


def _train(config, splits, workdir, k, desc, **model):
  """K members of `config.model` with `model` attributes overridden: (model, result)."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.members = k
  base = configlib._plain(config.model) if config.model.name == model["name"] else {}
  net = models.make_model(**{**base, **model}, num_classes=splits.num_classes)
  sub = os.path.join(workdir, desc.replace("=", "").replace(" ", "_"))
  return configlib.train_members_from_config(c, splits, sub, desc=desc, eval_every_epoch=False,
                                             model=net)


def _test(model, res, splits, config):
  """Test accuracy and NLL of member 0, and its parameter count."""
  logits = members.predict(model, res.state, splits.x_test, batch_size=config.eval_batch_size,
                           strategy=res.strategy)
  m = metrics.classification_metrics(ensemble.members_probs(logits)[0], splits.y_test)
  return {"accuracy": m["accuracy"], "nll": m["nll"], "seconds": res.seconds,
          "params": tree_lib.count_params(tree_lib.index(res.state["params"], 0))}


def _row(config, splits, workdir, parts, widths, in_dim):
  pc, sn, y = config.partition, config.supernet, splits.y_test
  sub = tuple(w // parts for w in widths)
  row = {"parts": parts, "sub_widths": sub, "params": supernet.supermodel_params(
      in_dim, widths, num_classes=splits.num_classes, parts=parts)}
  # SuperModel: P independent members, merged by a head on cached features.
  model, res = _train(config, splits, workdir, parts, f"P={parts} members", name="mlp", widths=sub,
                      dropout=pc.dropout_single if parts == 1 else pc.dropout_sub)
  variables = members.variables_of(res.state)
  t0 = time.perf_counter()
  cache = supernet.cache_features(model, variables, {n: splits.split(n)[0] for n in (
      "train", "val", "test")}, batch_size=config.eval_batch_size, strategy=res.strategy)
  for name in cache:
    cache[name]["y"] = splits.split(name)[1]
  head, hist = supernet.train_head(
      cache, supernet.member_heads(variables["params"]), num_members=parts, init=sn.head_init,
      tx=configlib.head_optimizer_from_config(sn, num_examples=len(splits.y_train)),
      epochs=int(sn.head_epochs), batch_size=int(sn.head_batch_size),
      seed=config.seed + int(sn.head_seed), key=jax.random.key(config.seed + 7),
      l2=float(sn.head_l2), scale=sn.head_scale or None, dropout=float(sn.head_dropout),
      best_by="val_accuracy" if sn.head_select == "val" else None)
  head_secs = time.perf_counter() - t0
  logits = cache["test"]["logits"]
  probs_K = ensemble.members_probs(logits)
  two = lambda m: {"accuracy": m["accuracy"], "nll": m["nll"]}
  row.update(
      members={"accuracy": float(np.mean([metrics.accuracy(p, y) for p in probs_K]))},
      softmax_voting=two(metrics.classification_metrics(
          np.asarray(ensemble.average_probs(logits)), y)),
      supermodel=two(metrics.classification_metrics(
          supernet.head_probs(head, cache["test"]["features"]), y)),
      supermodel_val=hist[-1]["val_accuracy"],
      seconds={"members": res.seconds, "head_incl_cache": head_secs})
  if parts == 1:
    row["classical"] = {**row["members"], "nll": float(metrics.nll(probs_K[0], y)),
                        "widths": widths, "seconds": res.seconds, "params": supernet.mlp_params(
                            in_dim, widths, num_classes=splits.num_classes)}
  if parts > 1 and pc.whole_trained:
    row["whole_trained"] = _test(*_train(config, splits, workdir, 1, f"P={parts} whole",
                                         name="partitioned_mlp", widths=widths, parts=parts,
                                         dropout=pc.dropout_sub), splits, config)
  if parts > 1 and pc.equal_params:
    ew = supernet.equal_param_widths(in_dim, widths, num_classes=splits.num_classes,
                                     target=row["params"])
    row["classical_equal_params"] = {**_test(*_train(
        config, splits, workdir, 1, f"P={parts} dense eq", name="mlp", widths=ew,
        dropout=pc.dropout_single), splits, config), "widths": ew}
  return row


def validate(config):
  widths = tuple(int(w) for w in config.partition.widths)
  for parts in config.partition.parts:
    if any(w % int(parts) for w in widths):
      raise ValueError(f"partition.widths {widths} are not divisible by parts={parts}.")


def run(config, workdir: str):
  validate(config)
  splits = configlib.load_data(config)
  widths = tuple(int(w) for w in config.partition.widths)
  in_dim = int(np.prod(splits.x_train.shape[1:]))
  rows = [_row(config, splits, workdir, int(p), widths, in_dim) for p in config.partition.parts]
  res = {"data": splits.describe(), "rows": rows}
  return res, markdown(res, config)


def markdown(res, config) -> str:
  rows = res["rows"]
  get = lambda key, m: [r[key][m] if key in r else None for r in rows]
  body = [["sub-network widths", *(str(tuple(r["sub_widths"])) for r in rows)],
          ["SuperModel params", *(f"{r['params']:,}" for r in rows)]]
  body += [[name, *get(key, m)] for name, key, m in [
      ("mean member acc", "members", "accuracy"), ("SuperModel acc", "supermodel", "accuracy"),
      ("SuperModel NLL", "supermodel", "nll"), ("softmax voting acc", "softmax_voting", "accuracy"),
      ("whole-trained partitioned acc", "whole_trained", "accuracy"),
      ("classical equal-params acc", "classical_equal_params", "accuracy"),
      ("classical equal-params NLL", "classical_equal_params", "nll")]]
  body += [["classical equal-params widths", *(None if w is None else str(tuple(w))
                                               for w in get("classical_equal_params", "widths"))],
           ["SuperModel seconds (members + cache + head)",
            *(f"{r['seconds']['members'] + r['seconds']['head_incl_cache']:.0f}" for r in rows)]]
  md = (f"# Partitioned MLP {tuple(config.partition.widths)} on {res['data']} (test split)\n\n"
        + report.cells_table(["", *(f"P={r['parts']}" for r in rows)], body))
  c1 = rows[0].get("classical")
  if c1:
    md += (f"\nClassical MLP {tuple(c1['widths'])} (P=1 member, no head retraining): acc "
           f"{c1['accuracy']:.4f}, NLL {c1['nll']:.4f}, {c1['params']:,} params, "
           f"{c1['seconds']:.0f}s.\n")
  return md
