"""SuperNet (seed 003): K members, frozen, merged by a retrained softmax layer.

One member training run feeds the thesis's Tables 12 (SuperNet vs softmax / majority
voting with 1..K members), 5 (loss statistics), 6 (head initialisation x L2) and 3
(layer-by-layer boost of each member). All head training runs on cached features.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np
import optax

from ensembling import data, ensemble, members, metrics, report, supernet, train


def head_optimizer(sn, num_examples: int) -> optax.GradientTransformation:
  """The head's optimizer from `config.supernet` (fresh state per head, as in the thesis).

  `head_schedule="cosine"` decays the rate to 0 over the head's `head_epochs` passes over
  `num_examples` cached examples; "constant" keeps it.
  """
  steps = int(sn.head_epochs) * (int(num_examples) // int(sn.head_batch_size))
  return _head_tx(sn.head_optimizer, float(sn.head_lr), sn.head_schedule, steps)


@functools.lru_cache(maxsize=8)
def _head_tx(name: str, lr: float, schedule: str, steps: int) -> optax.GradientTransformation:
  # Cached so that every head reuses one compiled epoch function per feature width.
  if schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, max(steps, 1))
  elif schedule != "constant":
    raise ValueError(f"Unknown supernet.head_schedule {schedule!r}; use constant or cosine.")
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  raise ValueError(f"Unknown supernet.head_optimizer {name!r}; use adam or sgd.")


def build_head(config, cache, heads, *, num_members: int, init: str, l2: float,
               scale=None, key=None, best_by="config"):
  """Initialises and trains a head over the first `num_members` members' features.

  `best_by="config"` follows `config.supernet.head_select` (last | val); otherwise it is
  passed to `supernet.fit_head` (None: the last epoch's head).

  Returns (head, history).
  """
  sn = config.supernet
  if best_by == "config":
    if sn.head_select not in ("last", "val"):
      raise ValueError(f"supernet.head_select must be 'last' or 'val', got {sn.head_select!r}.")
    best_by = "val_accuracy" if sn.head_select == "val" else None
  kern, bias = heads
  d = kern.shape[1]
  sel = lambda f: supernet.first_members(f, num_members=num_members, feature_dim=d)
  head0 = supernet.init_head(
      jax.random.key(config.seed + 7) if key is None else key,
      num_features=num_members * d, num_classes=kern.shape[2], init=init,
      kernels_KxDxC=kern[:num_members], biases_KxC=bias[:num_members],
      scale=scale if init == "copy_scaled" else None)
  return supernet.fit_head(
      head0, sel(cache["train"]["features"]), cache["train"]["y"],
      tx=head_optimizer(sn, len(cache["train"]["y"])), epochs=int(sn.head_epochs),
      batch_size=int(sn.head_batch_size), seed=config.seed + int(sn.head_seed), l2=l2,
      dropout=float(sn.head_dropout),
      eval_sets={"val": (sel(cache["val"]["features"]), cache["val"]["y"]),
                 "test": (sel(cache["test"]["features"]), cache["test"]["y"])},
      best_by=best_by)


def head_probs(head, features):
  return np.asarray(jax.nn.softmax(supernet.apply_head(head, features), -1))


def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  sn = config.supernet
  splits = data.load(config.data, seed=config.seed)
  k = int(config.members)
  model, state, strategy, member_seconds = train.fit_members(config, splits, workdir)
  variables = members.variables_of(state)

  res = {"data": splits.describe(), "strategy": strategy, "member_seconds": member_seconds}
  if sn.heads:
    t0 = time.perf_counter()
    cache = supernet.cache_features(
        model.apply, variables, {"train": splits.x_train, "val": splits.x_val,
                                 "test": splits.x_test},
        batch_size=config.eval_batch_size, strategy=strategy)
    res["cache_seconds"] = time.perf_counter() - t0
    for name in cache:
      cache[name]["y"] = splits.split(name)[1]
    heads = supernet.member_heads(variables["params"])
    y_test = splits.y_test
    logits_test = cache["test"]["logits"]
    # Table 12: SuperNet vs softmax voting vs majority voting with the first k members.
    main_init, main_l2, main_scale = sn.head_init, float(sn.head_l2), sn.head_scale or None
    member_acc = [metrics.accuracy(p, y_test) for p in ensemble.members_probs(logits_test)]
    rows12 = []
    t_heads = time.perf_counter()
    for n in range(1, k + 1):
      head, hist = build_head(config, cache, heads, num_members=n, init=main_init, l2=main_l2,
                              scale=main_scale)
      d = heads[0].shape[1]
      f_test = supernet.first_members(cache["test"]["features"], num_members=n, feature_dim=d)
      sup = metrics.classification_metrics(head_probs(head, f_test), y_test)
      soft = metrics.classification_metrics(
          np.asarray(ensemble.average_probs(logits_test[:n])), y_test)
      vote = metrics.accuracy(np.asarray(ensemble.vote(logits_test[:n])), y_test)
      head_k = head  # after the loop: the head over all K members
      chosen = (max(hist, key=lambda r: (r["val_accuracy"], -r["epoch"])) if sn.head_select == "val"
                else hist[-1])["epoch"]
      rows12.append({"members": n, "supernet": sup, "softmax_voting": soft,
                     "majority_voting": vote, "best_member": max(member_acc[:n]),
                     "head_epoch": chosen, "head_history": hist})
    res["head_seconds_all_k"] = time.perf_counter() - t_heads
    res["member_test_accuracy"] = member_acc
    res["table12"] = rows12

    # Table 5: loss statistics of the members and of the K-member SuperNet (test split).
    member_stats = [supernet.loss_quantiles(p, y_test)
                    for p in ensemble.members_probs(logits_test)]
    res["table5"] = {
        "members_average": {n: float(np.mean([s[n] for s in member_stats]))
                            for n in member_stats[0]},
        "softmax_voting": supernet.loss_quantiles(
            np.asarray(ensemble.average_probs(logits_test)), y_test),
        "supernet": supernet.loss_quantiles(head_probs(head_k, cache["test"]["features"]), y_test),
    }

    # Table 6: head initialisation x L2 (best validation epoch, as the thesis reports).
    grid = []
    for l2 in sn.grid_l2:
      for init in sn.grid_inits:
        scale = sn.grid_scale or None
        head, hist = build_head(config, cache, heads, num_members=k, init=init, l2=float(l2),
                                scale=scale, best_by="val_accuracy")
        best = max(hist, key=lambda r: r["val_accuracy"])
        grid.append({"init": init, "l2": float(l2), "scale": scale, "best_epoch": best["epoch"],
                     "val_accuracy": best["val_accuracy"], "val_nll": best["val_nll"],
                     "test_accuracy": best["test_accuracy"], "test_nll": best["test_nll"],
                     "last_val_accuracy": hist[-1]["val_accuracy"],
                     "last_val_nll": hist[-1]["val_nll"]})
    res["table6"] = grid

  # Table 3: layer-by-layer boost of every member, from the top.
  if sn.boost_stages:
    stages = [(p, int(e)) for p, e in sn.boost_stages]
    make_tx = lambda steps: optax.adam(optax.cosine_decay_schedule(sn.boost_lr, max(steps, 1)))
    eval_fn = lambda s: train.evaluate_members(model.apply, s, splits.x_test, splits.y_test,
                                               strategy=strategy,
                                               batch_size=config.eval_batch_size)
    boost_state = state
    nb = int(sn.boost_members) or k
    if nb < k:  # boost only the first members (the CPU budget), as Table 3's rows
      boost_state = jax.tree.map(lambda a: a[:nb], state)
    t0 = time.perf_counter()
    _, boost_hist = supernet.layerwise_boost(
        boost_state, apply_fn=model.apply, stages=stages, make_tx=make_tx, x=splits.x_train,
        y=splits.y_train, batch_size=config.batch_size, seed=config.seed, strategy=strategy,
        eval_fn=eval_fn, progress=config.progress)
    res["table3"] = {"stages": boost_hist, "seconds": time.perf_counter() - t0}

  report.write_json(os.path.join(workdir, "results.json"), res)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(res, config))
  if sn.heads:
    report.plot_curve(os.path.join(workdir, "accuracy_vs_members.png"),
                      np.arange(1, k + 1),
                      {"SuperNet": [r["supernet"]["accuracy"] for r in rows12],
                       "softmax voting": [r["softmax_voting"]["accuracy"] for r in rows12],
                       "majority voting": [r["majority_voting"] for r in rows12],
                       "best member": [r["best_member"] for r in rows12]},
                      xlabel="members", ylabel="test accuracy")
  return res


def markdown(res, config) -> str:
  out = [f"# SuperNet: {config.members} x {config.model.name} on {res['data']}\n",
         f"Members trained in {res['member_seconds']:.0f}s (0 when restored).\n"]
  if "table12" in res:
    out += _markdown_heads(res, config)
  if "table3" in res:
    st = res["table3"]["stages"]
    out += ["\n## Table 3 analogue (test accuracy per member after each boost stage)\n",
            "| member | base | " + " | ".join(f"{s['patterns']} ({s['epochs']} ep)" for s in st[1:])
            + " |", "|---|" + "---|" * len(st)]
    for m in range(len(st[0]["accuracy"])):
      out.append(f"| {m} | " + " | ".join(f"{s['accuracy'][m]:.4f}" for s in st) + " |")
    out.append(f"\nBoost took {res['table3']['seconds']:.0f}s for all boosted members.")
  return "\n".join(out) + "\n"


def _markdown_heads(res, config) -> list[str]:
  k = len(res["table12"])
  out = [f"Features cached in {res['cache_seconds']:.1f}s; {k} heads "
         f"({config.supernet.head_epochs} epochs each, {config.supernet.head_optimizer} "
         f"{config.supernet.head_lr:g} {config.supernet.head_schedule}, init "
         f"{config.supernet.head_init}, head seed {config.supernet.head_seed}, "
         f"feature dropout {config.supernet.head_dropout:g}, head of the "
         f"{'best validation' if config.supernet.head_select == 'val' else 'last'} epoch) in "
         f"{res['head_seconds_all_k']:.1f}s.\n",
         "\n## Table 12 analogue (test accuracy)\n",
         "| members | " + " | ".join(str(r["members"]) for r in res["table12"]) + " |",
         "|---|" + "---|" * k]
  out.append("| member acc | " + " | ".join(f"{a:.4f}" for a in res["member_test_accuracy"]) + " |")
  for name, get in [("best member", lambda r: r["best_member"]),
                    ("SuperNet", lambda r: r["supernet"]["accuracy"]),
                    ("softmax voting", lambda r: r["softmax_voting"]["accuracy"]),
                    ("majority voting", lambda r: r["majority_voting"]),
                    ("SuperNet head epoch", lambda r: r["head_epoch"]),
                    ("SuperNet NLL", lambda r: r["supernet"]["nll"]),
                    ("softmax NLL", lambda r: r["softmax_voting"]["nll"])]:
    cells = [get(r) for r in res["table12"]]
    out.append(f"| {name} | " + " | ".join(str(v) if isinstance(v, int) else f"{v:.4f}"
                                          for v in cells) + " |")
  out += ["\n## Table 5 analogue (test split, per-example cross-entropy)\n",
          "| | accuracy | loss mean | loss std | loss 90th | loss 95th |", "|---|---|---|---|---|---|"]
  for name, s in res["table5"].items():
    out.append(f"| {name} | {s['accuracy']:.4f} | {s['loss_mean']:.4f} | {s['loss_std']:.4f} "
               f"| {s['loss_p90']:.4f} | {s['loss_p95']:.4f} |")
  out += ["\n## Table 6 analogue (best validation epoch: val acc / val NLL; test acc)\n",
          "| init | L2 | val acc | val NLL | test acc | best epoch |", "|---|---|---|---|---|---|"]
  for g in res["table6"]:
    out.append(f"| {g['init']} | {g['l2']:g} | {g['val_accuracy']:.4f} | {g['val_nll']:.4f} | "
               f"{g['test_accuracy']:.4f} | {g['best_epoch']} |")
  return out
