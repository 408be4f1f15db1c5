"""Weight merging (issue 17): configs/merging.py onto `ensembling.merging` and `ensembling.align`.

`multitask`: pre-train, fine-tune one model per task (`train.train_members`), merge with
every method, score per task. `scratch`: K ResNets from different seeds, aligned
(`align`), averaged, BatchNorm recomputed (`trajectory.recalibrate`), scored
(`train.evaluate_members`); plots barrier_{loss,accuracy}.png. Logs: workdir/<stage>/."""

import os
import re

import jax
import numpy as np
import optax

from ensembling import align, configlib, data, members, merging, optim, report, soups, train
from ensembling import trajectory
from ensembling import tree as tree_lib
from ensembling.data import shifts

TASK = re.compile(r"(rotate|noise)(\d+(?:\.\d+)?)")


def _train(config, model, x, y, *, num, epochs, lr, wd, seed, workdir, desc, init=None):
  """`num` members, SGD (momentum 0.9) cosine-decayed to 0: their stacked state."""
  steps = data.num_steps_per_epoch(len(x), int(config.batch_size)) * int(epochs)
  tx = optim.make_optimizer(name="sgd", learning_rate=optax.cosine_decay_schedule(lr, steps),
                            momentum=0.9, weight_decay=wd)
  return train.train_members(model, x, y, num_members=int(num), tx=tx, epochs=int(epochs),
                             batch_size=int(config.batch_size), seed=int(seed), workdir=workdir,
                             desc=desc, init_variables=init, **configlib.fit_kwargs(config)).state


def _task(name, x, seed):
  kind, value = TASK.fullmatch(name).groups()
  if kind == "rotate":  # multiples of 90 degrees move no pixel in from outside
    return shifts.rotate(x, float(value), order=0, cval=float(x.min()))
  return shifts.gaussian_noise(seed, x, float(value))


def _multitask(config, splits, workdir):
  mt, tasks, y = config.multitask, config.multitask.tasks.split("+"), splits.y_train
  model = configlib.model_from_config(config.model, num_classes=splits.num_classes)
  pre = tree_lib.index(_train(config, model, splits.x_train, y, num=1, epochs=mt.pretrain_epochs,
                              lr=mt.pretrain_lr, wd=mt.weight_decay, seed=config.seed,
                              workdir=os.path.join(workdir, "pretrain"), desc="pre-train")["params"], 0)
  n = int(mt.finetune_examples) or len(y)
  xs = {s: [_task(t, getattr(splits, f"x_{s}")[:n if s == "train" else None],
                  config.seed + 100 * j + i)
            for i, t in enumerate(tasks)] for j, s in enumerate(("train", "val", "test"))}
  fine = [tree_lib.index(_train(
      config, model, xs["train"][i], y[:n], num=1, epochs=mt.finetune_epochs, lr=mt.finetune_lr,
      wd=mt.weight_decay, seed=config.seed + 10 + i, init=tree_lib.broadcast({"params": pre}, 1),
      workdir=os.path.join(workdir, f"finetune_{t}"), desc=f"fine-tune {t}")["params"], 0)
      for i, t in enumerate(tasks)]
  score = {s: [soups.accuracy_fn(model, xs[s][i], getattr(splits, f"y_{s}"))
               for i in range(len(tasks))] for s in ("val", "test")}
  acc = lambda p, s: np.array([float(f(p)) for f in score[s]])
  own = {s: np.array([acc(p, s)[i] for i, p in enumerate(fine)]) for s in ("val", "test")}
  b = int(mt.stats_batch)
  batches = lambda i: [(xs["train"][i][j:j + b], y[j:j + b])
                       for j in range(0, int(mt.stats_examples), b)]
  fishers = [merging.diagonal_fisher(merging.classifier_log_likelihood(model), p, batches(i),
                                     labels=mt.fisher_labels, key=config.seed,
                                     num_classes=splits.num_classes) for i, p in enumerate(fine)]
  grams = [merging.gram_matrices(merging.dense_inputs(model), p, [x for x, _ in batches(i)])
           for i, p in enumerate(fine)]
  key, d, q = jax.random.key(mt.dare_seed), mt.ties_density, mt.dare_density
  tuned = {  # name -> (merge of lambda, lambda grid)
      "task arithmetic": (lambda s: merging.task_arithmetic(pre, fine, scale=s), mt.scales),
      f"TIES (density {d}, per tensor)": (
          lambda s: merging.ties(pre, fine, density=d, scale=s), mt.mean_scales),
      f"TIES (density {d}, global)": (
          lambda s: merging.ties(pre, fine, density=d, scale=s, trim="global"), mt.mean_scales),
      f"DARE (density {q}) + task arithmetic": (
          lambda s: merging.dare(key, pre, fine, density=q, scale=s), mt.scales),
      f"DARE (density {q}) + TIES election": (
          lambda s: merging.dare(key, pre, fine, density=q, scale=s, sign_election=True),
          mt.mean_scales)}
  fixed = {"pre-trained model": pre, "uniform soup": soups.uniform_soup(fine).params,
           "Model Stock": merging.model_stock(pre, fine),
           f"Fisher merging ({mt.fisher_labels})": merging.fisher_merge(fine, fishers),
           f"RegMean (alpha {mt.regmean_alpha})": merging.regmean(fine, grams,
                                                                 alpha=mt.regmean_alpha)}
  row = lambda name, p, lam=None: dict(
      method=name, scale=lam, val_norm=float(np.mean(acc(p, "val") / own["val"])),
      test_acc=acc(p, "test").tolist())
  rows = [dict(method="fine-tuned on the task (one model per task)", scale=None, val_norm=1.0,
               test_acc=own["test"].tolist())] + [row(n, p) for n, p in fixed.items()]
  for name, (merge, grid) in tuned.items():
    cands = [row(name, merge(float(s)), float(s)) for s in grid]
    best = max(cands, key=lambda r: r["val_norm"])
    rows.append({**best, "val_norm_by_scale": [r["val_norm"] for r in cands]})
  for r in rows:
    r["test_mean"] = float(np.mean(r["test_acc"]))
    r["test_norm"] = float(np.mean(np.array(r["test_acc"]) / own["test"]))
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
  n, nt = int(sc.train_examples) or len(splits.y_train), int(sc.test_examples) or len(splits.y_test)
  x, y, xt, yt = splits.x_train[:n], splits.y_train[:n], splits.x_test[:nt], splits.y_test[:nt]
  state = _train(config, model, x, y, num=sc.members, epochs=sc.epochs, lr=sc.learning_rate,
                 wd=sc.weight_decay, seed=config.seed + 7, desc=f"{sc.members} from scratch",
                 workdir=os.path.join(workdir, "scratch"))
  vs = tree_lib.unstack(members.variables_of(state))
  spec, key = align.resnet_permutation_spec(vs[0]), jax.random.key(config.seed)
  acts_fn, xa = align.resnet_activations(model, spec), x[:int(sc.act_examples)]
  acts = [align.collect_activations(acts_fn, v, [xa[i:i + 64] for i in range(0, len(xa), 64)])
          for v in vs]
  mm = align.merge_many(key, spec, vs, max_iter=int(sc.max_iter))
  aligned = {
      "naive": vs,
      "weight matching": vs[:1] + align.align_to_reference(key, spec, vs[0], vs[1:],
                                                           max_iter=int(sc.max_iter)),
      "activation matching": vs[:1] + [align.apply_permutation(
          spec, align.activation_matching(spec, acts[0], a), v) for a, v in zip(acts[1:], vs[1:])],
      "MergeMany": mm.models}
  alphas, names = np.linspace(0, 1, int(sc.alphas)), list(aligned)
  cands = [tree_lib.mean(tree_lib.stack(ms)) for ms in aligned.values()] + [
      tree_lib.interpolate(ms[0], ms[1], float(a)) for ms in aligned.values() for a in alphas]
  cands = trajectory.recalibrate(model, tree_lib.stack(cands), x, batch_size=int(config.batch_size),
                                 num_examples=int(sc.bn_examples))
  kw = dict(batch_size=int(config.eval_batch_size), strategy=config.members_strategy)
  ev, ind = (train.evaluate_members(model, v, xt, yt, **kw) for v in (cands, state))
  k, na = len(names), len(alphas)
  curves = {m: {n: ev[m][k + i * na:k + (i + 1) * na].tolist() for i, n in enumerate(names)}
            for m in ("nll", "accuracy")}
  rows = [dict(method=nm, merged_acc=float(ev["accuracy"][i]), merged_loss=float(ev["nll"][i]),
               merged_loss_gap=float(ev["nll"][i] - ind["nll"].mean()),
               barrier_loss=align.barrier(curves["nll"][nm], alphas),
               barrier_acc=align.barrier(curves["accuracy"][nm], alphas, higher_is_better=True))
          for i, nm in enumerate(names)]
  for metric, label in (("nll", "loss"), ("accuracy", "accuracy")):
    report.plot_curve(os.path.join(workdir, f"barrier_{label}.png"), alphas, curves[metric],
                      xlabel="alpha", ylabel=f"test {label} (BN recomputed)",
                      title="member 0 -> member 1")
  md = (f"\n## {sc.members} ResNets {tuple(sc.model.widths)} x {sc.model.blocks_per_stage} blocks "
        f"per stage from different seeds (members: test acc {100 * ind['accuracy'].mean():.2f} "
        f"mean, loss {ind['nll'].mean():.3f})\n\n" + report.cells_table(
            ["merge", f"merged (K={sc.members}) test acc", "merged loss",
             "merged loss - mean member loss", "loss barrier 0-1", "accuracy barrier 0-1 (pts)"],
            [[r["method"], f"{100 * r['merged_acc']:.2f}", r["merged_loss"], r["merged_loss_gap"],
              r["barrier_loss"], f"{100 * r['barrier_acc']:.2f}"] for r in rows])
        + f"\nMergeMany: {mm.rounds} rounds, converged {mm.converged}.\n")
  return {"rows": rows, "alphas": alphas.tolist(), "curves": curves, "members": {
      m: v.tolist() for m, v in ind.items()}, "merge_many_rounds": mm.rounds,
      "merge_many_converged": bool(mm.converged)}, md


def validate(config):
  unknown = sorted(set(config.parts.split("+")) - {"multitask", "scratch"})
  if unknown:
    raise ValueError(f"Unknown parts {unknown}; use multitask and/or scratch.")
  bad = [t for t in config.multitask.tasks.split("+") if not TASK.fullmatch(t)]
  if bad:
    raise ValueError(f"Unknown tasks {bad}; use rotate<degrees> or noise<std>, '+'-separated.")
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
