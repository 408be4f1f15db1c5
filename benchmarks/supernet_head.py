"""Per-epoch cost of SuperNet head training on cached features vs a full training epoch.

    nice -n 5 python benchmarks/supernet_head.py --members=6 --widths=200,466,466

Measures, on random data of Fashion-MNIST's shape (N x 28 x 28 x 1, 10 classes):
- `full_epoch_s`: one epoch of member-parallel training of K members (the time of
  `--steps` timed steps, extrapolated to N / batch_size steps);
- `cache_s`: computing all K members' features once (`supernet.cache_features`);
- `head_epoch_s`: one epoch of head training on the cached features (`fit_head`,
  median of `--head_epochs` epochs after a compiling one).
Prints one JSON object. Compilation is excluded everywhere.
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
import optax  # noqa: E402

from ensembling import members, optim, supernet  # noqa: E402
from ensembling.models import CNN, MLP  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--members", type=int, default=6)
  p.add_argument("--arch", default="mlp", choices=["mlp", "cnn"])
  p.add_argument("--widths", default="200,466,466")
  p.add_argument("--num_examples", type=int, default=55000)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=30, help="timed full-training steps")
  p.add_argument("--head_epochs", type=int, default=3, help="timed head epochs")
  a = p.parse_args()

  k, n, bs = a.members, a.num_examples, a.batch_size
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=n).astype(np.int32)
  if a.arch == "mlp":
    model = MLP(widths=tuple(int(w) for w in a.widths.split(",")), num_classes=10, dropout=0.2)
  else:
    model = CNN(num_classes=10)
  variables = members.init_members(jax.random.key(0), model, x[:1], k)
  tx = optim.make_optimizer(name="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
  state = members.init_states(variables, tx)
  strategy = members.resolve_strategy("auto", state["params"])
  step = members.ensemble_step(model=model, tx=tx, num_members=k, strategy=strategy)
  keys = members.member_keys(jax.random.key(1), k)
  idx = rng.integers(0, n, size=(a.steps + 1, k, bs))
  batch = lambda s: {"x": x[idx[s]], "y": y[idx[s]]}
  state, _ = step(state, batch(0), members.step_keys(keys, 0))
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for s in range(1, a.steps + 1):
    state, _ = step(state, batch(s), members.step_keys(keys, s))
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t0) / a.steps
  steps_per_epoch = n // bs

  v = members.variables_of(state)
  supernet.cache_features(model, v, {"warm": x[:1000]}, strategy=strategy)  # compile
  t0 = time.perf_counter()
  cache = supernet.cache_features(model, v, {"train": x}, strategy=strategy)["train"]
  cache_s = time.perf_counter() - t0

  f = cache["features"]
  head = supernet.init_head(jax.random.key(2), num_features=f.shape[1], num_classes=10)
  tx_head = optax.adam(1e-3)
  supernet.fit_head(head, f, y, tx=tx_head, epochs=1, batch_size=bs)  # compile
  epochs_s = []
  for e in range(a.head_epochs):  # one epoch per call: the same compiled epoch step
    t0 = time.perf_counter()
    head, _ = supernet.fit_head(head, f, y, tx=tx_head, epochs=1, batch_size=bs, seed=e)
    jax.block_until_ready(head)
    epochs_s.append(time.perf_counter() - t0)
  head_epoch_s = float(np.median(epochs_s))
  full_epoch_s = step_s * steps_per_epoch
  print(json.dumps({
      "arch": a.arch, "members": k, "num_examples": n, "batch_size": bs,
      "feature_dim": int(f.shape[1]), "strategy": strategy, "backend": jax.default_backend(),
      "full_step_s": step_s, "full_epoch_s": full_epoch_s, "cache_s": cache_s,
      "head_epoch_s": head_epoch_s, "speedup_per_epoch": full_epoch_s / head_epoch_s,
      "load_avg_1min": os.getloadavg()[0],
  }, indent=2))


if __name__ == "__main__":
  main()
