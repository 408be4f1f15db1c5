r"""One member's CNN training step under different conv layouts and dtypes.

Prints ONE JSON line (with --json) holding, after compilation, the training rate of one
member's SGD-momentum step (forward + backward + update, jitted, state donated) of the
thesis CNN, `models.CNN(batch_norm=False, dropouts=(0, 0, 0))`: per stage two 3x3 SAME
convs + ELU, then 2x2 max pool; flatten; dense to 10 classes. The network is written in
plain `jax.lax` (`conv_general_dilated`, `reduce_window`) so that the layout and the dtype
are parameters. Variants:

  * `nhwc_f32`: NHWC input, HWIO kernels, float32 (what Flax does);
  * `nchw_f32`: NCHW input, OIHW kernels, float32;
  * `nhwc_bf16`: NHWC, activations and weights cast to bfloat16 for the forward and
    backward; master weights, gradients, the update and the loss in float32;
  * `grouped_k<G>` (`--groups G`, default 4): G members folded into the channel axis,
    convolutions with `feature_group_count=G` (what `jax.vmap` of a conv produces), each
    member its own batch; its rate is per member-sample;
  * `flax_nhwc`: the library's own `members.train_step` on the Linen `models.CNN`, the
    reference that `nhwc_f32` matches.

Every variant uses the same optimizer, `optim.make_optimizer(name="sgd",
learning_rate=0.01, momentum=0.9)`, and starts from the same Flax initialisation.

Reported per variant: samples/s (`samples_per_s`; member-samples for grouped), GFLOP/s
with the analytic 3 x forward count of `members_throughput.py` (`gflops`), the fraction
of the interleaved matmul roofline, the ratio to `nhwc_f32` (ratio of medians and median
of per-window ratios), compile seconds (first call), every window's time. Also: the XLA
CPU flags the installed jaxlib knows that mention conv/onednn/xnn/ynn/eigen
(`xla_cpu_flags_available`, found by grepping its shared libraries), jax version,
backend, `XLA_FLAGS`, load average.

Checks (run once, after compilation and before timing; `checks` in the output): from the
same weights, `nchw_f32` gives the same loss and updated params as `nhwc_f32`, and so does
`flax_nhwc` (allclose, rtol 1e-4, atol 1e-6); `nhwc_bf16`'s loss is within 2e-2 relative
of `nhwc_f32`'s; `grouped_k<G>` equals G separate `nhwc_f32` steps.

Timing: every variant is compiled and warmed up first; then `--windows` timed windows of
`--steps` steps each, the variants and a 5x 2048^2 float32 `jnp.dot` interleaved (the
order rotates every window), `jax.block_until_ready` on the new state; rates are medians
over windows. Only ratios taken within one run are meaningful on a shared machine.

Usage:
  python benchmarks/cnn_layouts.py --json
  python benchmarks/cnn_layouts.py --batch 8 --steps 1 --windows 1 --json   # smoke
  python benchmarks/cnn_layouts.py --variants nhwc_f32,nchw_f32 --groups 8 --json
"""

from __future__ import annotations

import argparse
import functools
import glob
import mmap
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import members_throughput  # noqa: E402  (benchmarks/: its FLOP count)

from ensembling import losses  # noqa: E402
from ensembling import members  # noqa: E402
from ensembling import models  # noqa: E402
from ensembling import optim  # noqa: E402
from ensembling import tree as tree_lib  # noqa: E402

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
STAGES = (32, 64, 128)
RTOL, ATOL, BF16_RTOL = 1e-4, 1e-6, 2e-2
FLAG_TOPICS = re.compile(r"conv|onednn|xnn|ynn|eigen")


# --------------------------------------------------------------------------- helpers

def xla_cpu_flags() -> list[str]:
  """Sorted unique `xla_cpu_*` names found in the bytes of the installed jaxlib's libraries.

  These are the names XLA's flag parser knows (plus any other string with that prefix),
  i.e. what `XLA_FLAGS=--<name>=...` can set with this jaxlib.
  """
  root = os.path.dirname(jaxlib.__file__)
  names = set()
  for path in sorted(glob.glob(os.path.join(root, "**", "*.so*"), recursive=True)):
    with open(path, "rb") as f:
      if os.fstat(f.fileno()).st_size == 0:
        continue
      with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        names.update(n.decode() for n in re.findall(rb"xla_cpu_[a-z_]+", m))
  return sorted(names)


def analytic_flops_per_sample(stages) -> dict:
  """Training FLOPs per sample of the CNN (members_throughput.py's count, arch "cnn")."""
  return members_throughput.analytic_flops_per_sample("cnn", stages)


def final_hw(stages) -> int:
  """Side of the last feature map (28 -> 14 -> 7 -> 3 for three stages)."""
  h = IMAGE_SHAPE[0]
  for _ in stages:
    h //= 2
  return h


# --------------------------------------------------------------------------- the network

def forward(params, x, *, stages, layout: str = "NHWC", dtype=jnp.float32,
            groups: int = 0) -> jax.Array:
  """Float32 logits of the CNN, in plain lax.

  Args:
    params: {"conv{s}_{j}": {"kernel", "bias"}, "head": {"kernel", "bias"}}; kernels
      HWIO for NHWC and OIHW for NCHW; the head's kernel rows follow the flattening order
      of `layout` (h, w, c for NHWC; c, h, w for NCHW).
    x: the input batch in `layout`.
    stages: filters per stage (two convolutions each).
    layout: "NHWC" or "NCHW".
    dtype: compute dtype; params and inputs are cast to it, the logits back to float32.
    groups: 0 for one member; G > 0 for G members folded into the channel axis (NHWC,
      `x` (B, H, W, G * C), conv kernels (3, 3, C_in, G * C_out), head kernel (G, D, 10)
      and bias (G, 10)); the logits are then (G, B, 10).

  Returns:
    Logits (B, 10), or (G, B, 10) with `groups`.
  """
  spec = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}[layout]
  if groups and layout != "NHWC":
    raise ValueError("grouped members are implemented for NHWC only")
  bias_shape = [1, 1, 1, 1]
  bias_shape[layout.index("C")] = -1
  window = (1, 2, 2, 1) if layout == "NHWC" else (1, 1, 2, 2)
  x = x.astype(dtype)
  for s in range(len(stages)):
    for j in range(2):
      p = params[f"conv{s}_{j}"]
      x = lax.conv_general_dilated(x, p["kernel"].astype(dtype), (1, 1), "SAME",
                                   dimension_numbers=spec,
                                   feature_group_count=max(groups, 1))
      x = jax.nn.elu(x + p["bias"].astype(dtype).reshape(bias_shape))
    x = lax.reduce_window(x, -jnp.inf, lax.max, window, window, "VALID")
  kernel, bias = params["head"]["kernel"].astype(dtype), params["head"]["bias"].astype(dtype)
  if not groups:
    logits = x.reshape(x.shape[0], -1) @ kernel + bias
  else:
    b, h, w, gc = x.shape
    f_GxBxD = x.reshape(b, h, w, groups, gc // groups).transpose(3, 0, 1, 2, 4).reshape(
        groups, b, -1)
    logits = jnp.einsum("gbd,gdc->gbc", f_GxBxD, kernel) + bias[:, None]
  return logits.astype(jnp.float32)


def make_lax_step(tx: optax.GradientTransformation, **forward_kw):
  """Jitted, state-donating `step(state, x, y) -> (state, loss)` of the lax network.

  The loss (float32) is the mean cross-entropy; with `groups` it is the sum over members
  of each member's mean, so each member gets the gradient it would get alone.
  """
  grouped = bool(forward_kw.get("groups"))

  def loss_of(params, x, y):
    logits = forward(params, x, **forward_kw)
    if grouped:
      return jnp.sum(jax.vmap(losses.softmax_cross_entropy)(logits, y))
    return losses.softmax_cross_entropy(logits, y)

  def step(state, x, y):
    loss, grads = jax.value_and_grad(loss_of)(state["params"], x, y)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, loss

  return jax.jit(step, donate_argnums=0)


# --------------------------------------------------------------------------- weights

def nhwc_to_nchw(params, stages):
  """Flax/NHWC params -> NCHW params: kernels HWIO -> OIHW, head rows (h,w,c) -> (c,h,w)."""
  out = {k: {"kernel": v["kernel"].transpose(3, 2, 0, 1), "bias": v["bias"]}
         for k, v in params.items() if k != "head"}
  h, k = final_hw(stages), params["head"]["kernel"]
  rows = k.reshape(h, h, -1, k.shape[-1]).transpose(2, 0, 1, 3).reshape(k.shape)
  out["head"] = {"kernel": rows, "bias": params["head"]["bias"]}
  return out


def nchw_to_nhwc(params, stages):
  """The inverse of `nhwc_to_nchw`."""
  out = {k: {"kernel": v["kernel"].transpose(2, 3, 1, 0), "bias": v["bias"]}
         for k, v in params.items() if k != "head"}
  h, k = final_hw(stages), params["head"]["kernel"]
  rows = k.reshape(-1, h, h, k.shape[-1]).transpose(1, 2, 0, 3).reshape(k.shape)
  out["head"] = {"kernel": rows, "bias": params["head"]["bias"]}
  return out


def fold_members(params_list):
  """G members' NHWC params -> one grouped tree (conv outputs concatenated, head stacked)."""
  out = {k: {n: jnp.concatenate([p[k][n] for p in params_list], axis=-1)
             for n in ("kernel", "bias")}
         for k in params_list[0] if k != "head"}
  out["head"] = tree_lib.stack([p["head"] for p in params_list])
  return out


def unfold_member(params_G, g: int, groups: int):
  """Member g's NHWC params from a grouped tree."""
  def conv(v):
    c = v.shape[-1] // groups
    return v[..., g * c:(g + 1) * c]
  out = {k: {n: conv(v[n]) for n in ("kernel", "bias")} for k, v in params_G.items()
         if k != "head"}
  out["head"] = tree_lib.index(params_G["head"], g)
  return out


def fold_inputs(x_G):
  """(G, B, H, W, C) -> (B, H, W, G * C), member-major channels (as `jax.vmap` lays it)."""
  g, b, h, w, c = x_G.shape
  return x_G.transpose(1, 2, 3, 0, 4).reshape(b, h, w, g * c)


def compare(a, b, loss, ref_loss) -> dict:
  """Whether two trees and two losses are allclose (RTOL, ATOL); the trees' largest gap."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  loss_ok = bool(np.isclose(float(loss), float(ref_loss), rtol=RTOL, atol=ATOL))
  ok = len(la) == len(lb) and all(np.shape(u) == np.shape(v) for u, v in zip(la, lb))
  if not ok:
    return {"pass": False, "max_abs_diff": None, "loss_pass": loss_ok}
  ok = all(np.allclose(u, v, rtol=RTOL, atol=ATOL) for u, v in zip(la, lb))
  diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(la, lb))
  return {"pass": bool(ok) and loss_ok, "max_abs_diff": diff, "loss_pass": loss_ok}


# --------------------------------------------------------------------------- main

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=128, help="samples per step (per member)")
  p.add_argument("--steps", type=int, default=2, help="steps per timed window")
  p.add_argument("--windows", type=int, default=5, help="timed windows per variant")
  p.add_argument("--groups", type=int, default=4, help="members folded by grouped_k<G>")
  p.add_argument("--variants", default="",
                 help="comma-separated subset of nhwc_f32,nchw_f32,nhwc_bf16,grouped,"
                      "flax_nhwc (default: all; checks need both sides of a pair)")
  p.add_argument("--json", action="store_true", help="print one JSON line")
  args = p.parse_args(argv)

  if args.groups < 1:
    p.error("--groups must be >= 1")
  b, g, steps, stages = args.batch, args.groups, args.steps, STAGES
  grouped_name = f"grouped_k{g}"
  all_names = ["nhwc_f32", "nchw_f32", "nhwc_bf16", grouped_name, "flax_nhwc"]
  if args.variants:
    wanted = [grouped_name if v.startswith("grouped") else v
              for v in args.variants.split(",") if v]
    unknown = sorted(set(wanted) - set(all_names))
    if unknown:
      p.error(f"unknown variants {unknown}; choose from {all_names}")
    names = [n for n in all_names if n in wanted]
  else:
    names = all_names

  model = models.CNN(num_classes=NUM_CLASSES, stages=stages, batch_norm=False,
                     dropouts=(0.0,) * len(stages))
  tx = optim.make_optimizer(name="sgd", learning_rate=0.01, momentum=0.9)

  rng = np.random.default_rng(0)
  x_G = jnp.asarray(rng.standard_normal((g, b) + IMAGE_SHAPE, dtype=np.float32))
  y_G = jnp.asarray(rng.integers(0, NUM_CLASSES, (g, b)), jnp.int32)
  x, y = x_G[0], y_G[0]  # the one-member variants train member 0 on batch 0
  params_G = members.init_members(jax.random.key(0), model, x[:1], g)["params"]
  params_list = tree_lib.unstack(params_G)
  params0 = params_list[0]
  key = jax.random.key(1)  # dropout is off: unused by flax_nhwc

  # Per variant: a fresh initial state, the step (state -> (state, loss)), its data.
  def lax_state(params):  # always fresh buffers: every step donates its state
    params = jax.tree.map(jnp.copy, params)
    return {"params": params, "opt_state": tx.init(params)}

  fresh = {
      "nhwc_f32": lambda: lax_state(params0),
      "nchw_f32": lambda: lax_state(nhwc_to_nchw(params0, stages)),
      "nhwc_bf16": lambda: lax_state(params0),
      grouped_name: lambda: lax_state(fold_members(params_list)),
      "flax_nhwc": lambda: members.init_state({"params": jax.tree.map(jnp.copy, params0)}, tx),
  }
  lax_steps = {
      "nhwc_f32": make_lax_step(tx, stages=stages),
      "nchw_f32": make_lax_step(tx, stages=stages, layout="NCHW"),
      "nhwc_bf16": make_lax_step(tx, stages=stages, dtype=jnp.bfloat16),
      grouped_name: make_lax_step(tx, stages=stages, groups=g),
  }
  data = {"nhwc_f32": (x, y), "nchw_f32": (x.transpose(0, 3, 1, 2), y),
          "nhwc_bf16": (x, y), grouped_name: (fold_inputs(x_G), y_G)}
  flax_step = jax.jit(functools.partial(members.train_step, model=model, tx=tx),
                      donate_argnums=0)
  flax_batch = {"x": x, "y": y}

  def call(name, state, inputs=None):
    """One step of `name`; `inputs` overrides the variant's own (x, y)."""
    if name == "flax_nhwc":
      state, metrics = flax_step(state, flax_batch, key)
      return state, metrics["loss"]
    return lax_steps[name](state, *(inputs or data[name]))

  # Compile (the first call, timed) and keep the state each variant goes on training.
  states, compile_s = {}, {}
  for name in names:
    state = fresh[name]()
    t0 = time.perf_counter()
    state, loss = call(name, state)
    jax.block_until_ready((state, loss))
    compile_s[name] = time.perf_counter() - t0
    states[name] = state

  # Correctness, once, before timing: one step of each from the same initial weights.
  one = {n: call(n, fresh[n]()) for n in names}
  checks = {}
  if "nhwc_f32" in names:
    ref_state, ref_loss = one["nhwc_f32"]
    ref_loss = float(ref_loss)
    checks["nhwc_f32_loss"] = ref_loss
    if "nchw_f32" in names:
      st, loss = one["nchw_f32"]
      checks["nchw_matches_nhwc"] = compare(nchw_to_nhwc(st["params"], stages),
                                            ref_state["params"], loss, ref_loss)
    if "flax_nhwc" in names:
      st, loss = one["flax_nhwc"]
      checks["lax_matches_flax"] = compare(st["params"], ref_state["params"], loss, ref_loss)
    if "nhwc_bf16" in names:
      loss = float(one["nhwc_bf16"][1])
      rel = abs(loss - ref_loss) / abs(ref_loss)
      checks["bf16_loss_close"] = {"pass": bool(rel <= BF16_RTOL), "loss": loss,
                                   "rel_diff": rel}
    if grouped_name in names:
      st, loss = one[grouped_name]
      singles = [call("nhwc_f32", lax_state(pk), (x_G[k], y_G[k]))
                 for k, pk in enumerate(params_list)]
      checks["grouped_matches_members"] = compare(
          [unfold_member(st["params"], k, g) for k in range(g)],
          [s["params"] for s, _ in singles], loss, sum(float(l) for _, l in singles))
  checks["all_pass"] = all(c["pass"] for c in checks.values() if isinstance(c, dict))
  del one

  def make_run(name):
    def run():
      for _ in range(steps):
        states[name], _ = call(name, states[name])
      jax.block_until_ready(states[name])
    return run

  times, cpu_times, mm_times = members_throughput.time_interleaved(
      {n: make_run(n) for n in names}, windows=args.windows)
  samples = {n: (g if n == grouped_name else 1) * b * steps for n in names}
  rate = {n: samples[n] / statistics.median(t) for n, t in times.items()}
  cpu_rate = {n: samples[n] / statistics.median(t) for n, t in cpu_times.items()}
  mm_gflops = 5 * 2 * 2048 ** 3 / statistics.median(mm_times) / 1e9
  flops = analytic_flops_per_sample(stages)
  gflops = {n: r * flops["with_input_grad"] / 1e9 for n, r in rate.items()}

  def over_ref(n):  # per-window ratio of rates, from back-to-back timings
    return statistics.median((samples[n] / tn) / (samples["nhwc_f32"] / tr)
                             for tn, tr in zip(times[n], times["nhwc_f32"]))

  has_ref = "nhwc_f32" in names
  flags = xla_cpu_flags()
  out = {
      "variants": names,
      "stages": list(stages),
      "batch": b,
      "groups": g,
      "steps_per_window": steps,
      "windows": args.windows,
      "samples_per_s": {n: round(r, 1) for n, r in rate.items()},
      "gflops": {n: round(v, 2) for n, v in gflops.items()},
      "roofline_fraction": {n: round(v / mm_gflops, 3) for n, v in gflops.items()},
      "over_nhwc_f32": ({n: round(rate[n] / rate["nhwc_f32"], 3) for n in names}
                        if has_ref else None),
      "over_nhwc_f32_window_median": ({n: round(over_ref(n), 3) for n in names}
                                      if has_ref else None),
      "compile_s": {n: round(t, 2) for n, t in compile_s.items()},
      "samples_per_cpu_s": {n: round(r, 1) for n, r in cpu_rate.items()},
      "window_s": {n: [round(t, 4) for t in ts] for n, ts in times.items()},
      "matmul_gflops": round(mm_gflops, 1),
      "matmul_window_s": [round(t, 3) for t in mm_times],
      "flops_per_sample": flops["with_input_grad"],
      "flops_per_sample_exact": flops["exact"],
      "checks": checks,
      "xla_cpu_flags_available": [f for f in flags if FLAG_TOPICS.search(f)],
      "xla_cpu_flags_total": len(flags),
      **members_throughput.machine_info(),
  }
  members_throughput.print_result(out, as_json=args.json)


if __name__ == "__main__":
  main()
