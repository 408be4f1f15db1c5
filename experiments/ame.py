"""AME vs experts, soups and the output ensemble on class-skewed shards (configs/ame.py).

Per seed: pre-train the shared initialisation on a small random subset, fine-tune K
experts from it on disjoint class-skewed shards of the rest (one vmapped `train.fit`),
merge them (uniform / greedy soup, AME runs), and score every single model and the
output ensemble on the test split and its shifted copies. AME's step count is reported
at its largest value (data-free) and as selected on validation accuracy.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ensembling import ame, configlib, ensemble, members, metrics, report, soups, train
from ensembling import tree as tree_lib
from ensembling.data import shards as shards_lib, shifts

COLUMNS = ("test", "rotate", "noise", "contrast", "shifted", "test_nll", "shifted_nll")


def _runs(config):
  out = []
  for spec in config.ame.runs:
    name, _, lr = spec.partition(":")
    if name not in ame.OPTIMIZERS or not lr:
      raise ValueError(f"ame.runs entry {spec!r}: use '<{'|'.join(ame.OPTIMIZERS)}>:<lr>'.")
    out.append((spec, name, float(lr)))
  return out


def validate(config):
  _runs(config)
  if not config.ame.steps or min(config.ame.steps) < 1:
    raise ValueError(f"ame.steps must be step counts >= 1, got {config.ame.steps}.")
  if min(config.experts) < 1 or int(config.seeds) < 1:
    raise ValueError("experts must be counts >= 1 and seeds >= 1.")


def _sets(config, splits):
  """The test split and its shifted copies, shifted on [0, 1] pixels and re-standardised
  (the loader's standardisation is affine: min and max of train are pixels 0 and 1)."""
  lo, hi = float(splits.x_train.min()), float(splits.x_train.max())
  raw = (splits.x_test - lo) / (hi - lo)
  back = lambda r: (r * (hi - lo) + lo).astype(np.float32)
  s = config.shifts
  return {"test": splits.x_test, "rotate": back(shifts.rotate(raw, s.rotate)),
          "noise": back(shifts.gaussian_noise(int(config.seed), raw, s.noise_std, clip=(0, 1))),
          "contrast": back(shifts.contrast(raw, s.contrast))}


def _scores(model, params_list, sets, y_test, x_val, y_val, bs):
  """{"val", "test", ..., "shifted", "*_nll"} per model (rows), and the test-set probs."""
  stacked = {"params": tree_lib.stack(params_list)}
  out = [dict() for _ in params_list]
  probs = {}
  for name, (x, y) in {"val": (x_val, y_val), **{n: (x, y_test) for n, x in sets.items()}}.items():
    p = ensemble.members_probs(members.predict(model, stacked, x, batch_size=bs))
    probs[name] = p
    for r, pk in zip(out, p):
      r[name], r[name + "_nll"] = metrics.accuracy(pk, y), metrics.nll(pk, y)
  for r in out:
    r["shifted"] = float(np.mean([r[n] for n in sets if n != "test"]))
    r["shifted_nll"] = float(np.mean([r[n + "_nll"] for n in sets if n != "test"]))
  return out, probs


def _experts(config, splits, model, seed, k, workdir):
  """(base params, stacked expert params) for one seed and K."""
  x, y, bs, pc = splits.x_train, splits.y_train, int(config.batch_size), config.pretrain
  perm = np.random.default_rng(seed).permutation(len(x))
  pre, pool = perm[:int(pc.examples)], perm[int(pc.examples):]
  sched = configlib.schedule_from_config(config.optim.to_dict() | {"learning_rate": pc.learning_rate},
                                         total_steps=int(pc.epochs) * (len(pre) // bs))
  base = train.train_members(
      model, x[pre], y[pre], num_members=1, epochs=int(pc.epochs), seed=seed, batch_size=bs,
      tx=configlib.optimizer_from_config(config.optim, schedule=sched), schedule=sched,
      workdir=os.path.join(workdir, f"seed{seed}", "pretrain"), progress=bool(config.progress))
  base = tree_lib.index(members.variables_of(base.state), 0)
  sh = config.shards
  idx = shards_lib.class_skewed_shards(
      y[pool], num_shards=k, num_classes=splits.num_classes, seed=seed,
      dominant_per_shard=int(sh.dominant_per_shard), dominant_fraction=float(sh.dominant_fraction),
      shard_size=int(sh.shard_size) or None)
  batch_fn, spe = shards_lib.shard_batch_fn(x, y, pool[idx], seed=seed, batch_size=bs)
  sched = configlib.schedule_from_config(config.optim, total_steps=spe * int(config.epochs))
  tx = configlib.optimizer_from_config(config.optim, schedule=sched)
  state = train.init_member_state(model, x[:1], num_members=k, tx=tx, seed=seed,
                                  init_variables=tree_lib.broadcast(base, k))
  step = members.ensemble_step(model=model, tx=tx, num_members=k, donate=True,
                               strategy=config.members_strategy)
  state, _, _ = train.fit(
      state, step_fn=step, batch_fn=batch_fn, num_steps=spe * int(config.epochs),
      key=jax.random.key(seed + 1), workdir=os.path.join(workdir, f"seed{seed}", f"K{k}"),
      eval_fn=lambda s: train.evaluate_members(model, s, splits.x_val, splits.y_val),
      eval_every=spe, checkpoint_every=spe, progress=bool(config.progress),
      desc=f"{k} experts", steps_per_epoch=spe, schedule=sched)
  return base["params"], members.variables_of(state)["params"], pool[idx].shape


def _compare(config, splits, model, sets, seed, k, workdir):
  """{row: metrics} for one seed and K, and the AME step curves."""
  base, experts, shape = _experts(config, splits, model, seed, k, workdir)
  ex = tree_lib.unstack(experts)
  greedy = soups.greedy_soup(ex, soups.accuracy_fn(model, splits.x_val, splits.y_val))
  names = [f"expert {i}" for i in range(k)] + ["shared initialisation", "uniform soup",
                                                f"greedy soup ({len(greedy.indices)} of {k})"]
  params = ex + [base, soups.uniform_soup(ex).params, greedy.params]
  steps = sorted(int(t) for t in config.ame.steps)
  for spec, name, lr in _runs(config):
    path = ame.ame_path(base, experts, steps=steps[-1],
                        tx=ame.optimizer(name, learning_rate=lr, momentum=config.ame.momentum))
    names += [f"AME {spec}, T={t}" for t in steps]
    params += [tree_lib.index(path, t - 1) for t in steps]
  scores, probs = _scores(model, params, sets, splits.y_test, splits.x_val, splits.y_val,
                          int(config.eval_batch_size))
  rows = dict(zip(names, scores))
  ens = {n: np.mean(p[:k], axis=0) for n, p in probs.items()}  # the K experts' outputs
  rows[f"output ensemble ({k} experts)"] = {**{n: metrics.accuracy(p, splits.y_test if n != "val"
                                                                  else splits.y_val) for n, p in ens.items()}}
  r = rows[f"output ensemble ({k} experts)"]
  r["shifted"] = float(np.mean([r[n] for n in sets if n != "test"]))
  r.update({f"{n}_nll": metrics.nll(ens[n], splits.y_test) for n in sets})
  r["shifted_nll"] = float(np.mean([r[f"{n}_nll"] for n in sets if n != "test"]))
  vals = [rows[f"expert {i}"]["val"] for i in range(k)]
  rows["experts (mean)"] = {c: float(np.mean([rows[f"expert {i}"][c] for i in range(k)]))
                            for c in COLUMNS}
  rows[f"best expert (val: {int(np.argmax(vals))})"] = rows[f"expert {int(np.argmax(vals))}"]
  for spec, _, _ in _runs(config):
    t = max(steps, key=lambda t: (rows[f"AME {spec}, T={t}"]["val"], -t))
    rows[f"AME {spec}, T selected on val ({t})"] = rows[f"AME {spec}, T={t}"]
  info = {"shards": list(shape), "greedy": list(greedy.indices),
          "line_coefficients": {spec: ame.line_coefficients(ame.optimizer(
              n, learning_rate=lr, momentum=config.ame.momentum), steps=steps[-1])[
                  np.asarray(steps) - 1].tolist() for spec, n, lr in _runs(config) if n != "adam"},
          "mean_abs_soup_minus_base": float(np.mean(np.concatenate([np.abs(
              np.ravel(s - b)) for s, b in zip(jax.tree.leaves(tree_lib.mean(experts)),
                                               jax.tree.leaves(base))])))}
  return rows, info


def run(config, workdir: str):
  splits = configlib.load_data(config)
  model = configlib.model_from_config(config.model, num_classes=splits.num_classes)
  sets = _sets(config, splits)
  per, infos = {}, {}
  for seed in range(int(config.seed), int(config.seed) + int(config.seeds)):
    for k in config.experts:
      rows, infos[f"K{k}_seed{seed}"] = _compare(config, splits, model, sets, seed, k, workdir)
      for name, r in rows.items():
        per.setdefault(f"K={k}", {}).setdefault(name, []).append(r)
  steps = sorted(int(t) for t in config.ame.steps)
  for k in config.experts:
    g = per[f"K={k}"]
    mean = lambda row, c: float(np.mean([r[c] for r in g[row]]))
    for c, label in (("test", "test accuracy"), ("shifted", "mean shifted-test accuracy")):
      curves = {spec: [mean(f"AME {spec}, T={t}", c) for t in steps] for spec, _, _ in _runs(config)}
      curves["uniform soup"] = [mean("uniform soup", c)] * len(steps)
      curves["experts (mean)"] = [mean("experts (mean)", c)] * len(steps)
      report.plot_curve(os.path.join(workdir, f"ame_{c}_K{k}.png"), steps, curves,
                        xlabel="AME steps T", ylabel=label, title=f"K={k} experts")
  main = {g: {r: v for r, v in rows.items() if ", T=" not in r} for g, rows in per.items()}
  sweep = {g: {r: v for r, v in rows.items() if ", T=" in r} for g, rows in per.items()}
  out = {"data": splits.describe(), "seeds": int(config.seeds), "info": infos,
         "rows": {g: {r: {"summary": report.seed_summary(v, COLUMNS + ("val",)), "per_seed": v}
                      for r, v in rows.items()} for g, rows in per.items()}}
  markdown = (f"# AME on class-skewed shards: {config.model.name} {tuple(config.model.widths)}, "
              f"{config.data.name}, mean ± std over {config.seeds} seed(s)\n\nAccuracy on the "
              "test split, its rotated / noised / low-contrast copies and their mean (shifted); "
              "NLL on test and mean over the shifts.\n\n" + report.seed_table(main, COLUMNS)
              + "\n## Every AME step count\n\n" + report.seed_table(sweep, COLUMNS + ("val",)))
  return out, markdown
