r"""Training throughput of K ensemble members: member-parallel strategies vs a loop.

Prints ONE JSON line (with --json) holding, after compilation, member-samples per
second (K * batch * steps / seconds) for

  * `parallel_member_samples_per_s`: the library's default,
    `members.resolve_strategy("auto", params_K)` run through `members.ensemble_step`;
  * `loop_member_samples_per_s`: the honest baseline, a Python loop over K jitted
    one-member `train_step`s, each member's state held separately (no stacking);
  * `<strategy>_member_samples_per_s` for every other strategy tried;

plus the machine's float32 matmul GFLOP/s (jitted 2048x2048 `jnp.dot`), FLOPs per
training sample (analytic and XLA's cost analysis), arch, K, batch, versions, backend.

Every member-parallel step donates its state, as `train.fit`'s steps do (so does the
loop's one-member step). Timing: every strategy is compiled and warmed up first; then
`--windows` timed windows of `--steps` steps each, with the strategies interleaved (the
order rotates every window) and `jax.block_until_ready` on the new state; the reported
numbers are medians over windows. Only ratios taken within one run are meaningful.

Models: `mlp` = 784-512-512-10 ReLU; `cnn` = `models.CNN(batch_norm=False)` (the
thesis conv stack 32,32 -> pool -> 64,64 -> pool -> 128,128 -> pool -> dense, ELU).
`--stages 32,64` gives the 2-stage stack of the PyTorch/JAX peers in PERF-NOTES.
Dropout is OFF by default (`--dropout` turns the model's dropout on). Data are
Fashion-MNIST-shaped random arrays (28x28x1, 10 classes), one fixed batch per member;
SGD with momentum 0.9 via `optim.make_optimizer`.

Usage:
  python benchmarks/members_throughput.py --arch mlp --members 8 --json
  python benchmarks/members_throughput.py --arch cnn --members 8 --steps 2 --json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ensembling import members  # noqa: E402
from ensembling import models  # noqa: E402
from ensembling import optim  # noqa: E402
from ensembling import tree as tree_lib  # noqa: E402

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """Median float32 GFLOP/s of a jitted n x n matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def program_bytes(compiled) -> int:
  """Peak device memory of one compiled step: arguments + outputs + XLA temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def time_interleaved(fns: dict, *, windows: int):
  """Times every `fns[name]()` in `windows` rounds, with a 5 x 2048^2 float32 matmul.

  One untimed warm-up call each first; every round calls them all, the order rotating
  by one each round. Returns ({name: wall seconds per round}, {name: CPU seconds per
  round}, matmul wall seconds per round).
  """
  mm_a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
  mm_f = jax.jit(jnp.dot)

  def run_matmul(reps=5):
    for _ in range(reps):
      out = mm_f(mm_a, mm_a)
    out.block_until_ready()

  fns = {**fns, "matmul": run_matmul}
  order = list(fns)
  for n in order:
    fns[n]()
  times = {n: [] for n in order}
  cpu_times = {n: [] for n in order}
  for w in range(windows):
    for n in order[w % len(order):] + order[: w % len(order)]:
      c0, t0 = time.process_time(), time.perf_counter()
      fns[n]()
      times[n].append(time.perf_counter() - t0)
      cpu_times[n].append(time.process_time() - c0)
  cpu_times.pop("matmul")
  return times, cpu_times, times.pop("matmul")


def analytic_flops_per_sample(arch: str, stages, widths=(512, 512)) -> dict:
  """Training FLOPs per sample: 2 per MAC forward, and 2 per MAC for each gradient.

  `with_input_grad` counts 3 x forward (the PERF-NOTES convention, which also counts
  the unneeded gradient w.r.t. the input image); `exact` leaves that out.
  """
  if arch == "mlp":
    dims = [784, *widths, NUM_CLASSES]
    macs = [a * b for a, b in zip(dims[:-1], dims[1:])]
  else:
    h, c, macs = 28, 1, []
    for f in stages:
      for _ in range(2):
        macs.append(h * h * 9 * c * f)
        c = f
      h //= 2
    macs.append(h * h * c * NUM_CLASSES)
  fwd = 2 * sum(macs)
  return {"forward": fwd, "with_input_grad": 3 * fwd, "exact": 3 * fwd - 2 * macs[0]}


def build(arch: str, stages, dropout: bool, widths=(512, 512)):
  if arch == "mlp":
    return models.MLP(widths=tuple(widths), num_classes=NUM_CLASSES)
  return models.CNN(num_classes=NUM_CLASSES, stages=tuple(stages), batch_norm=False,
                    dropouts=(0.2, 0.3, 0.4)[: len(stages)] if dropout else (0.0,) * len(stages))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", choices=("mlp", "cnn"), required=True)
  p.add_argument("--members", type=int, required=True)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=0,
                 help="steps per timed window (default: 20 for mlp, 1 for cnn)")
  p.add_argument("--windows", type=int, default=5, help="timed windows per strategy")
  p.add_argument("--strategies", default="",
                 help="comma-separated strategies to time besides auto and the loop "
                      "(default: every non-loop strategy; chunkedG = chunked with groups "
                      "of G; 'map' only for mlp; 'none': only auto and the loop)")
  p.add_argument("--stages", default="32,64,128", help="cnn filters per stage")
  p.add_argument("--widths", default="512,512", help="mlp hidden widths")
  p.add_argument("--dropout", action="store_true", help="turn the model's dropout on")
  p.add_argument("--json", action="store_true", help="print one JSON line")
  args = p.parse_args(argv)

  stages = [int(s) for s in args.stages.split(",")]
  k, b = args.members, args.batch
  steps = args.steps or (20 if args.arch == "mlp" else 1)
  widths = [int(w) for w in args.widths.split(",")]
  model = build(args.arch, stages, args.dropout, widths)
  tx = optim.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9)

  rng = np.random.default_rng(0)
  x_K = jnp.asarray(rng.standard_normal((k, b) + IMAGE_SHAPE, dtype=np.float32))
  y_K = jnp.asarray(rng.integers(0, NUM_CLASSES, (k, b)), jnp.int32)
  batch_K = {"x": x_K, "y": y_K}
  keys_K = members.member_keys(jax.random.key(1), k)
  variables_K = members.init_members(jax.random.key(0), model, x_K[0], k)
  state0_K = members.init_states(variables_K, tx)

  auto = members.resolve_strategy("auto", state0_K["params"])
  if args.strategies == "none":
    others = []
  elif args.strategies:
    others = [s for s in args.strategies.split(",") if s]
  else:
    others = [s for s in members.STRATEGIES if s not in ("auto", "loop")]
    if args.arch == "cnn":
      others.remove("map")  # minutes to compile, then ~4 samples/s (PERF-NOTES)
  def parse(name):  # "chunked4" -> ("chunked", 4); others -> (name, default chunk)
    if name.startswith("chunked") and name[len("chunked"):].isdigit():
      return "chunked", int(name[len("chunked"):])
    return name, members.DEFAULT_CHUNK
  for s in others:
    members.resolve_strategy(parse(s)[0], state0_K["params"])  # validates the name
  # "loop" names the baseline below; the members' own 'loop' strategy, held as train.fit
  # holds it, is K separately held states too (timed only as auto's choice).
  names = ["auto"] + [s for s in others if s not in ("auto", auto, "loop")]  # auto once
  label = "library_loop" if auto == "loop" else auto  # auto's rate under its own name

  runners, states, compile_s, memory = {}, {}, {}, {}
  for name in names:
    strategy, chunk = parse(auto if name == "auto" else name)
    step = members.ensemble_step(model=model, tx=tx, num_members=k,  # donated, as in
                                 strategy=strategy, chunk_size=chunk, donate=True)  # fit
    state = jax.tree.map(jnp.copy, state0_K)
    t0 = time.perf_counter()
    # Held as train.fit holds it (`MemberStep.hold`: K separate states for 'loop').
    state, _ = step.step_held(step.hold(state), batch_K, keys_K)
    jax.block_until_ready(state)
    compile_s[name] = time.perf_counter() - t0
    runners[name], states[name] = step, state
    if strategy != "loop":  # XLA's own account of the program's buffers
      memory[name] = program_bytes(step._compiled.lower(state, batch_K, keys_K).compile())

  # The baseline: K separately held states, one jitted one-member step each.
  one = jax.jit(functools.partial(members.train_step, model=model, tx=tx),
                donate_argnums=0)
  loop_states = [jax.tree.map(jnp.copy, s) for s in tree_lib.unstack(state0_K)]
  loop_batches = [{"x": x_K[i], "y": y_K[i]} for i in range(k)]
  loop_keys = [keys_K[i] for i in range(k)]
  t0 = time.perf_counter()
  for i in range(k):
    loop_states[i], _ = one(loop_states[i], loop_batches[i], loop_keys[i])
  jax.block_until_ready(loop_states)
  compile_s["loop"] = time.perf_counter() - t0
  one_program = program_bytes(one.lower(loop_states[0], loop_batches[0], loop_keys[0]).compile())
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(loop_states[0]))
  # The loop holds all K states (and batches) and runs one member's program at a time.
  memory["loop"] = one_program + (k - 1) * (state_bytes + loop_batches[0]["x"].nbytes)
  memory.update({n: memory["loop"] for n in names if n not in memory})  # held loops: the same
  xla_cost = one.lower(loop_states[0], loop_batches[0], loop_keys[0]).compile().cost_analysis()
  if isinstance(xla_cost, (list, tuple)):
    xla_cost = xla_cost[0] if xla_cost else {}
  xla_flops = float(xla_cost.get("flops", float("nan"))) if xla_cost else float("nan")

  def run_loop():
    for _ in range(steps):
      for i in range(k):
        loop_states[i], _ = one(loop_states[i], loop_batches[i], loop_keys[i])
    jax.block_until_ready(loop_states)

  def make_run(name):
    # The library's held 'loop' takes the members' own batches, as the baseline does.
    args = ((loop_batches, loop_keys) if runners[name].strategy == "loop"
            else (batch_K, keys_K))

    def run():
      for _ in range(steps):
        states[name], _ = runners[name].step_held(states[name], *args)
      jax.block_until_ready(states[name])
    return run

  fns = {"loop": run_loop, **{n: make_run(n) for n in names}}
  times, cpu_times, mm_times = time_interleaved(fns, windows=args.windows)
  samples = k * b * steps
  # Member-samples per CPU-second of this process (all its threads): less sensitive
  # to other processes on a shared machine than wall-clock rates, but it counts
  # threads that spin while waiting.
  cpu_rate = {n: samples / statistics.median(t) for n, t in cpu_times.items()}
  rate = {n: samples / statistics.median(t) for n, t in times.items()}
  # The matmul roofline is timed inside the same windows (interleaved), and the
  # standalone measurement below is taken on its own at the end; report both.
  gflops = 5 * 2 * 2048 ** 3 / statistics.median(mm_times) / 1e9
  gflops_alone = matmul_gflops()
  ratio = statistics.median(tl / ta for tl, ta in zip(times["loop"], times["auto"]))
  flops = analytic_flops_per_sample(args.arch, stages, widths)
  out = {
      "arch": args.arch,
      "stages": stages if args.arch == "cnn" else None,
      "widths": widths if args.arch == "mlp" else None,
      "members": k,
      "batch": b,
      "steps_per_window": steps,
      "windows": args.windows,
      "dropout": bool(args.dropout),
      "auto_strategy": auto,
      "parallel_member_samples_per_s": round(rate["auto"], 1),
      "loop_member_samples_per_s": round(rate["loop"], 1),
      f"{label}_member_samples_per_s": round(rate["auto"], 1),
      **{f"{n}_member_samples_per_s": round(rate[n], 1) for n in names if n != "auto"},
      "program_mib": {n: round(v / 2 ** 20, 1) for n, v in memory.items()},
      "parallel_over_loop": round(rate["auto"] / rate["loop"], 3),
      "parallel_over_loop_window_median": round(ratio, 3),
      "matmul_gflops": round(gflops, 1),
      "matmul_gflops_alone": round(gflops_alone, 1),
      "flops_per_sample": flops["with_input_grad"],
      "flops_per_sample_exact": flops["exact"],
      "flops_per_sample_xla": xla_flops / b,
      "parallel_gflops": round(rate["auto"] * flops["with_input_grad"] / 1e9, 1),
      "parallel_roofline_fraction": round(rate["auto"] * flops["with_input_grad"] / 1e9
                                          / gflops, 3),
      "member_samples_per_cpu_s": {n: round(r, 1) for n, r in cpu_rate.items()},
      "compile_s": {n: round(t, 1) for n, t in compile_s.items()},
      "window_s": {n: [round(t, 3) for t in ts] for n, ts in times.items()},
      "matmul_window_s": [round(t, 3) for t in mm_times],
      **machine_info(),
  }
  print_result(out, as_json=args.json)


def machine_info() -> dict:
  """Versions, backend, flags, load and this process's peak RSS, for a benchmark's JSON."""
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "cpu_count": os.cpu_count(),
      "loadavg": [round(x, 2) for x in os.getloadavg()],
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "machine": platform.machine(),
  }


def print_result(out: dict, *, as_json: bool) -> None:
  """One JSON line, or one `key value` line per entry."""
  if as_json:
    print(json.dumps(out))
  else:
    for key, val in out.items():
      print(f"{key:34s} {val}")


if __name__ == "__main__":
  main()
