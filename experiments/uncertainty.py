"""Uncertainty baselines in one table (configs/uncertainty.py): eleven methods, one MLP.

Every method trains `config.epochs` epochs in `workdir/<method>/` (reruns resume); a row is
its prediction (members / samples / snapshots averaged) on the test split, `auroc_<set>` its
predictive entropy's AUROC against an OOD set. Costs are relative to the single model
(training FLOPs: XLA's forward count on the training batch x steps; backward ~ 2 forwards).
"""

import functools
import os
import time

import jax
import numpy as np

from ensembling import configlib, data, distill, members, report, swag, train, trajectory
from ensembling.data import images, shifts
from ensembling.models import MLP, as_model, batchensemble as be, mimo, packed


def validate(config):
  if (config.model.name != "mlp" or config.model.get("batch_norm", False) or not config.data.dir
      or config.data.name not in ("fashion_mnist", "fashion-mnist", "mnist")):
    raise ValueError("experiments/uncertainty.py runs the plain MLP (no BatchNorm: MC dropout "
                     "samples in training mode) on 28x28 IDX data (fashion_mnist or mnist, "
                     "data.dir), the shape of its OOD sets.")


def _ood_sets(config, splits, n):
  """OOD inputs in the training split's standardisation, checked to match its shape."""
  o, fname = config.ood, images.IDX_FILES["test_images"]
  read = lambda d: images.read_idx(os.path.join(d, fname), expect_magic=2051)[:n, ..., None] / 255.
  raw = read(config.data.dir).astype(np.float32)
  a, b = np.polyfit(raw[:100].ravel(), splits.x_test[:100].ravel(), 1)  # x = (raw - mu) / sd
  std = lambda r: (r * a + b).astype(np.float32)
  if np.abs(std(raw[:100]) - splits.x_test[:100]).max() > 1e-3:
    raise ValueError(f"{config.data.dir}'s test images are not the loaded test split.")
  sets = {"digits": std(shifts.digits_28x28(border=o.digits_border)[:n]),
          f"rotate{o.rotate:g}": std(shifts.rotate(raw, o.rotate)),
          f"noise{o.noise_std:g}": std(shifts.gaussian_noise(config.seed, raw, o.noise_std,
                                                             clip=(0, 1))),
          f"contrast{o.contrast:g}": std(shifts.contrast(raw, o.contrast))}
  extra = read(o.dir) if o.dir else raw
  if extra.shape[1:] != splits.x_train.shape[1:]:
    raise ValueError(f"OOD set {o.dir!r} has inputs of shape {extra.shape[1:]}, the training "
                     f"data {splits.x_train.shape[1:]}: the models cannot score it.")
  return {**sets, **({o.name or os.path.basename(os.path.normpath(o.dir)): std(extra)}
                     if o.dir else {})}


def _fwd(model, variables, xs):
  """XLA's FLOP count of one forward pass of `model` on the batch `xs`."""
  fn = jax.jit(lambda v, xb: as_model(model).apply(v, xb)[0].logits)
  return float(fn.lower(members.variables_of(variables), xs).compile().cost_analysis()["flops"])


def run(config, workdir: str):
  splits = configlib.load_data(config)
  x, y, u, c = splits.x_train, splits.y_train, config.uq, splits.num_classes
  n = int(config.ood.limit) or len(splits.x_test)
  sets = {"test": splits.x_test[:n], **_ood_sets(config, splits, n)}
  bs, e, seed, k = int(config.batch_size), int(config.epochs), int(config.seed), int(config.members)
  spe = data.num_steps_per_epoch(len(x), bs)                  # steps per epoch
  sched = configlib.schedule_from_config(config.optim, total_steps=spe * e)
  opt = lambda s: configlib.optimizer_from_config(config.optim, schedule=s)
  tx, widths, wd = opt(sched), tuple(config.model.widths), lambda m: os.path.join(workdir, m)
  base, xb, first = MLP(widths=widths, num_classes=c), x[:bs], lambda t: jax.tree.map(
      lambda a: a[0], t)
  kw = dict(batch_size=bs, seed=seed, progress=bool(config.progress),
            checkpoint_every=int(config.checkpoint_every_steps))
  predict = lambda model, v: functools.partial(members.predict, model, v)
  methods = {}  # name: (x -> (K, N, C) logits, seconds, train FLOPs x, passes, test FLOPs x)

  v0 = members.init_members(jax.random.key(seed), base, xb[:1], 1)  # = every K = 1 run's init
  def deep(model, name, num, init=None):
    res = train.train_members(model, x, y, num_members=num, tx=tx, epochs=e, workdir=wd(name),
                              schedule=sched, strategy=config.members_strategy,
                              init_variables=init, **kw)
    return res, predict(model, res.state)
  res, single = deep(base, "single", 1, v0)
  f1 = _fwd(base, first(res.state), xb)                        # one model on one batch
  methods["single model"] = (single, res.seconds, 1, 1, 1)
  ens_res, ens = deep(base, "deep_ensemble", k)
  methods[f"deep ensemble ({k})"] = (ens, ens_res.seconds, k, k, k)
  drop, s = MLP(widths=widths, num_classes=c, dropout=float(u.mc_dropout)), int(u.mc_samples)
  res, _ = deep(drop, "mc_dropout", 1, v0)            # dropout adds no parameters
  v, keys = members.variables_of(first(res.state)), jax.random.split(jax.random.key(seed + 7), s)
  mc = jax.jit(jax.vmap(lambda kk, xs: as_model(drop).apply(v, xs, train=True, key=kk)[0].logits,
                        (0, None)))                      # S dropout masks, one pass each
  methods[f"MC dropout ({s} passes)"] = (lambda xs: np.asarray(mc(keys, xs)), res.seconds, 1, s, s)
  sw = swag.fit(base, configlib.trajectory_plan("swa", config, spe), x, y, rank=int(u.swag_rank),
                optimizer=opt, workdir=wd("swag"), init_variables=v0, **kw)
  st, s = swag.run_state(sw.swag, 0), int(u.swag_samples)
  methods["SWA"] = (predict(base, {"params": jax.tree.map(lambda a: a[None], st["mean"])}),
                    sw.seconds, 1, 1, 1)
  methods[f"SWAG ({s} samples)"] = (predict(base, {"params": swag.sample(
      jax.random.key(seed + 3), st, num_samples=s, rank=int(u.swag_rank),
      scale=float(u.swag_scale))}), sw.seconds, 1, s, s)
  for method, label in (("snapshot", "SSE"), ("fge", "FGE")):
    t0 = time.perf_counter()
    tr = trajectory.fit(base, configlib.trajectory_plan(method, config, spe), x, y,
                        optimizer=opt, num_runs=1, workdir=wd(method), **kw)
    m = len(tr.plan.snapshot_steps)
    methods[f"{label} ({m} snapshots)"] = (predict(base, first(tr.snapshots)),
                                           time.perf_counter() - t0, 1, m, m)
  def one_model(name, model, x0, step, predict_fn, *, k_batches=None, rows=1):  # x0: bs inputs
    state = members.init_state(jax.jit(as_model(model).init)(jax.random.key(seed), x0), tx)
    batch_fn, _ = train.make_batch_fn(x, y, seed=seed, batch_size=bs, num_members=k_batches)
    t0 = time.perf_counter()
    state, _, _ = train.fit(state, step_fn=jax.jit(functools.partial(step, model=model, tx=tx)),
                            batch_fn=batch_fn, num_steps=spe * e, key=jax.random.key(seed + 1),
                            workdir=wd(name.split()[0]), progress=kw["progress"], desc=name,
                            checkpoint_every=kw["checkpoint_every"] or spe, schedule=sched)
    fwd = _fwd(model, state, x0) / f1
    methods[name] = (functools.partial(predict_fn, model, state), time.perf_counter() - t0,
                     rows * fwd, 1, fwd)

  kb, km, kp, r = u.be_members, u.mimo_members, u.packed_estimators, u.mimo_batch_repetitions
  one_model(f"BatchEnsemble ({kb})", be.BatchEnsembleMLP(widths, c, kb),
            be.repeat_batch(xb, num_members=kb), be.train_step, be.predict, k_batches=kb)
  one_model(f"MIMO ({km})", mimo.MIMOMLP(widths, c, km), mimo.repeat_input(xb, num_members=km),
            functools.partial(mimo.train_step, repeat_prob=float(u.mimo_repeat_prob),
                              batch_repetitions=r), mimo.predict, rows=r)
  one_model(f"Packed-Ensemble ({kp}, alpha={u.packed_alpha:g})",
            packed.PackedMLP(widths, c, kp, float(u.packed_alpha), int(u.packed_gamma)), xb,
            packed.train_step, packed.predict)
  t, t0 = float(u.distill_temperature), time.perf_counter()
  q = distill.teacher_probs(ens(x), temperature=t)     # the teacher's labels: k forward passes
  stu = distill.fit_student(base, x, q, tx=tx, epochs=e, temperature=t, workdir=wd("student"),
                            schedule=sched, **kw)
  methods[student := f"distilled student (T={t:g})"] = (  # cost: + the teacher's
      predict(base, jax.tree.map(lambda a: a[None], stu.state)),
      time.perf_counter() - t0 + ens_res.seconds, k + 1 + k / (3 * e), 1, 1)
  rows, ood, t1 = {}, {}, methods["single model"][1]
  for name, (fn, secs, train_x, passes, infer_x) in methods.items():
    lg = {s: fn(xs) for s, xs in sets.items()}
    rep = report.ensemble_report(lg.pop("test"), splits.y_test[:n], ood_logits=lg)
    rows[name], ood[name] = {**rep["ensemble"], "train_s": secs, "train_time_x": secs / t1,
                             "train_flops_x": float(train_x), "passes": passes,
                             "infer_flops_x": float(infer_x)}, rep["ood"]
  gain = distill.gain_retained(rows["single model"], rows[student], rows[f"deep ensemble ({k})"],
                               names=("nll", "ece", "accuracy"))
  cols = ["accuracy", "nll", "ece", "brier", *(f"auroc_{s}" for s in list(sets)[1:]), "train_s",
          "train_time_x", "train_flops_x", "passes", "infer_flops_x"]
  md = (f"# Uncertainty baselines: MLP {widths} on {splits.name}, {e} epochs, {len(x)} training "
        f"images, test n={n}\n\n" + report.markdown_table(list(rows.items()), cols, digits=3)
        + "\nDistilled student, gain retained (single - student) / (single - ensemble): "
        + ", ".join(f"{m} {v:.2f}" for m, v in gain.items()) + "\n")
  return {"data": splits.describe(), "rows": rows, "ood": ood, "gain_retained": gain,
          "sets": {s: list(xs.shape) for s, xs in sets.items()}}, md
