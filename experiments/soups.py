"""Model soups of fine-tuned ingredients, and of from-scratch models before/after alignment.

See configs/soups.py for what is run; results go to workdir/results.{md,json},
metrics.jsonl (one record per soup), barrier_*.png, and per-phase training logs in
workdir/{pretrain,finetune,scratch}/metrics.jsonl.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ensembling import align, data, ensemble, losses, members, metrics, models, optim, report
from ensembling import soups, train
from ensembling import tree as tree_lib


# --------------------------------------------------------------------------- training

def augment(key, x, *, max_shift, flip):
  """Random translation by up to `max_shift` pixels (zero padded; `max_shift` may be
  traced, at most 2) and, where `flip`, a horizontal flip with probability 1/2."""
  if x.ndim == 3:
    x = x[..., None]
  b, h, w, c = x.shape
  k1, k2, k3 = jax.random.split(key, 3)
  dy = jax.random.randint(k1, (b,), -max_shift, max_shift + 1)
  dx = jax.random.randint(k2, (b,), -max_shift, max_shift + 1)
  xp = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  crop = jax.vmap(lambda im, i, j: jax.lax.dynamic_slice(im, (2 + i, 2 + j, 0), (h, w, c)))(
      xp, dy, dx)
  do_flip = jnp.logical_and(flip, jax.random.bernoulli(k3, 0.5, (b,)))
  return jnp.where(do_flip[:, None, None, None], crop[:, :, ::-1], crop)


def finetune_step(state, batch, key, *, apply_fn, tx, loss_fn):
  """One member's step with its own hyperparameters in `state["hp"]`: peak lr, steps
  (cosine to 0, then frozen), augmentation shift bound and flip switch."""
  hp = state["hp"]
  frac = jnp.minimum(state["step"].astype(jnp.float32) / hp["steps"].astype(jnp.float32), 1.0)
  scale = hp["lr"] * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  opt_state = optim.set_hyperparams(state["opt_state"], lr_scale=scale)
  akey, dkey = jax.random.split(key)
  x = augment(akey, batch["x"], max_shift=hp["shift"], flip=hp["flip"])
  return members.train_step({**state, "opt_state": opt_state}, {**batch, "x": x}, dkey,
                            apply_fn=apply_fn, tx=tx, loss_fn=loss_fn)


def _fit(config, splits, model, tx, state, *, step_fn, epochs, seed, workdir, desc):
  k = tree_lib.num_members(state["step"])
  batch_fn, spe = train.make_batch_fn(splits.x_train, splits.y_train, seed=seed,
                                      batch_size=config.batch_size, num_members=k)
  eval_fn = lambda s: train.evaluate_members(model.apply, s, splits.x_val, splits.y_val,
                                             strategy="vmap", batch_size=config.eval_batch_size)
  step = members.ensemble_step(apply_fn=model.apply, tx=tx, num_members=k, strategy="vmap",
                               step_fn=step_fn)
  state, _, _ = train.fit(state, step_fn=step, batch_fn=batch_fn, num_steps=spe * epochs,
                          key=jax.random.key(seed + 1), workdir=workdir, eval_fn=eval_fn,
                          eval_every=spe, checkpoint_every=spe, progress=config.progress,
                          desc=desc, steps_per_epoch=spe)
  return state, spe


def _sgd_state(params_K, *, lr, total_steps, weight_decay):
  tx = optim.make_optimizer(name="sgd", learning_rate=optax.cosine_decay_schedule(lr, total_steps),
                            momentum=0.9, weight_decay=weight_decay)
  return tx, members.init_states({"params": params_K}, tx)


def train_scratch_or_pretrain(config, splits, model, *, num, epochs, lr, wd, seed, workdir, desc):
  spe = data.num_steps_per_epoch(len(splits.x_train), config.batch_size)
  params_K = members.init_members(jax.random.key(seed), model, splits.x_train[:1], num)["params"]
  tx, state = _sgd_state(params_K, lr=lr, total_steps=spe * epochs, weight_decay=wd)
  state, _ = _fit(config, splits, model, tx, state, step_fn=members.train_step, epochs=epochs,
                  seed=seed, workdir=workdir, desc=desc)
  return state["params"]


def draw_hyperparams(cfg, k, steps_per_epoch):
  rng = np.random.default_rng(cfg.hyper_seed)
  loguni = lambda lo, hi: np.exp(rng.uniform(np.log(lo), np.log(hi), k)).astype(np.float32)
  epochs = rng.integers(1, cfg.max_epochs + 1, k)
  return {"lr": loguni(*cfg.lr_range), "weight_decay": loguni(*cfg.wd_range),
          "epochs": epochs.astype(np.int32), "steps": (epochs * steps_per_epoch).astype(np.int32),
          "shift": rng.integers(0, cfg.max_shift + 1, k).astype(np.int32),
          "flip": rng.random(k) < 0.5}


def finetune_ingredients(config, splits, model, pretrained, workdir):
  k = int(config.finetune.ingredients)
  spe = data.num_steps_per_epoch(len(splits.x_train), config.batch_size)
  hp = draw_hyperparams(config.finetune, k, spe)
  tx = optim.make_optimizer(name="sgd", learning_rate=1.0, momentum=0.9)  # lr via lr_scale
  state = members.init_states({"params": tree_lib.broadcast(pretrained, k)}, tx)
  state["opt_state"] = optim.set_hyperparams(state["opt_state"], weight_decay=hp["weight_decay"])
  state["hp"] = {n: jnp.asarray(hp[n]) for n in ("lr", "steps", "shift", "flip")}
  state, _ = _fit(config, splits, model, tx, state, step_fn=finetune_step,
                  epochs=int(config.finetune.max_epochs), seed=config.seed + 100,
                  workdir=workdir, desc=f"fine-tune {k} ingredients")
  return state["params"], hp


# --------------------------------------------------------------------------- soups

def _scorers(model, splits, batch_size):
  xv, yv = jnp.asarray(splits.x_val), jnp.asarray(splits.y_val)

  def val_accuracy(params):  # traceable: vmapped over candidate soups
    return jnp.mean(jnp.argmax(model.apply({"params": params}, xv).logits, -1) == yv)

  def test_metrics(params_K):
    logits = members.predict(model.apply, {"params": params_K}, splits.x_test,
                             batch_size=batch_size)
    return [metrics.classification_metrics(p, splits.y_test) for p in
            ensemble.members_probs(logits)], logits

  return val_accuracy, test_metrics


def run_soups(config, splits, model, params_K, *, prefix):
  """All soups of `params_K`; returns table rows {method, val_acc, test_acc, ...}."""
  val_accuracy, test_metrics = _scorers(model, splits, config.eval_batch_size)
  sc = config.soups
  bs = int(sc.eval_batch_size) or None
  k = tree_lib.num_members(params_K)
  ind_test, ind_logits = test_metrics(params_K)
  greedy = soups.greedy_soup(params_K, val_accuracy, order="sorted", batch_size=bs)
  ind_val = greedy.individual_scores
  best = int(np.nanargmax(ind_val))
  rows = [dict(method="best individual (by val)", val_acc=float(ind_val[best]),
               test_acc=ind_test[best]["accuracy"], test_nll=ind_test[best]["nll"],
               ingredients=1, indices=[best]),
          dict(method="mean individual", val_acc=float(np.nanmean(ind_val)),
               test_acc=float(np.mean([m["accuracy"] for m in ind_test])), ingredients=1)]
  ens = metrics.classification_metrics(np.asarray(ensemble.average_probs(ind_logits)),
                                       splits.y_test)
  rows.append(dict(method=f"output ensemble of all {k} (K x cost)", val_acc=None,
                   test_acc=ens["accuracy"], test_nll=ens["nll"], ingredients=k))

  def add(name, results):
    params = tree_lib.stack([r.params for r in results])
    tm, _ = test_metrics(params)
    rows.append(dict(method=name, val_acc=float(np.mean([r.score for r in results])),
                     test_acc=float(np.mean([m["accuracy"] for m in tm])),
                     test_nll=float(np.mean([m["nll"] for m in tm])),
                     ingredients=float(np.mean([len(r.indices) for r in results])),
                     indices=[list(r.indices) for r in results],
                     val_acc_each=[r.score for r in results],
                     test_acc_each=[m["accuracy"] for m in tm]))

  add("uniform soup", [soups.uniform_soup(params_K, val_accuracy)])
  n_rand = int(sc.random_orders)
  add(f"greedy soup (random, mean of {n_rand})",
      [soups.greedy_soup(params_K, val_accuracy, order="random", key=s, batch_size=bs)
       for s in range(n_rand)])
  add("greedy soup (sorted)", [greedy])
  add(f"pruned soup (random, mean of {n_rand})",
      [soups.pruned_soup(params_K, val_accuracy, passes=sc.passes, order="random", key=s,
                         batch_size=bs) for s in range(n_rand)])
  add("pruned soup (sorted)",
      [soups.pruned_soup(params_K, val_accuracy, passes=sc.passes, order="sorted", batch_size=bs)])
  if sc.learned_steps:
    xv, yv = splits.x_val, splits.y_val
    nb = max(1, len(xv) // sc.learned_batch)
    batches = [(jnp.asarray(xv[i * sc.learned_batch:(i + 1) * sc.learned_batch]),
                jnp.asarray(yv[i * sc.learned_batch:(i + 1) * sc.learned_batch]))
               for i in range(nb)]

    def loss_fn(params, batch, temperature):
      logits = model.apply({"params": params}, batch[0]).logits
      return losses.softmax_cross_entropy(temperature * logits, batch[1])

    for per_layer in (False, True):
      r = soups.learned_soup(params_K, loss_fn, batches, steps=sc.learned_steps,
                             learning_rate=sc.learned_lr, per_layer=per_layer,
                             eval_fn=val_accuracy)
      add(f"learned soup ({'per layer' if per_layer else 'global'})", [r])
      rows[-1]["ingredients"] = round(r.info["effective_ingredients"], 2)
      rows[-1]["note"] = "effective ingredients 1/sum(w^2); learned on val"
      rows[-1]["temperature"] = r.info["temperature"]
  for r in rows:
    r["part"] = prefix
  return rows, ind_val, ind_test


def _table(rows):
  out = "| method | val acc | test acc | ingredients |\n|---|---|---|---|\n"
  for r in rows:
    v = "-" if r.get("val_acc") is None else f"{100 * r['val_acc']:.2f}"
    out += f"| {r['method']} | {v} | {100 * r['test_acc']:.2f} | {r['ingredients']} |\n"
  return out


# --------------------------------------------------------------------------- run

def run(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  splits = data.load(config.data, seed=config.seed)
  model = models.make_model(config.model, num_classes=splits.num_classes)
  parts = config.parts.split("+")
  unknown = sorted(set(parts) - {"finetune", "scratch"})
  if unknown:
    raise ValueError(f"Unknown parts {unknown}; use finetune and/or scratch.")
  out = {"data": splits.describe(), "model": dict(config.model)}
  md = [f"# Model soups: {config.model.name} {tuple(config.model.widths)} on {splits.name}\n"]
  all_rows = []

  if "finetune" in parts:
    pc = config.pretrain
    pre = train_scratch_or_pretrain(config, splits, model, num=1, epochs=pc.epochs,
                                    lr=pc.learning_rate, wd=pc.weight_decay, seed=config.seed,
                                    workdir=os.path.join(workdir, "pretrain"), desc="pre-train")
    pre = tree_lib.index(pre, 0)
    params_K, hp = finetune_ingredients(config, splits, model, pre,
                                        os.path.join(workdir, "finetune"))
    rows, ind_val, ind_test = run_soups(config, splits, model, params_K, prefix="finetune")
    _, test_metrics = _scorers(model, splits, config.eval_batch_size)
    pre_test = test_metrics(tree_lib.broadcast(pre, 1))[0][0]["accuracy"]
    out["finetune"] = {"rows": rows, "pretrained_test_acc": pre_test,
                       "ingredients": [{**{n: np.asarray(v[i]).item() for n, v in hp.items()},
                                        "val_acc": float(ind_val[i]),
                                        "test_acc": ind_test[i]["accuracy"]}
                                       for i in range(len(ind_val))]}
    all_rows += rows
    md += [f"\n## Fine-tuned ingredients ({config.finetune.ingredients}, from one pre-trained "
           f"model: test acc {100 * pre_test:.2f})\n\n", _table(rows),
           "\n| # | lr | wd | epochs | shift | flip | val acc | test acc |\n"
           "|---|---|---|---|---|---|---|---|\n"]
    md += [f"| {i} | {g['lr']:.4f} | {g['weight_decay']:.1e} | {g['epochs']} | {g['shift']} | "
           f"{g['flip']} | {100 * g['val_acc']:.2f} | {100 * g['test_acc']:.2f} |\n"
           for i, g in enumerate(out["finetune"]["ingredients"])]

  if "scratch" in parts:
    sc = config.scratch
    params_K = train_scratch_or_pretrain(config, splits, model, num=sc.members, epochs=sc.epochs,
                                         lr=sc.learning_rate, wd=sc.weight_decay,
                                         seed=config.seed + 7,
                                         workdir=os.path.join(workdir, "scratch"),
                                         desc=f"{sc.members} from scratch")
    naive_rows, ind_val, _ = run_soups(config, splits, model, params_K, prefix="scratch")
    ref = int(np.nanargmax(ind_val))
    members_list = tree_lib.unstack(params_K)
    spec = align.mlp_permutation_spec(members_list[0])
    aligned = align.align_to_reference(jax.random.key(config.seed), spec, members_list[ref],
                                       members_list, max_iter=sc.max_iter)
    aligned_rows, _, _ = run_soups(config, splits, model, tree_lib.stack(aligned),
                                   prefix="scratch_aligned")
    all_rows += naive_rows + aligned_rows
    # barrier between the reference and another member, naive vs aligned
    other = (ref + 1) % len(members_list)
    apply = jax.jit(model.apply)
    xt, yt = jnp.asarray(splits.x_test), jnp.asarray(splits.y_test)

    def test_eval(p):
      logits = apply({"params": p}, xt).logits
      return {"loss": float(losses.softmax_cross_entropy(logits, yt)),
              "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == yt))}

    alphas = np.linspace(0, 1, int(sc.alphas))
    curves = {name: align.interpolation_curve(test_eval, members_list[ref], b, alphas)
              for name, b in (("naive", members_list[other]), ("aligned", aligned[other]))}
    barriers = {name: {"loss": align.barrier(c["loss"], alphas),
                       "accuracy": align.barrier(c["accuracy"], alphas, higher_is_better=True)}
                for name, c in curves.items()}
    for m in ("loss", "accuracy"):
      report.plot_curve(os.path.join(workdir, f"barrier_{m}.png"), alphas,
                        {n: c[m] for n, c in curves.items()}, xlabel="alpha",
                        ylabel=f"test {m}",
                        title=f"member {ref} -> member {other}, naive vs weight-matched")
    out["scratch"] = {"reference": ref, "other": other, "naive_rows": naive_rows,
                      "aligned_rows": aligned_rows, "alphas": alphas.tolist(),
                      "curves": {n: {m: v.tolist() for m, v in c.items()}
                                 for n, c in curves.items()},
                      "barriers": barriers}
    md += [f"\n## {sc.members} models trained from scratch (different seeds)\n\n"
           "Naive soups:\n\n", _table(naive_rows),
           f"\nAfter weight matching every member to member {ref} (best on val):\n\n",
           _table(aligned_rows),
           f"\nBarrier between members {ref} and {other} (test, {len(alphas)} alphas): "
           f"naive loss {barriers['naive']['loss']:.3f} / accuracy "
           f"{100 * barriers['naive']['accuracy']:.2f} pts; aligned loss "
           f"{barriers['aligned']['loss']:.3f} / accuracy "
           f"{100 * barriers['aligned']['accuracy']:.2f} pts.\n"]

  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in all_rows:
      f.write(json.dumps(r, default=report._to_builtin) + "\n")
  report.write_json(os.path.join(workdir, "results.json"), out)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("".join(md))
  return out
