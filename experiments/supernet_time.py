"""Wall-clock time to a validation accuracy (seed 003, Tables 10 and 11).

Two arms, trained epoch by epoch with a constant learning rate on this machine:
- single: one network (`config.timing.single`);
- SuperNet: `config.timing.sub_members` sub-networks (`config.timing.sub`) trained at
  once; after every epoch the SuperNet is built from them (features cached for train and
  validation, head trained for `config.supernet.head_epochs` epochs).

An epoch is `supernet.timed_epoch` (`train.fit` continuing in memory; the first step's
compilation is an untimed call of its own). Reported time = training seconds (evaluation
excluded) and, for the SuperNet, plus the seconds of the build whose head first reaches
the target (compiled beforehand by an untimed warm-up build; all builds are also summed):
`supernet.clock` and `supernet.time_to_accuracy`. Each arm stops at the highest target.
"""

import os
import time

import jax
import numpy as np

from ensembling import configlib, ensemble, members, metrics, report, supernet, train
from ensembling import tree as tree_lib


def _arm(config, splits, block, k, seed):
  """(model, state, step, batch_fn, steps per epoch) of K members of `block`."""
  model = configlib.model_from_config(block, num_classes=splits.num_classes)
  batch_fn, spe = train.make_batch_fn(splits.x_train, splits.y_train, seed=seed,
                                      batch_size=int(config.batch_size), num_members=k)
  tx = configlib.optimizer_from_config(config.optim, schedule=configlib.schedule_from_config(
      config.optim, total_steps=spe * int(config.timing.max_epochs)))
  state = train.init_member_state(model, splits.x_train[:1], num_members=k, tx=tx, seed=seed,
                                  lr_scale=configlib._plain(config.optim.lr_scale),
                                  weight_decay=configlib._plain(config.optim.weight_decay))
  step = members.ensemble_step(model=model, tx=tx, num_members=k,
                               strategy=config.members_strategy, donate=True)
  return model, state, step, batch_fn, spe


def _timed(config, arm, seed, evaluate):
  """Trains an arm epoch by epoch until the highest target: its clocked curve and state."""
  model, state, step, batch_fn, spe = arm
  records = []
  for epoch in range(int(config.timing.max_epochs)):
    state, secs, first = supernet.timed_epoch(state, step_fn=step, batch_fn=batch_fn,
                                              epoch=epoch, steps_per_epoch=spe,
                                              key=jax.random.key(seed + 1))
    records.append({"epoch": epoch + 1, "train_seconds": secs, "compile_seconds": first,
                    **evaluate(state)})
    if records[-1]["val_accuracy"] >= max(config.timing.targets):
      break
  curve = supernet.clock(records)
  return {"curve": curve, "time_to": supernet.time_to_accuracy(curve, config.timing.targets)}, state


def run(config, workdir: str):
  tc, sc = config.timing, config.supernet
  splits = configlib.load_data(config)
  x_val, y_val = splits.x_val, splits.y_val
  res = {"data": splits.describe(), "targets": list(tc.targets)}

  arm = _arm(config, splits, tc.single, 1, int(config.seed))
  single = lambda s: {n: float(v[0]) for n, v in train.evaluate_members(
      arm[0], s, x_val, y_val, strategy=arm[2].resolve(s["params"]),
      batch_size=config.eval_batch_size).items()}
  res["single"], state = _timed(config, arm, int(config.seed),
                                lambda s: {f"val_{n}": v for n, v in single(s).items()})
  res["single"]["params"] = tree_lib.count_params(state["params"])

  k = int(tc.sub_members)
  model, state0, step, _, _ = arm = _arm(config, splits, tc.sub, k, int(config.seed) + 100)
  tx = configlib.head_optimizer_from_config(sc, num_examples=len(splits.y_train))

  def build(state):
    variables = members.variables_of(state)
    cache = supernet.cache_features(model, variables, {"train": splits.x_train, "val": x_val},
                                    batch_size=config.eval_batch_size,
                                    strategy=step.resolve(state["params"]))
    cache["train"]["y"], cache["val"]["y"] = splits.y_train, y_val
    head, _ = supernet.train_head(
        cache, supernet.member_heads(variables["params"]), num_members=k, init=sc.head_init,
        tx=tx, epochs=int(sc.head_epochs), batch_size=int(sc.head_batch_size),
        seed=int(config.seed), key=jax.random.key(0), l2=float(sc.head_l2),
        scale=sc.head_scale or None, dropout=float(sc.head_dropout), eval_splits=())
    return cache, head

  def evaluate(state):
    t0 = time.perf_counter()
    cache, head = build(state)
    build_seconds = time.perf_counter() - t0
    probs, logits = supernet.head_probs(head, cache["val"]["features"]), cache["val"]["logits"]
    return {"build_seconds": build_seconds, "val_accuracy": metrics.accuracy(probs, y_val),
            "val_nll": metrics.nll(probs, y_val),
            "softmax_voting_val_accuracy": metrics.accuracy(
                np.asarray(ensemble.average_probs(logits)), y_val),
            "member_val_accuracy": [metrics.accuracy(p, y_val)
                                    for p in ensemble.members_probs(logits)]}

  t0 = time.perf_counter()
  build(state0)  # untimed warm-up: compiles the feature and head functions
  res["supernet_build_compile_seconds"] = time.perf_counter() - t0
  res["supernet"], _ = _timed(config, arm, int(config.seed) + 100, evaluate)
  res["supernet"]["sub_members"] = k
  res["supernet"]["params"] = tree_lib.count_params(state0["params"])
  report.plot_curve(os.path.join(workdir, "val_accuracy_vs_time.png"),
                    [r["seconds"] for r in res["single"]["curve"]],
                    {"single": [r["val_accuracy"] for r in res["single"]["curve"]]},
                    xlabel="seconds", ylabel="val accuracy")
  return res, markdown(res, config)


def _shape(block) -> str:
  return "-".join(map(str, configlib.model_sizes(block)))


def markdown(res, config) -> str:
  tc = config.timing
  hit = lambda arm, t: ["-", "not reached"] if res[arm]["time_to"][str(t)] is None else [
      res[arm]["time_to"][str(t)]["epoch"], f"{res[arm]['time_to'][str(t)]['seconds']:.0f}"]
  curves = [res["single"]["curve"], res["supernet"]["curve"]]
  at = lambda c, i, f: (f(c[i]) if i < len(c) else ["-"] * len(f(c[0])))
  return (f"# Time to validation accuracy on {res['data']}\n\n"
          f"single: {tc.single.name} {_shape(tc.single)} ({res['single']['params']:,} params); "
          f"SuperNet: {res['supernet']['sub_members']} x {tc.sub.name} {_shape(tc.sub)} "
          f"({res['supernet']['params']:,} params in all), head "
          f"{config.supernet.head_epochs} epochs. Seconds exclude evaluation and the first "
          "step's compilation; this is a shared CPU, so they are noisy.\n\n"
          + report.cells_table(
              ["target", "single: epoch", "single: seconds", "SuperNet: epoch",
               "SuperNet: seconds"],
              [[str(t), *hit("single", t), *hit("supernet", t)] for t in tc.targets])
          + "\n" + report.cells_table(
              ["epoch", "single val acc", "single s", "SuperNet val acc",
               "softmax voting val acc", "SuperNet s (members + this build)"],
              [[i + 1, *at(curves[0], i, lambda r: [r["val_accuracy"], f"{r['seconds']:.0f}"]),
                *at(curves[1], i, lambda r: [r["val_accuracy"], r["softmax_voting_val_accuracy"],
                                             f"{r['seconds']:.0f}"])]
               for i in range(max(map(len, curves)))]))
