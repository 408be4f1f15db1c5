"""SuperNet (seed 003): K members, frozen, merged by a retrained softmax layer.

One member training run (`configlib.train_members_from_config`) feeds the thesis's Tables
12 (SuperNet vs softmax / majority voting with 1..K members), 5 (loss statistics), 6 (head
init x L2; `supernet.train_head` on `supernet.cache_features`) and 3 (the layer-by-layer
boost, `supernet.layerwise_boost`); plots accuracy_vs_members.png."""

import os
import time

import jax
import numpy as np
import optax

from ensembling import configlib, ensemble, members, metrics, report, supernet, train


def validate(config):
  if config.supernet.head_select not in ("last", "val"):
    raise ValueError("supernet.head_select must be 'last' or 'val', got "
                     f"{config.supernet.head_select!r}.")


def _heads(config, splits, model, res):
  """Tables 12, 5 and 6 from heads trained on the members' cached features."""
  sn, k, y = config.supernet, int(config.members), splits.y_test
  variables = members.variables_of(res.state)
  t0 = time.perf_counter()
  cache = configlib.supernet_cache_from_config(config, splits, model, variables,
                                               strategy=res.strategy)
  out = {"cache_seconds": time.perf_counter() - t0}
  heads = supernet.member_heads(variables["params"])
  head = lambda n, init, l2, scale, best_by: configlib.train_head_from_config(
      config, cache, heads, num_members=n, init=init, l2=l2, scale=scale, best_by=best_by)
  logits, probs = cache["test"]["logits"], supernet.head_probs
  feats = lambda n: supernet.first_members(cache["test"]["features"], num_members=n,
                                           feature_dim=heads[0].shape[1])
  member_acc = [metrics.accuracy(p, y) for p in ensemble.members_probs(logits)]
  rows12, t0 = [], time.perf_counter()
  for n in range(1, k + 1):  # Table 12: the first n members
    h, hist = head(n, sn.head_init, sn.head_l2, sn.head_scale,
                   "val_accuracy" if sn.head_select == "val" else None)
    chosen = max(hist, key=lambda r: (r["val_accuracy"], -r["epoch"])) if (
        sn.head_select == "val") else hist[-1]
    rows12.append({"members": n, "supernet": metrics.classification_metrics(probs(h, feats(n)), y),
                   "softmax_voting": metrics.classification_metrics(
                       np.asarray(ensemble.average_probs(logits[:n])), y),
                   "majority_voting": metrics.accuracy(np.asarray(ensemble.vote(logits[:n])), y),
                   "logit_average": metrics.classification_metrics(np.asarray(
                       jax.nn.softmax(ensemble.average_logits(logits[:n]))), y),
                   "best_member": max(member_acc[:n]), "head_epoch": chosen["epoch"],
                   "head_history": hist})
  out.update(head_seconds_all_k=time.perf_counter() - t0, member_test_accuracy=member_acc,
             table12=rows12)
  stats = [supernet.loss_quantiles(p, y) for p in ensemble.members_probs(logits)]
  out["table5"] = {  # Table 5: the K-member SuperNet is the last head of Table 12
      "members_average": {n: float(np.mean([s[n] for s in stats])) for n in stats[0]},
      "softmax_voting": supernet.loss_quantiles(np.asarray(ensemble.average_probs(logits)), y),
      "supernet": supernet.loss_quantiles(probs(h, feats(k)), y)}
  out["table6"] = []  # Table 6: head init x L2, the best validation epoch's head
  for l2 in sn.grid_l2:
    for init in sn.grid_inits:
      _, hist = head(k, init, l2, sn.grid_scale, "val_accuracy")
      best = max(hist, key=lambda r: r["val_accuracy"])
      out["table6"].append({"init": init, "l2": float(l2), "scale": sn.grid_scale or None,
                            "best_epoch": best["epoch"],
                            "last_val_accuracy": hist[-1]["val_accuracy"],
                            "last_val_nll": hist[-1]["val_nll"],
                            **{m: best[m] for m in ("val_accuracy", "val_nll", "test_accuracy",
                                                    "test_nll")}})
  return out


def _boost(config, splits, model, res):
  """Table 3: every (or the first `boost_members`) member boosted layer by layer."""
  sn = config.supernet
  nb = int(sn.boost_members) or int(config.members)
  t0 = time.perf_counter()
  _, hist = supernet.layerwise_boost(
      jax.tree.map(lambda a: a[:nb], res.state), model=model,
      stages=[(p, int(e)) for p, e in sn.boost_stages],
      make_tx=lambda steps: optax.adam(optax.cosine_decay_schedule(sn.boost_lr, max(steps, 1))),
      x=splits.x_train, y=splits.y_train, batch_size=config.batch_size, seed=config.seed,
      strategy=res.strategy, progress=config.progress,
      eval_fn=lambda s: train.evaluate_members(model, s, splits.x_test, splits.y_test,
                                               strategy=res.strategy,
                                               batch_size=config.eval_batch_size))
  return {"stages": hist, "seconds": time.perf_counter() - t0}


def run(config, workdir: str):
  splits = configlib.load_data(config)
  model, res = configlib.train_members_from_config(config, splits, workdir)
  out = {"data": splits.describe(), "strategy": res.strategy, "member_seconds": res.seconds}
  if config.supernet.heads:
    out.update(_heads(config, splits, model, res))
    t12 = out["table12"]
    report.plot_curve(os.path.join(workdir, "accuracy_vs_members.png"), np.arange(1, len(t12) + 1),
                      {"SuperNet": [r["supernet"]["accuracy"] for r in t12],
                       "softmax voting": [r["softmax_voting"]["accuracy"] for r in t12],
                       "majority voting": [r["majority_voting"] for r in t12],
                       "best member": [r["best_member"] for r in t12]},
                      xlabel="members", ylabel="test accuracy")
  if config.supernet.boost_stages:
    out["table3"] = _boost(config, splits, model, res)
  return out, markdown(out, config)


def markdown(res, config) -> str:
  sn, table = config.supernet, report.cells_table
  md = (f"# SuperNet: {config.members} x {config.model.name} on {res['data']}\n\n"
        f"Members trained in {res['member_seconds']:.0f}s (0 when restored).\n")
  if "table12" in res:
    t12 = res["table12"]
    md += (f"\nFeatures cached in {res['cache_seconds']:.1f}s; {len(t12)} heads "
           f"({sn.head_epochs} epochs each, {sn.head_optimizer} {sn.head_lr:g} {sn.head_schedule}, "
           f"init {sn.head_init}, head seed {sn.head_seed}, feature dropout {sn.head_dropout:g}, "
           f"head of the {'best validation' if sn.head_select == 'val' else 'last'} epoch) in "
           f"{res['head_seconds_all_k']:.1f}s.\n\n## Table 12 analogue (test accuracy)\n\n")
    rows = [["member acc", *res["member_test_accuracy"]]] + [[n, *map(get, t12)] for n, get in [
        ("best member", lambda r: r["best_member"]),
        ("SuperNet", lambda r: r["supernet"]["accuracy"]),
        ("softmax voting", lambda r: r["softmax_voting"]["accuracy"]),
        ("majority voting", lambda r: r["majority_voting"]),
        ("logit averaging", lambda r: r["logit_average"]["accuracy"]),
        ("SuperNet head epoch", lambda r: r["head_epoch"]),
        ("SuperNet NLL", lambda r: r["supernet"]["nll"]),
        ("softmax NLL", lambda r: r["softmax_voting"]["nll"])]]
    md += table(["members", *(r["members"] for r in t12)], rows)
    md += "\n## Table 5 analogue (test split, per-example cross-entropy)\n\n" + table(
        ["", "accuracy", "loss mean", "loss std", "loss 90th", "loss 95th"],
        [[n, *(s[m] for m in ("accuracy", "loss_mean", "loss_std", "loss_p90", "loss_p95"))]
         for n, s in res["table5"].items()])
    md += ("\n## Table 6 analogue (best validation epoch: val acc / val NLL; test acc)\n\n" + table(
        ["init", "L2", "val acc", "val NLL", "test acc", "best epoch"],
        [[g["init"], f"{g['l2']:g}", g["val_accuracy"], g["val_nll"], g["test_accuracy"],
          g["best_epoch"]] for g in res["table6"]]))
  if "table3" in res:
    st = res["table3"]["stages"]
    md += ("\n## Table 3 analogue (test accuracy per member after each boost stage)\n\n" + table(
        ["member", "base", *(f"{s['patterns']} ({s['epochs']} ep)" for s in st[1:])],
        [[m, *(s["accuracy"][m] for s in st)] for m in range(len(st[0]["accuracy"]))])
        + f"\nBoost took {res['table3']['seconds']:.0f}s for all boosted members.\n")
  return md
