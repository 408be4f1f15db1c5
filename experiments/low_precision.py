"""Low-precision ensembling (Nam & Lee 2024): FP32 vs RTN vs LPE-BSR members of one model.

`configlib.train_members_from_config` trains the FP32 model; `low_precision.rtn` and
`low_precision.members` quantise it; `members.predict` evaluates the M members in one
member-parallel pass. This file maps configs/low_precision.py onto them and writes
low_precision.png (training log: workdir/train/).
"""

import os

import jax
import numpy as np

from ensembling import configlib, ensemble, low_precision, members, metrics, report
from ensembling import tree as tree_lib


def validate(config):
  for b in config.lpe.bits:
    low_precision.check_bits(b)
  if not config.lpe.ensemble_sizes or min(config.lpe.ensemble_sizes) < 1:
    raise ValueError(f"lpe.ensemble_sizes must be integers >= 1, got {config.lpe.ensemble_sizes}.")


def _row(method, bits, m, logits_MxNxC, y, mem):
  probs = np.asarray(ensemble.average_probs(logits_MxNxC))
  return dict(method=method, bits=bits, members=m, memory_bits=mem, total_bits=mem * m,
              ambiguity=low_precision.ambiguity(logits_MxNxC, y) if m > 1 else 0.0,
              **metrics.classification_metrics(probs, y))


def run(config, workdir: str):
  splits = configlib.load_data(config)
  lp, y = config.lpe, splits.y_test
  keep = tuple(lp.keep)
  model, res = configlib.train_members_from_config(config, splits, os.path.join(workdir, "train"),
                                                   desc="FP32 model")
  fp32 = tree_lib.index(members.variables_of(res.state), 0)
  params, stats = fp32["params"], fp32.get("batch_stats")

  def predict(params_M):  # the M members in one member-parallel pass
    v = {"params": params_M}
    if stats:
      v["batch_stats"] = tree_lib.broadcast(stats, tree_lib.num_members(params_M))
    return members.predict(model, v, splits.x_test, batch_size=int(config.eval_batch_size),
                           strategy=config.members_strategy)

  rows = [_row("FP32", 32, 1, predict(tree_lib.broadcast(params, 1)), y,
               low_precision.memory_bits(params, bits=None))]
  sizes, key = sorted(int(m) for m in lp.ensemble_sizes), jax.random.key(int(lp.seed))
  for b in lp.bits:
    mem = low_precision.memory_bits(params, bits=int(b), keep=keep)
    rows.append(_row("RTN", int(b), 1, predict(tree_lib.broadcast(
        low_precision.rtn(params, bits=int(b), keep=keep), 1)), y, mem))
    logits = predict(low_precision.members(jax.random.fold_in(key, int(b)), params,
                                           num_members=sizes[-1], bits=int(b), keep=keep))
    singles = [_row("BSR", int(b), 1, logits[i:i + 1], y, mem) for i in range(len(logits))]
    rows.append({**{k: float(np.mean([s[k] for s in singles])) for k in singles[0]
                    if k not in ("method", "bits", "members")},
                 "method": "BSR single member (mean)", "bits": int(b), "members": 1})
    rows += [_row("LPE-BSR", int(b), m, logits[:m], y, mem) for m in sizes]
  bits = [int(b) for b in lp.bits]
  pick = lambda method, m, k: [next(r[k] for r in rows if r["method"] == method and r["bits"] == b
                                    and r["members"] == m) for b in bits]
  report.plot_panels(os.path.join(workdir, "low_precision.png"), bits, {
      f"test {k}": {"FP32": [rows[0][k]] * len(bits), "RTN": pick("RTN", 1, k),
                    **{f"LPE-BSR M={m}": pick("LPE-BSR", m, k) for m in sizes}}
      for k in ("nll", "accuracy")}, xlabel="bits", title="one FP32 CNN, quantised")
  gains = {b: r - l for b, r, l in zip(bits, pick("RTN", 1, "nll"),
                                       pick("LPE-BSR", sizes[-1], "nll"))}
  table = report.cells_table(
      ["method", "bits", "M", "memory / member (kbit)", "acc", "NLL", "ECE", "ambiguity"],
      [[r["method"], r["bits"], r["members"], f"{r['memory_bits'] / 1e3:.1f}",
        f"{100 * r['accuracy']:.2f}", f"{r['nll']:.4f}", f"{r['ece']:.4f}",
        f"{r['ambiguity']:.4f}"] for r in rows])
  layers = configlib.model_sizes(config.model)
  markdown = (f"# Low-precision ensembling: {config.model.name} {layers} on "
              f"{splits.name} ({config.epochs} epochs, {len(splits.x_train)} training images), "
              f"test split\n\n" + table + f"\nNLL gain of LPE-BSR (M={sizes[-1]}) over RTN at "
              "equal bits: " + ", ".join(f"{b} bits {g:+.4f}" for b, g in gains.items()) + "\n")
  return {"data": splits.describe(), "rows": rows, "nll_gain_over_rtn": gains}, markdown
