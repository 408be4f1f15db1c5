"""Time of one SimCSE step on CPU per dropout PRNG implementation (and K members vmapped).

    python benchmarks/simcse_prng.py                       # all-MiniLM-L6-v2 if installed
    python benchmarks/simcse_prng.py --model=tiny --steps=5
    python benchmarks/simcse_prng.py --batch_size=16 --trainable='^layer_[45]/' \
        --members=3 --strategies=vmap,loop --impls=threefry2x32

Prints one JSON object per (prng_impl, members, strategy) with the median step time in
seconds (strategy: members.over_members; "loop" = one jitted member step per member).

The PRNG is chosen per key (`jax.random.key(seed, impl=...)`), as `config.prng_impl`
chooses it for the dropout keys of `experiments/simcse_sts.py` (`text.fit_simcse(key=...)`);
nothing global (`jax_default_prng_impl`) is changed.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ensembling import losses, members, optim, text  # noqa: E402
from ensembling.models import bert  # noqa: E402


def tiny_model_dir(tmp):
  cfg = bert.BertConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
  v = bert.Bert(cfg).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32), train=False)
  bert.save_pretrained(tmp, v, cfg)
  return tmp


def time_masks(a):
  """Bernoulli draws of one SimCSE step of all-MiniLM-L6-v2 (2B sequences): the hidden
  dropouts (embeddings + 2 per layer, hidden 384) and attention-probability dropout
  (12 heads, 6 layers), timed alone per PRNG implementation."""
  seqs, l = 2 * a.batch_size, a.max_length
  n = seqs * l * (384 * 13 + 12 * l * 6)
  for impl in a.impls.split(","):
    f = jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (n,)).sum())
    key = jax.random.key(0, impl=impl)
    jax.block_until_ready(f(key))
    times = []
    for s in range(a.steps):
      t0 = time.time()
      jax.block_until_ready(f(jax.random.fold_in(key, s)))
      times.append(time.time() - t0)
    print(json.dumps({"what": "dropout masks only", "prng_impl": impl, "draws": n,
                      "median_s": round(float(np.median(times)), 4)}), flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="minilm", help="minilm | tiny | a model folder")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_length", type=int, default=32)
  p.add_argument("--members", default="1,3")
  p.add_argument("--impls", default="threefry2x32,rbg,unsafe_rbg")
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--strategies", default="vmap")
  p.add_argument("--trainable", default="", help="comma-separated regexes; empty: all")
  p.add_argument("--masks_only", action="store_true",
                 help="time only the dropout masks one step draws (per impl), no model step")
  a = p.parse_args()
  if a.masks_only:
    return time_masks(a)
  tmp = tempfile.mkdtemp()
  path = tiny_model_dir(tmp) if a.model == "tiny" else bert.resolve_model_path(a.model)
  cfg = bert.bert_config_from_dir(path)
  model = bert.Bert(cfg, pooling="mean")
  params = (bert.load_pretrained_params(path, cfg) if a.model != "tiny" else
            model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32), train=False))
  rng = np.random.default_rng(0)
  ids = rng.integers(1000 % cfg.vocab_size, cfg.vocab_size, (a.batch_size, a.max_length),
                     dtype=np.int32)
  ids[:, 0] = 1
  patterns = [t for t in a.trainable.split(",") if t]
  tx, mask = optax.adamw(1e-5), None
  if patterns:  # frozen leaves: zero updates, no optimizer state, no gradient work
    mask = optim.trainable_mask(params["params"], patterns)
    tx = optim.freeze(tx, params["params"], trainable=mask)
  for k, strategy in [(int(k), s) for k in a.members.split(",") for s in a.strategies.split(",")]:
    state = members.init_states(jax.tree.map(lambda x: jnp.stack([x] * k), params), tx)
    batch = {"a": jnp.asarray(np.stack([ids] * k)), "b": jnp.asarray(np.stack([ids] * k))}
    step = members.ensemble_step(model=model, tx=tx, num_members=k, strategy=strategy,
                                 step_fn=functools.partial(text.simcse_step, trainable=mask),
                                 loss_fn=functools.partial(losses.info_nce, temperature=0.05))
    for impl in a.impls.split(","):
      keys = jax.random.split(jax.random.key(0, impl=impl), k)
      t0 = time.time()
      state, m = step(state, batch, members.step_keys(keys, 0))
      jax.block_until_ready(m)
      compile_s = time.time() - t0
      times = []
      for s in range(1, a.steps + 1):
        t0 = time.time()
        state, m = step(state, batch, members.step_keys(keys, s))
        jax.block_until_ready(m)
        times.append(time.time() - t0)
      print(json.dumps({"model": a.model, "prng_impl": impl, "members": k, "strategy": strategy,
                        "trainable": a.trainable or "all",
                        "batch_size": a.batch_size, "max_length": a.max_length,
                        "median_step_s": round(float(np.median(times)), 4),
                        "per_member_step_s": round(float(np.median(times)) / k, 4),
                        "first_step_s": round(compile_s, 2), "steps": a.steps,
                        "loss": float(np.mean(m["loss"]))}), flush=True)


if __name__ == "__main__":
  main()
