#!/usr/bin/env bash
# Issue 19's accelerator measurements as ONE prepared run, for a session lent a GPU:
#
#   run(command="bash benchmarks/gpu_checks.sh", timeout_s=560)     # the device tool
#   QUICK=1 bash benchmarks/gpu_checks.sh                          # a CPU smoke (~2 min)
#
# 1. members_table.py at K = 1, 8, 16, 64 for the MLP (784-512-512-10) and the thesis CNN
#    (32-64-128): auto and the library's one-member loop, plus vmap / chunked (the issue's
#    goal: >= 8x over the loop for 16 CNN members on a GPU);
# 2. soup_candidates.py, 16 ingredients (goal: the batched pass >= 3x the sequential one).
# Every step has its own time limit, so one slow step cannot take the others' results;
# what finished is under $OUT (JSON lines, the Markdown tables, the log). The device
# image has jax, flax, optax, orbax and chex; nothing here needs ml_collections.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ -n "${QUICK:-}" ]; then
  KS=1,2; STRAT=vmap; SOUP="--ingredients=4 --examples=200 --repeats=2"; LIMIT=120
else
  KS=1,8,16,64; STRAT=vmap,chunked4,chunked16; SOUP="--ingredients=16 --examples=5000 --repeats=5"
  LIMIT=190
fi
step() {  # step NAME LIMIT_S COMMAND...: runs it, logs it, never stops the script
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$OUT/log"
  timeout "$limit" "$@" > "$OUT/$name.out" 2>> "$OUT/log"
  echo "== $name rc=$?" | tee -a "$OUT/log"
  cat "$OUT/$name.out"
}
step devices 60 "$PY" -c "import jax; print(jax.__version__, jax.devices())"
step mlp "$LIMIT" "$PY" benchmarks/members_table.py --arch mlp --members "$KS" \
    --strategies "$STRAT" --out "$OUT/mlp.jsonl"
step cnn "$LIMIT" "$PY" benchmarks/members_table.py --arch cnn --members "$KS" \
    --strategies "$STRAT" --out "$OUT/cnn.jsonl"
step soups 90 "$PY" benchmarks/soup_candidates.py $SOUP
# Tables of whatever K finished (members_table prints its table only at the end).
for arch in mlp cnn; do
  [ -s "$OUT/$arch.jsonl" ] && "$PY" benchmarks/members_table.py --table "$OUT/$arch.jsonl" \
      > "$OUT/$arch.md" && cat "$OUT/$arch.md"
done
exit 0
