"""Peak memory of merging K large models (task arithmetic, TIES, DARE).

    python benchmarks/merging_memory.py [--params 104857600] [--leaves 4] [--k 4] \
        [--methods task_arithmetic,ties,ties_global,dare,dare_ties] [--density 0.2]

Each method runs in a fresh subprocess, so that its peak resident set size (VmHWM from
/proc/self/status) is its own. A child builds `base` and K models (base + small noise)
as float32 jax arrays, `--leaves` leaves of `--params / --leaves` entries each, records
its RSS, resets the peak where the kernel allows it (`/proc/self/clear_refs`), merges,
and reports the peak. Prints one JSON object: per method the input bytes ((K + 1) trees),
RSS before the inputs, with the inputs, the peak while merging, and
`peak_over_inputs` = (peak - RSS before the inputs) / input bytes (the goal is < 2),
`peak_rss_over_inputs` = peak / input bytes (the interpreter and jax included), and
`merge_extra_over_inputs` = (peak - RSS with the inputs) / input bytes (the output, 1/(K+1)
of the inputs, included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

METHODS = ("task_arithmetic", "ties", "ties_global", "dare", "dare_ties")


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(method: str, params: int, leaves: int, k: int, density: float) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from ensembling import merging

  jnp.zeros(1).block_until_ready()
  rss_start = _status("VmRSS")
  n = params // leaves
  rng = np.random.default_rng(0)
  base_np = [rng.standard_normal(n, dtype=np.float32) for _ in range(leaves)]
  base = {f"layer{j}": jnp.asarray(b) for j, b in enumerate(base_np)}
  models = []
  for _ in range(k):
    m = {}
    for j, b in enumerate(base_np):
      x = rng.standard_normal(n, dtype=np.float32)
      x *= 0.01
      x += b
      m[f"layer{j}"] = jnp.asarray(x)
      del x
    models.append(m)
  del base_np
  jax.block_until_ready((base, models))
  input_bytes = (k + 1) * leaves * n * 4
  rss_inputs = _status("VmRSS")
  reset = _reset_peak()
  hwm_before = _status("VmHWM")
  t0 = time.perf_counter()
  if method == "task_arithmetic":
    out = merging.task_arithmetic(base, models, scale=1.0 / k)
  elif method == "ties":
    out = merging.ties(base, models, density=density)
  elif method == "ties_global":
    out = merging.ties(base, models, density=density, trim="global")
  elif method == "dare":
    out = merging.dare(jax.random.key(0), base, models, density=density, scale=1.0 / k)
  elif method == "dare_ties":
    out = merging.dare(jax.random.key(0), base, models, density=density, sign_election=True)
  else:
    raise ValueError(method)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - t0
  peak = _status("VmHWM")
  return {
      "method": method, "k": k, "params_per_model": leaves * n, "leaves": leaves,
      "density": density, "input_bytes": input_bytes, "rss_start": rss_start,
      "rss_with_inputs": rss_inputs, "peak_rss": peak, "peak_reset": reset,
      "hwm_at_merge_start": hwm_before,
      "peak_over_inputs": (peak - rss_start) / input_bytes,
      "peak_rss_over_inputs": peak / input_bytes,
      "merge_extra_over_inputs": (peak - rss_inputs) / input_bytes,
      "seconds": round(seconds, 2),
  }


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--params", type=int, default=104_857_600, help="parameters per model")
  ap.add_argument("--leaves", type=int, default=4, help="leaves per model (equal sizes)")
  ap.add_argument("--k", type=int, default=4, help="models merged (plus the base)")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--density", type=float, default=0.2, help="TIES / DARE density")
  ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: child mode
  args = ap.parse_args(argv)
  if args.one:
    print(json.dumps(child(args.one, args.params, args.leaves, args.k, args.density)))
    return
  rows = []
  for method in args.methods.split(","):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", method,
           "--params", str(args.params), "--leaves", str(args.leaves), "--k", str(args.k),
           "--density", str(args.density)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
      rows.append({"method": method, "error": res.stderr.strip().splitlines()[-1:]})
      continue
    rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
  import jax
  print(json.dumps({"benchmark": "merging_memory", "jax": jax.__version__,
                    "backend": jax.default_backend(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg(), "results": rows}, indent=1))


if __name__ == "__main__":
  main()
