"""AME vs experts, soups and the output ensemble on class-skewed shards (configs/ame.py).

Per seed and K: the shared initialisation, K experts fine-tuned from it on disjoint
shards (one vmapped `train.fit`), their soups and AME runs, every single model and the
output ensemble scored on the test split and its shifted copies.
"""

import os

import jax
import numpy as np

from ensembling import ame, configlib, ensemble, members, metrics, report, soups, train
from ensembling import tree as tree_lib
from ensembling.data import shards as shards_lib, shifts

COLUMNS = ("test", "rotate", "noise", "contrast", "shifted", "test_nll", "shifted_nll")


def _runs(config):
  """[(spec, optimizer, rate, pseudo-gradient)] from `config.ame.runs` ("adam:0.001[:cyclic]")."""
  out = [(spec, *(spec.split(":") + ["full"])[:3]) for spec in config.ame.runs]
  for spec, name, lr, mode in out:
    if name not in ame.OPTIMIZERS or not lr or mode not in ame.PSEUDO_GRADIENTS:
      raise ValueError(f"ame.runs: {spec!r}; use '<{'|'.join(ame.OPTIMIZERS)}>:<lr>[:cyclic]'.")
  return [(spec, name, float(lr), mode) for spec, name, lr, mode in out]


def validate(config):
  _runs(config)
  if not config.ame.steps or min(config.ame.steps) < 1 or min(config.experts) < 1:
    raise ValueError(f"ame.steps and experts must be counts >= 1, got {config.ame.steps}, "
                     f"{config.experts}.")


def _sets(config, splits):
  """The test split and its shifted copies, shifted on [0, 1] pixels and re-standardised
  (the loader's standardisation is affine: min and max of train are pixels 0 and 1)."""
  lo, hi, s = float(splits.x_train.min()), float(splits.x_train.max()), config.shifts
  raw = (splits.x_test[:int(s.examples) or None] - lo) / (hi - lo)
  back = lambda r: (r * (hi - lo) + lo).astype(np.float32)
  return {"test": splits.x_test, "rotate": back(shifts.rotate(raw, s.rotate)),
          "noise": back(shifts.gaussian_noise(int(config.seed), raw, s.noise_std, clip=(0, 1))),
          "contrast": back(shifts.contrast(raw, s.contrast))}


def _row(probs_by_set, labels_by_set):
  """Accuracy and NLL of one model's (or the ensemble's) probabilities on every set."""
  r = {f"{n}{m}": f(p, labels_by_set[n]) for n, p in probs_by_set.items()
       for m, f in (("", metrics.accuracy), ("_nll", metrics.nll))}
  shifted = [n for n in probs_by_set if n not in ("val", "test")]
  return {**r, **{f"shifted{m}": float(np.mean([r[n + m] for n in shifted])) for m in ("", "_nll")}}


def _experts(config, splits, model, seed, k, workdir):
  """(base params, stacked expert params) for one seed and K."""
  x, y, bs, pc = splits.x_train, splits.y_train, int(config.batch_size), config.pretrain
  pre, pool = np.split(np.random.default_rng(seed).permutation(len(x)), [int(pc.examples)])
  sched = configlib.schedule_from_config({**config.optim, "learning_rate": pc.learning_rate},
                                         total_steps=int(pc.epochs) * (len(pre) // bs))
  base = train.train_members(
      model, x[pre], y[pre], num_members=1, epochs=int(pc.epochs), seed=seed, batch_size=bs,
      tx=configlib.optimizer_from_config(config.optim, schedule=sched), schedule=sched,
      workdir=os.path.join(workdir, f"seed{seed}", "pretrain"), progress=bool(config.progress))
  base = tree_lib.index(members.variables_of(base.state), 0)
  sh = {**config.shards, "shard_size": config.shards.shard_size or None}
  idx = shards_lib.class_skewed_shards(y[pool], num_shards=k, num_classes=splits.num_classes,
                                       seed=seed, **sh)
  spe = idx.shape[1] // bs
  sched = configlib.schedule_from_config(config.optim, total_steps=spe * int(config.epochs))
  res = ame.fit_experts(model, base, x, y, pool[idx], num_steps=spe * int(config.epochs),
                        tx=configlib.optimizer_from_config(config.optim, schedule=sched),
                        batch_size=bs, seed=seed, strategy=config.members_strategy,
                        eval_data=(splits.x_val, splits.y_val), schedule=sched,
                        workdir=os.path.join(workdir, f"seed{seed}", f"K{k}"),
                        progress=bool(config.progress))
  return base["params"], res.state["params"], idx.shape


def _compare(config, splits, model, sets, seed, k, workdir):
  """({row: metrics}, info) for one seed and K."""
  base, experts, shape = _experts(config, splits, model, seed, k, workdir)
  ex = tree_lib.unstack(experts)
  greedy = soups.greedy_soup(ex, soups.accuracy_fn(model, splits.x_val, splits.y_val))
  names = [f"expert {i}" for i in range(k)] + ["shared initialisation", "uniform soup",
                                                "greedy soup"]
  params = ex + [base, soups.uniform_soup(ex).params, greedy.params]
  steps = sorted(int(t) for t in config.ame.steps)
  for spec, name, lr, mode in _runs(config):
    path = ame.ame_path(base, experts, steps=steps[-1], pseudo_gradient=mode,
                        tx=ame.optimizer(name, learning_rate=lr, momentum=config.ame.momentum))
    names += [f"AME {spec}, T={t}" for t in steps]
    params += [tree_lib.index(path, t - 1) for t in steps]
  sets = {"val": splits.x_val, **sets}
  labels = {"val": splits.y_val, **{n: splits.y_test[:len(x)] for n, x in sets.items()}}
  stacked = {"params": tree_lib.stack(params)}
  probs = {n: ensemble.members_probs(members.predict(model, stacked, x,
                                                     batch_size=int(config.eval_batch_size)))
           for n, x in sets.items()}
  rows = {name: _row({n: p[i] for n, p in probs.items()}, labels) for i, name in enumerate(names)}
  rows[f"output ensemble ({k} experts)"] = _row({n: p[:k].mean(0) for n, p in probs.items()},
                                                labels)
  rows["experts (mean)"] = {c: float(np.mean([rows[f"expert {i}"][c] for i in range(k)]))
                            for c in COLUMNS + ("val",)}
  best = int(np.argmax([rows[f"expert {i}"]["val"] for i in range(k)]))
  rows["best expert (by val)"] = rows[f"expert {best}"]
  chosen = {"greedy soup ingredients": list(greedy.indices), "best expert": best}
  for spec, *_ in _runs(config):
    chosen[f"AME {spec} T"] = max(steps, key=lambda t: (rows[f"AME {spec}, T={t}"]["val"], -t))
    rows[f"AME {spec}, T selected on val"] = rows[f"AME {spec}, T={chosen[f'AME {spec} T']}"]
  line = lambda n, lr: ame.line_coefficients(ame.optimizer(
      n, learning_rate=lr, momentum=config.ame.momentum), steps=steps[-1])[np.array(steps) - 1]
  diff = jax.tree.map(lambda s, b: np.abs(s - b).ravel(), tree_lib.mean(experts), base)
  return rows, {"shards": list(shape), "chosen_on_val": chosen,
                "line_coefficients": {spec: line(n, lr).tolist() for spec, n, lr, m in
                                      _runs(config) if n != "adam" and m == "full"},
                "mean_abs_soup_minus_base": float(np.mean(np.concatenate(jax.tree.leaves(diff))))}


def run(config, workdir: str):
  splits = configlib.load_data(config)
  model = configlib.model_from_config(config.model, num_classes=splits.num_classes)
  sets, per, infos = _sets(config, splits), {}, {}
  for seed in range(int(config.seed), int(config.seed) + int(config.seeds)):
    for k in config.experts:
      rows, infos[f"K{k}_seed{seed}"] = _compare(config, splits, model, sets, seed, k, workdir)
      for name, r in rows.items():
        per.setdefault(f"K={k}", {}).setdefault(name, []).append(r)
  steps = sorted(int(t) for t in config.ame.steps)
  for (k, c), label in zip([(k, c) for k in config.experts for c in ("test", "shifted")],
                           ["test accuracy", "mean shifted-test accuracy"] * len(config.experts)):
    mean = lambda row: float(np.mean([r[c] for r in per[f"K={k}"][row]]))
    refs = ("uniform soup", f"output ensemble ({k} experts)")
    curves = {**{spec: [mean(f"AME {spec}, T={t}") for t in steps] for spec, *_ in _runs(config)},
              **{r: [mean(r)] * len(steps) for r in refs}}
    report.plot_curve(os.path.join(workdir, f"ame_{c}_K{k}.png"), steps, curves,
                      xlabel="AME steps T", ylabel=label, title=f"K={k} experts")
  main, sweep = ({g: {r: v for r, v in rows.items() if (", T=" in r) == s} for g, rows in
                 per.items()} for s in (False, True))
  out = {"data": splits.describe(), "seeds": int(config.seeds), "info": infos,
         "rows": {g: {r: {"summary": report.seed_summary(v, COLUMNS + ("val",)), "per_seed": v}
                      for r, v in rows.items()} for g, rows in per.items()}}
  markdown = (f"# AME on class-skewed shards: {config.model.name} {tuple(config.model.widths)}, "
              f"{config.data.name}, mean ± std over {config.seeds} seed(s)\n\nAccuracy on the "
              "test split, its rotated / noised / low-contrast copies and their mean (shifted); "
              "NLL on test and mean over the shifts.\n\n" + report.seed_table(main, COLUMNS)
              + "\nChosen on validation accuracy:\n" + "".join(
                  f"- {key}: {i['chosen_on_val']}\n" for key, i in infos.items())
              + "\n## Every AME step count\n\n" + report.seed_table(sweep, COLUMNS + ("val",)))
  return out, markdown
