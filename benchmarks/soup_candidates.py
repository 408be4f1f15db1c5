"""Batched (vmapped) vs sequential evaluation of candidate soups, 16 ingredients.

    python benchmarks/soup_candidates.py                 # MLP 784-512-512-10, 2000 val examples
    python benchmarks/soup_candidates.py --ingredients=16 --examples=5000 --repeats=5

Prints one JSON object: seconds per pass of K candidate soups (each the uniform soup of
K-1 ingredients, as in one pruned-soup pass), evaluated (a) together, with `eval_fn`
vmapped over the candidates' mixing weights in one jitted call, and (b) one after
another with a jitted single-candidate function; plus end-to-end greedy / pruned soup
times with `evaluation="vmap"` vs `"loop"`. Compilation is excluded (one warm-up).
Ingredients are random perturbations of one random network, data are random: only
timing is measured.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ensembling import models, soups  # noqa: E402
from ensembling import tree as tree_lib  # noqa: E402


def _median_time(fn, repeats):
  fn()  # warm-up / compile
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts)), [round(t, 4) for t in ts]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--ingredients", type=int, default=16)
  ap.add_argument("--examples", type=int, default=2000)
  ap.add_argument("--widths", type=str, default="512,512")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  k = args.ingredients
  model = models.MLP(widths=tuple(int(w) for w in args.widths.split(",")), num_classes=10)
  x = jax.random.normal(jax.random.key(0), (args.examples, 784))
  y = jax.random.randint(jax.random.key(1), (args.examples,), 0, 10)
  base = model.init(jax.random.key(2), x[:1])["params"]
  keys = jax.random.split(jax.random.key(3), k)
  params_K = jax.vmap(lambda kk: jax.tree.map(
      lambda p: p + 0.01 * jax.random.normal(kk, p.shape), base))(keys)

  def eval_fn(p):
    return jnp.mean(jnp.argmax(model.apply({"params": p}, x).logits, -1) == y)

  w = np.ones((k, k), np.float32) - np.eye(k, dtype=np.float32)
  w /= w.sum(1, keepdims=True)  # candidate c: uniform soup without ingredient c
  w = jnp.asarray(w)
  batched = jax.jit(lambda s, ww: jax.vmap(lambda r: eval_fn(tree_lib.weighted_sum(s, r)))(ww))
  single = jax.jit(lambda s, r: eval_fn(tree_lib.weighted_sum(s, r)))
  t_b, raw_b = _median_time(lambda: batched(params_K, w), args.repeats)
  t_s, raw_s = _median_time(lambda: jnp.stack([single(params_K, w[c]) for c in range(k)]),
                            args.repeats)
  np.testing.assert_allclose(batched(params_K, w),
                             jnp.stack([single(params_K, w[c]) for c in range(k)]), atol=1e-6)
  e2e = {}
  for name, fn in (("greedy_sorted", lambda ev, mode: soups.greedy_soup(
      params_K, ev, evaluation=mode)), ("pruned_sorted_3_passes", lambda ev, mode: soups.pruned_soup(
          params_K, ev, passes=3, evaluation=mode))):
    tv, _ = _median_time(lambda: fn(eval_fn, "vmap").score, args.repeats)
    tl, _ = _median_time(lambda: fn(eval_fn, "loop").score, args.repeats)
    r_v, r_l = fn(eval_fn, "vmap"), fn(eval_fn, "loop")
    assert r_v.indices == r_l.indices
    e2e[name] = {"vmap_s": round(tv, 4), "loop_s": round(tl, 4), "speedup": round(tl / tv, 2),
                 "candidates_evaluated": len(r_v.history),
                 "vmap_calls": r_v.info["eval_calls"], "loop_calls": r_l.info["eval_calls"]}
  print(json.dumps({
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "ingredients": k, "examples": args.examples, "model": f"MLP 784-{args.widths}-10",
      "one_pass_of_K_candidates": {"batched_s": round(t_b, 4), "sequential_s": round(t_s, 4),
                                   "speedup": round(t_s / t_b, 2), "batched_raw": raw_b,
                                   "sequential_raw": raw_s},
      "end_to_end": e2e,
  }, indent=1))


if __name__ == "__main__":
  main()
