"""Model soups (seed 002): fine-tuned ingredients; from-scratch models before/after alignment.

`train.train_members` / `train.fit_members` with `soups.finetune_step` train, `soups.compare_soups`
makes the soups, `ensembling.align` aligns; this file maps configs/soups.py onto them and
plots barrier_{loss,accuracy}.png (training logs: workdir/{pretrain,finetune,scratch}/)."""

import os

import jax
import numpy as np
import optax

from ensembling import align, configlib, data, ensemble, members, metrics, optim, report, soups
from ensembling import train
from ensembling import tree as tree_lib


def _train(config, splits, model, *, num, epochs, lr, wd, seed, workdir, desc):
  """`num` members, SGD (momentum 0.9) cosine-decayed to 0: their stacked params."""
  steps = data.num_steps_per_epoch(len(splits.x_train), int(config.batch_size)) * int(epochs)
  tx = optim.make_optimizer(name="sgd", learning_rate=optax.cosine_decay_schedule(lr, steps),
                            momentum=0.9, weight_decay=wd)
  return train.train_members(
      model, splits.x_train, splits.y_train, num_members=int(num), tx=tx, epochs=int(epochs),
      batch_size=int(config.batch_size), seed=int(seed), workdir=workdir, desc=desc,
      **configlib.fit_kwargs(config, eval_data=(splits.x_val, splits.y_val))).state["params"]


def _rows(config, splits, model, params_K, part):
  """Every soup of `params_K` as table rows; the ingredients' val scores and test metrics."""
  sc, y = config.soups, splits.y_test
  predict = lambda p_K: members.predict(model, {"params": p_K}, splits.x_test,
                                        batch_size=config.eval_batch_size)
  test = lambda lg: [metrics.classification_metrics(p, y) for p in ensemble.members_probs(lg)]
  res = soups.compare_soups(
      params_K, soups.accuracy_fn(model, splits.x_val, splits.y_val), passes=int(sc.passes),
      random_orders=int(sc.random_orders), loss_fn=soups.temperature_loss_fn(model),
      batches=soups.held_out_batches(splits.x_val, splits.y_val, batch_size=int(sc.learned_batch)),
      learned_steps=int(sc.learned_steps), learned_lr=float(sc.learned_lr),
      batch_size=int(sc.eval_batch_size) or None)
  ind_val, logits = res["greedy_sorted"][0].individual_scores, predict(params_K)
  ind, best = test(logits), int(np.nanargmax(ind_val))
  ens = metrics.classification_metrics(np.asarray(ensemble.average_probs(logits)), y)
  rows = [dict(method="best individual (by val)", val_acc=float(ind_val[best]), indices=[best],
               test_acc=ind[best]["accuracy"], test_nll=ind[best]["nll"], ingredients=1),
          dict(method="mean individual", val_acc=float(np.nanmean(ind_val)),
               test_acc=float(np.mean([m["accuracy"] for m in ind])), ingredients=1),
          dict(method=f"output ensemble of all {len(ind)} (K x cost)", val_acc=None,
               test_acc=ens["accuracy"], test_nll=ens["nll"], ingredients=len(ind))]
  for name, results in res.items():
    tm, mean = test(predict(tree_lib.stack([r.params for r in results]))), np.mean
    rows.append(dict(
        method=soups.SOUPS[name].format(n=len(results)),
        val_acc=float(mean([r.score for r in results])),
        test_acc=float(mean([m["accuracy"] for m in tm])),
        test_nll=float(mean([m["nll"] for m in tm])),
        ingredients=float(mean([len(r.indices) for r in results])),
        indices=[list(r.indices) for r in results], val_acc_each=[r.score for r in results],
        test_acc_each=[m["accuracy"] for m in tm]))
    if name.startswith("learned"):
      rows[-1].update(ingredients=round(results[0].info["effective_ingredients"], 2),
                      note="effective ingredients 1/sum(w^2); learned on val",
                      temperature=results[0].info["temperature"])
  return [{**r, "part": part} for r in rows], ind_val, ind


def _table(rows):
  pct, num = (lambda v: "-" if v is None else f"{100 * v:.2f}"), (lambda v: f"{float(v):.4g}")
  return report.cells_table(["method", "val acc", "test acc", "ingredients"], [
      [r["method"], pct(r.get("val_acc")), pct(r["test_acc"]), num(r["ingredients"])]
      for r in rows])


def _finetune_part(config, splits, model, workdir):
  pc, fc = config.pretrain, config.finetune
  pre = tree_lib.index(_train(config, splits, model, num=1, epochs=pc.epochs, lr=pc.learning_rate,
                              wd=pc.weight_decay, seed=config.seed, desc="pre-train",
                              workdir=os.path.join(workdir, "pretrain")), 0)
  spe = data.num_steps_per_epoch(len(splits.x_train), int(config.batch_size))
  hp = soups.random_hyperparams(int(fc.ingredients), steps_per_epoch=spe, seed=fc.hyper_seed, **{
      n: configlib._plain(fc[n]) for n in ("max_epochs", "lr_range", "wd_range", "max_shift")})
  res = soups.finetune(
      model, {"params": pre}, splits.x_train, splits.y_train, hyperparams=hp, desc="fine-tune",
      num_steps=spe * int(fc.max_epochs), batch_size=int(config.batch_size),
      seed=int(config.seed) + 100, workdir=os.path.join(workdir, "finetune"),
      **configlib.fit_kwargs(config, eval_data=(splits.x_val, splits.y_val)))
  rows, ind_val, ind_test = _rows(config, splits, model, res.state["params"], "finetune")
  pre_test = metrics.accuracy(ensemble.members_probs(members.predict(
      model, {"params": tree_lib.broadcast(pre, 1)}, splits.x_test,
      batch_size=config.eval_batch_size))[0], splits.y_test)
  ings = [{**{n: np.asarray(v[i]).item() for n, v in hp.items()}, "val_acc": float(ind_val[i]),
           "test_acc": ind_test[i]["accuracy"]} for i in range(len(ind_val))]
  md = (f"\n## Fine-tuned ingredients ({config.finetune.ingredients}, from one pre-trained model: "
        f"test acc {100 * pre_test:.2f})\n\n" + _table(rows) + "\n" + report.cells_table(
            ["#", "lr", "wd", "epochs", "shift", "flip", "val acc", "test acc"],
            [[i, f"{g['lr']:.4f}", f"{g['weight_decay']:.1e}", g["epochs"], g["shift"], g["flip"],
              f"{100 * g['val_acc']:.2f}", f"{100 * g['test_acc']:.2f}"]
             for i, g in enumerate(ings)]))
  return {"rows": rows, "pretrained_test_acc": pre_test, "ingredients": ings}, md


def _scratch_part(config, splits, model, workdir):
  sc = config.scratch
  params_K = _train(config, splits, model, num=sc.members, epochs=sc.epochs, lr=sc.learning_rate,
                    wd=sc.weight_decay, seed=config.seed + 7, desc=f"{sc.members} from scratch",
                    workdir=os.path.join(workdir, "scratch"))
  naive_rows, ind_val, _ = _rows(config, splits, model, params_K, "scratch")
  ref, ms = int(np.nanargmax(ind_val)), tree_lib.unstack(params_K)
  aligned = align.align_to_reference(jax.random.key(config.seed), align.mlp_permutation_spec(ms[0]),
                                     ms[ref], ms, max_iter=sc.max_iter)
  aligned_rows, _, _ = _rows(config, splits, model, tree_lib.stack(aligned), "scratch_aligned")
  other, alphas = (ref + 1) % len(ms), np.linspace(0, 1, int(sc.alphas))
  test_eval = soups.loss_accuracy_fn(model, splits.x_test, splits.y_test)
  curves = {n: align.interpolation_curve(test_eval, ms[ref], b, alphas)
            for n, b in (("naive", ms[other]), ("aligned", aligned[other]))}
  b = {n: {"loss": align.barrier(c["loss"], alphas),
           "accuracy": align.barrier(c["accuracy"], alphas, higher_is_better=True)}
       for n, c in curves.items()}
  for metric in ("loss", "accuracy"):
    report.plot_curve(os.path.join(workdir, f"barrier_{metric}.png"), alphas,
                      {n: c[metric] for n, c in curves.items()}, xlabel="alpha",
                      ylabel=f"test {metric}",
                      title=f"member {ref} -> member {other}, naive vs weight-matched")
  md = (f"\n## {sc.members} models trained from scratch (different seeds)\n\nNaive soups:\n\n"
        + _table(naive_rows) + f"\nAfter weight matching every member to member {ref} (best on "
        "val):\n\n" + _table(aligned_rows) + f"\nBarrier between members {ref} and {other} (test, "
        f"{len(alphas)} alphas): naive loss {b['naive']['loss']:.3f} / accuracy "
        f"{100 * b['naive']['accuracy']:.2f} pts; aligned loss {b['aligned']['loss']:.3f} / "
        f"accuracy {100 * b['aligned']['accuracy']:.2f} pts.\n")
  return {"reference": ref, "other": other, "naive_rows": naive_rows, "aligned_rows": aligned_rows,
          "alphas": alphas.tolist(), "barriers": b,
          "curves": {n: {k: v.tolist() for k, v in c.items()} for n, c in curves.items()}}, md


def validate(config):
  unknown = sorted(set(config.parts.split("+")) - {"finetune", "scratch"})
  if unknown:
    raise ValueError(f"Unknown parts {unknown}; use finetune and/or scratch.")


def run(config, workdir: str):
  splits = configlib.load_data(config)
  model = configlib.model_from_config(config.model, num_classes=splits.num_classes)
  out = {"data": splits.describe(), "model": config.model.to_dict()}
  md = f"# Model soups: {config.model.name} {tuple(config.model.widths)} on {splits.name}\n"
  for part, fn in (("finetune", _finetune_part), ("scratch", _scratch_part)):
    if part in config.parts.split("+"):
      out[part], text = fn(config, splits, model, workdir)
      md += text
  return out, md
