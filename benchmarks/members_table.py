r"""Member-parallel throughput at every K: runs `members_throughput.py` once per K.

Each K runs in its own process (compile caches and peak RSS stay per K); inside it the
strategies are interleaved window by window (see members_throughput.py). Writes every
run's JSON line to `--out` (appending, so a table can be built over several sessions) and
prints a Markdown table: member-samples/s per strategy, each strategy's rate over the
loop's, `auto`'s choice, XLA's program size per strategy and the process's peak RSS.

Usage:
  python benchmarks/members_table.py --arch mlp --members 1,2,4,8,16,32,64 \
      --strategies vmap,chunked4,chunked8,chunked16 --out /tmp/mlp.jsonl
  python benchmarks/members_table.py --table /tmp/mlp.jsonl    # only print the table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(arch: str, k: int, strategies: str, extra: list[str]) -> dict:
  cmd = [sys.executable, os.path.join(HERE, "members_throughput.py"), "--arch", arch,
         "--members", str(k), "--json", "--strategies", strategies or "none", *extra]
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode != 0:
    raise RuntimeError(f"K={k} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def strategies_of(row: dict) -> list[str]:
  names = [key[: -len("_member_samples_per_s")] for key in row
           if key.endswith("_member_samples_per_s") and key != "parallel_member_samples_per_s"]
  return sorted(set(names) - {"loop"})


def table(rows: list[dict]) -> str:
  names = sorted({n for r in rows for n in strategies_of(r)})
  head = (["arch", "K", "auto ->", "loop"] + names + [f"{n} / loop" for n in names]
          + ["auto / loop (per window)", "program MiB (" + ", ".join(["loop"] + names) + ")",
             "peak RSS MiB", "matmul GFLOP/s", "load"])
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in sorted(rows, key=lambda r: (r["arch"], r["members"])):
    loop = r["loop_member_samples_per_s"]
    rate = {n: r.get(f"{n}_member_samples_per_s") for n in names}
    mem = r.get("program_mib", {})
    cells = [r["arch"], str(r["members"]), r["auto_strategy"], f"{loop:,.0f}"]
    cells += [f"{rate[n]:,.0f}" if rate[n] else "-" for n in names]
    cells += [f"{rate[n] / loop:.2f}" if rate[n] else "-" for n in names]
    cells += [f"{r['parallel_over_loop_window_median']:.2f}",
              ", ".join(str(mem.get("auto" if n in (r["auto_strategy"], "library_loop") else n,
                                    "-"))
                        for n in ["loop"] + names),
              str(r.get("peak_rss_mib", "-")), f"{r['matmul_gflops']:.0f}",
              f"{r['loadavg'][0]:.1f}"]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", choices=("mlp", "cnn"))
  p.add_argument("--members", default="1,2,4,8,16,32,64")
  p.add_argument("--strategies", default="", help="besides auto and the loop")
  p.add_argument("--out", default="", help="JSON-lines file to append every run to")
  p.add_argument("--table", default="", help="print the table of this JSON-lines file")
  args, extra = p.parse_known_args(argv)
  if args.table:
    print(table([json.loads(l) for l in open(args.table) if l.strip()]))
    return
  if not args.arch:
    p.error("--arch is required unless --table is given")
  rows = []
  for k in [int(s) for s in args.members.split(",")]:
    row = run_one(args.arch, k, args.strategies, extra)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  print(table(rows))


if __name__ == "__main__":
  main()
