"""Weight merging (issue 17): configs/merging.py onto `ensembling.merging` and `ensembling.align`.

`multitask`: one model per task fine-tuned from a pre-trained one, merged by every method.
`scratch`: K ResNets aligned (`align.align_models`), averaged, BN recomputed; barrier plots."""

import os

import jax
import numpy as np
import optax

from ensembling import align, configlib, data, members, merging, optim, report, soups, train
from ensembling import trajectory, tree as tree_lib
from ensembling.data import shifts


def _train(config, model, x, y, *, num, epochs, lr, wd, seed, workdir, desc, init=None):
  """`num` members, SGD (momentum 0.9) cosine-decayed to 0: their stacked state."""
  steps = data.num_steps_per_epoch(len(x), int(config.batch_size)) * int(epochs)
  tx = optim.make_optimizer(name="sgd", learning_rate=optax.cosine_decay_schedule(lr, steps),
                            momentum=0.9, weight_decay=wd)
  return train.train_members(model, x, y, num_members=int(num), tx=tx, epochs=int(epochs),
                             batch_size=int(config.batch_size), seed=int(seed), workdir=workdir,
                             desc=desc, init_variables=init, **configlib.fit_kwargs(config)).state


def _multitask(config, splits, workdir):
  mt, tasks, y = config.multitask, config.multitask.tasks.split("+"), splits.y_train
  model = configlib.model_from_config(config.model, num_classes=splits.num_classes)
  tune = lambda x, i, name, **kw: tree_lib.index(_train(  # one model: its params
      config, model, x, y[:len(x)], num=1, wd=mt.weight_decay, seed=config.seed + i, desc=name,
      workdir=os.path.join(workdir, name), **kw)["params"], 0)
  pre = tune(splits.x_train, 0, "pretrain", epochs=mt.pretrain_epochs, lr=mt.pretrain_lr)
  n = int(mt.finetune_examples) or None  # None: all
  xs = {s: [shifts.by_name(t, getattr(splits, f"x_{s}")[:n if s == "train" else None],
                           seed=config.seed + 100 * j + i, cval=float(splits.x_train.min()))
            for i, t in enumerate(tasks)] for j, s in enumerate(("train", "val", "test"))}
  fine = [tune(xs["train"][i], 10 + i, f"finetune_{t}", epochs=mt.finetune_epochs,
               lr=mt.finetune_lr, init=tree_lib.broadcast({"params": pre}, 1))
          for i, t in enumerate(tasks)]
  score = {s: [soups.accuracy_fn(model, xs[s][i], getattr(splits, f"y_{s}"))
               for i in range(len(tasks))] for s in ("val", "test")}
  acc = lambda p, s: np.array([float(f(p)) for f in score[s]])
  own = {s: np.array([acc(p, s)[i] for i, p in enumerate(fine)]) for s in ("val", "test")}
  batches = lambda i, b=int(mt.stats_batch): [(xs["train"][i][j:j + b], y[j:j + b])  # own task
                                              for j in range(0, int(mt.stats_examples), b)]
  fishers = [merging.diagonal_fisher(merging.classifier_log_likelihood(model), p, batches(i),
                                     labels=mt.fisher_labels, num_classes=splits.num_classes,
                                     key=config.seed) for i, p in enumerate(fine)]
  grams = [merging.gram_matrices(merging.dense_inputs(model), p, [x for x, _ in batches(i)])
           for i, p in enumerate(fine)]
  key, d, q = jax.random.key(mt.dare_seed), mt.ties_density, mt.dare_density
  sums, means = mt.scales, mt.mean_scales  # lambda grids: summed deltas, TIES's disjoint mean
  merges = {  # name -> (merge of lambda, lambda grid picked on val; None: no lambda)
      "pre-trained model": (lambda s: pre, None),
      "uniform soup": (lambda s: soups.uniform_soup(fine).params, None),
      "Model Stock": (lambda s: merging.model_stock(pre, fine), None),
      f"Fisher ({mt.fisher_labels})": (lambda s: merging.fisher_merge(fine, fishers), None),
      f"RegMean (alpha {mt.regmean_alpha})": (
          lambda s: merging.regmean(fine, grams, alpha=mt.regmean_alpha), None),
      "task arithmetic": (lambda s: merging.task_arithmetic(pre, fine, scale=s), sums),
      f"TIES (density {d}, per tensor)": (
          lambda s: merging.ties(pre, fine, density=d, scale=s), means),
      f"TIES (density {d}, global)": (
          lambda s: merging.ties(pre, fine, density=d, scale=s, trim="global"), means),
      f"DARE (density {q}) + task arithmetic": (
          lambda s: merging.dare(key, pre, fine, density=q, scale=s), sums),
      f"DARE (density {q}) + TIES election": (
          lambda s: merging.dare(key, pre, fine, density=q, scale=s, sign_election=True), means)}
  scored = lambda name, s, a, v: dict(  # test and val accuracy per task -> a table row
      method=name, scale=s, test_acc=a.tolist(), test_mean=float(a.mean()),
      test_norm=float(np.mean(a / own["test"])), val_norm=float(np.mean(v / own["val"])))
  rows = [scored("fine-tuned on the task (one model per task)", None, own["test"], own["val"])]
  for name, (merge, grid) in merges.items():
    cands = [(s, merge(None if s is None else float(s))) for s in (grid or [None])]
    cands = [scored(name, s, acc(p, "test"), acc(p, "val")) for s, p in cands]
    rows.append({**max(cands, key=lambda r: r["val_norm"]),
                 "val_norm_by_scale": [r["val_norm"] for r in cands]})
  pct = lambda v: f"{100 * v:.2f}"
  md = (f"\n## Multi-task merging: {len(tasks)} tasks fine-tuned from one pre-trained "
        f"{config.model.name} {tuple(config.model.widths)}\n\n" + report.cells_table(
            ["method", "lambda"] + tasks + ["mean acc", "normalised (test)", "normalised (val)"],
            [[r["method"], "-" if r["scale"] is None else f"{r['scale']:g}"]
             + [pct(a) for a in r["test_acc"]] + [pct(r["test_mean"]), pct(r["test_norm"]),
                                                 pct(r["val_norm"])] for r in rows]))
  return {"tasks": tasks, "rows": rows, "finetuned_val": own["val"].tolist()}, md


def _scratch(config, splits, workdir):
  sc = config.scratch
  model = configlib.model_from_config(sc.model, num_classes=splits.num_classes)
  n, nt, size = int(sc.train_examples) or None, int(sc.test_examples) or None, int(sc.image_size)
  x, xt = (data.resize(a, size) if size else a for a in (splits.x_train[:n], splits.x_test[:nt]))
  y, yt = splits.y_train[:n], splits.y_test[:nt]  # n, nt = None: all
  state = _train(config, model, x, y, num=sc.members, epochs=sc.epochs, lr=sc.learning_rate,
                 wd=sc.weight_decay, seed=config.seed + 7, desc=f"{sc.members} from scratch",
                 workdir=os.path.join(workdir, "scratch"))
  vs = tree_lib.unstack(members.variables_of(state))
  spec, key = align.resnet_permutation_spec(vs[0]), jax.random.key(config.seed)
  xa = x[:int(sc.act_examples)]
  aligned = {m: align.align_models(key, spec, vs, method=m, max_iter=int(sc.max_iter),
                                   activations_fn=align.resnet_activations(model, spec),
                                   batches=[xa[i:i + 64] for i in range(0, len(xa), 64)])
             for m in align.ALIGN_METHODS}
  alphas, names = np.linspace(0, 1, int(sc.alphas)), list(aligned)
  cands = [tree_lib.mean(tree_lib.stack(ms)) for ms in aligned.values()] + [
      tree_lib.interpolate(ms[0], ms[1], float(a)) for ms in aligned.values() for a in alphas]
  cands = trajectory.recalibrate(model, tree_lib.stack(cands), x, batch_size=int(config.batch_size),
                                 num_examples=int(sc.bn_examples))
  kw = dict(batch_size=int(config.eval_batch_size), strategy=config.members_strategy)
  ev, ind = (train.evaluate_members(model, v, xt, yt, **kw) for v in (cands, state))
  k = len(names)  # candidates: the k merges, then the path points of each method
  curves = {m: dict(zip(names, ev[m][k:].reshape(k, -1).tolist())) for m in ("nll", "accuracy")}
  rows = [dict(method=nm, merged_acc=float(ev["accuracy"][i]), merged_loss=float(ev["nll"][i]),
               merged_loss_gap=float(ev["nll"][i] - ind["nll"].mean()),
               barrier_loss=align.barrier(curves["nll"][nm], alphas),
               barrier_acc=align.barrier(curves["accuracy"][nm], alphas, higher_is_better=True))
          for i, nm in enumerate(names)]
  for metric, label in (("nll", "loss"), ("accuracy", "accuracy")):
    report.plot_curve(os.path.join(workdir, f"barrier_{label}.png"), alphas, curves[metric],
                      xlabel="alpha", ylabel=f"test {label} (BN recomputed)", title="0 -> 1")
  md = (f"\n## {sc.members} ResNets {tuple(sc.model.widths)} x {sc.model.blocks_per_stage} blocks "
        f"per stage from different seeds (members: test acc {100 * ind['accuracy'].mean():.2f} "
        f"mean, loss {ind['nll'].mean():.3f})\n\n" + report.cells_table(
            ["merge", f"merged (K={sc.members}) test acc", "merged loss",
             "merged loss - mean member loss", "loss barrier 0-1", "accuracy barrier 0-1 (pts)"],
            [[r["method"], f"{100 * r['merged_acc']:.2f}", r["merged_loss"], r["merged_loss_gap"],
              r["barrier_loss"], f"{100 * r['barrier_acc']:.2f}"] for r in rows]))
  return {"rows": rows, "alphas": alphas.tolist(), "curves": curves,
          "members": {m: v.tolist() for m, v in ind.items()}}, md


def validate(config):
  unknown = sorted(set(config.parts.split("+")) - {"multitask", "scratch"})
  if unknown:
    raise ValueError(f"Unknown parts {unknown}; use multitask and/or scratch.")
  for t in config.multitask.tasks.split("+"):
    shifts.by_name(t, np.zeros((1, 2, 2, 1)))  # a clear error for an unknown task name
  if int(config.scratch.members) < 2 or int(config.scratch.alphas) < 2:
    raise ValueError("scratch.members and scratch.alphas must be >= 2.")


def run(config, workdir: str):
  splits = configlib.load_data(config)
  out, md = {"data": splits.describe()}, f"# Weight merging on {splits.name}\n"
  for part, fn in (("multitask", _multitask), ("scratch", _scratch)):
    if part in config.parts.split("+"):
      out[part], text = fn(config, splits, workdir)
      md += text
  return out, md
