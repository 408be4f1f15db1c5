#!/usr/bin/env bash
# Issue 20's thesis-CNN tables at full scale as ONE prepared run, for a session lent a GPU
# (on this project's 2-core CPU they take tens of hours; see docs/results.md):
#
#   bash experiments/gpu_fullscale.sh prepare        # once, here: wheel + data into .whl/
#   run(command="bash experiments/gpu_fullscale.sh", carry=[".whl"], timeout_s=590)
#   QUICK=1 bash experiments/gpu_fullscale.sh        # a CPU smoke of the plumbing (~1 min)
#
# `prepare` downloads the one package the device image lacks (ml_collections; it has jax,
# flax, optax, orbax, chex, scikit-learn, tqdm) and copies Fashion-MNIST from ../shared/data
# into .whl/ (ignored by git; about 30 MB of the 64 MiB that may travel). The run:
# 1. supernet_cnn: six thesis CNNs on all 55,000 images for E12 (30) epochs, then the SuperNet
#    heads: Tables 12, 5 and 6 (`configs/supernet.py:fashion_mnist,arch=cnn,noboost`);
# 2. trajectory_cnn: SGD, SSE, FGE, SWA (BN recalibrated), StarSSE with the thesis CNN, 3 seeds,
#    ETRAJ (16) epochs per method, restart rate 0.05 (0.1 diverges on the CNN, docs/results.md).
# Each step has its own time limit; its results.md / results.json are copied under $OUT as
# soon as it ends, so a step cut by its limit cannot take the other's results.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
  mkdir -p .whl/data
  python3 -m pip download -q --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 &&
    cp -r ../shared/data/fashion-mnist .whl/data/ && du -sh .whl && exit 0
  exit 1
fi
OUT=${OUT:-/tmp/gpu_fullscale}
W=${W:-/tmp/gpu_fullscale_runs}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
DATA=.whl/data/fashion-mnist
[ -d "$DATA" ] || DATA=../shared/data/fashion-mnist
if [ -n "${QUICK:-}" ]; then  # the plumbing only: the configs' seconds-long runlocal variants
  SN="runlocal"; TRAJ="runlocal,methods=sgd+swa"; LIMIT=150
else
  SN="fashion_mnist,arch=cnn,epochs=${E12:-30},noboost"
  TRAJ="arch=cnn,epochs=${ETRAJ:-16},seeds=3,methods=all"; LIMIT=250
fi
step() {  # step NAME LIMIT_S COMMAND...: runs it, logs it, never stops the script
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$OUT/log"
  timeout "$limit" "$@" >> "$OUT/log" 2>&1
  echo "== $name rc=$? ($(date -u +%T))" | tee -a "$OUT/log"
  for f in results.md results.json; do
    [ -f "$W/$name/$f" ] && cp "$W/$name/$f" "$OUT/$name.${f#results.}"
  done
  [ -f "$OUT/$name.md" ] && cat "$OUT/$name.md"
}
step versions 60 "$PY" -c "import jax, flax, optax, orbax.checkpoint as o, ml_collections; \
print(jax.__version__, flax.__version__, optax.__version__, o.__version__, jax.devices())"
step supernet_cnn "$LIMIT" "$PY" -m experiments.main \
    --config="configs/supernet.py:$SN" \
    --config.data.dir="$DATA" --config.progress=False --workdir="$W/supernet_cnn"
step trajectory_cnn "$LIMIT" "$PY" -m experiments.main \
    --config="configs/swa.py:$TRAJ" \
    --config.traj.sse_lr=0.05 --config.data.dir="$DATA" --config.progress=False \
    --workdir="$W/trajectory_cnn"
exit 0
