"""BatchNorm recalibration of K stacked models: per-batch cost of each member strategy.

    python benchmarks/recalibration.py --arch cnn --models 12 --batches 8

`averaging.recompute_batch_stats(..., stacked=True, strategy=S)` recomputes K models'
statistics on one pass over shared batches (what `trajectory.evaluate` does for every
snapshot ensemble, e.g. 3 seeds x 4 snapshots = 12 thesis CNNs over 430 batches of
Fashion-MNIST). For each strategy S the script times one call over `--batches` batches
and one over a single batch (both compile the same programs) and reports the difference
per extra batch, so compilation is excluded; `ratio` is vmap's time over S's (> 1: S is
faster). Random inputs of Fashion-MNIST's shape. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ensembling import averaging, members  # noqa: E402
from ensembling.models import CNN, MLP  # noqa: E402


def _seconds(model, variables, x, batch_size, num_batches, strategy):
  batches = [x[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
  t = time.perf_counter()
  out = averaging.recompute_batch_stats(model, variables, batches, stacked=True,
                                        key=jax.random.key(1), strategy=strategy)
  jax.block_until_ready(out["batch_stats"])
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--arch", default="cnn", choices=["mlp", "cnn"])
  p.add_argument("--models", type=int, default=12, help="K stacked models")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--batches", type=int, default=8, help="batches of the timed pass")
  p.add_argument("--strategies", default="vmap,unroll,loop")
  a = p.parse_args()

  model = (CNN(num_classes=10) if a.arch == "cnn" else
           MLP(widths=(256, 256), num_classes=10, batch_norm=True))
  x = np.random.default_rng(0).normal(
      size=(a.batches * a.batch_size, 28, 28, 1)).astype(np.float32)
  variables = members.init_members(jax.random.key(0), model, x[:1], a.models)
  per_batch = {}
  for s in a.strategies.split(","):
    one = _seconds(model, variables, x, a.batch_size, 1, s)
    full = _seconds(model, variables, x, a.batch_size, a.batches, s)
    per_batch[s] = (full - one) / (a.batches - 1)
  out = {"arch": a.arch, "models": a.models, "batch_size": a.batch_size,
         "auto": members.resolve_strategy("auto", variables["params"]),
         "seconds_per_batch": {s: round(t, 4) for s, t in per_batch.items()}}
  if "vmap" in per_batch:
    out["ratio"] = {s: round(per_batch["vmap"] / t, 2) for s, t in per_batch.items()}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
