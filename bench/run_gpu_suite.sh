#!/usr/bin/env bash
# Issue 8's GPU benchmarks (and Report 03 §6's ablation) in one device call of < 10 minutes.
#
#   bash bench/run_gpu_suite.sh            on a machine with 2 H200s (or 1: the lanes run in turn)
#
# Needs, beside the repository: the wheels in .whl/ (bash ../shared/tools/offline-wheels.sh .whl)
# and the exported Bible in .data/bible-en-fr/{train,val,test}.tsv
# (python -m trainer.data export --src 4 --tgt 5 --out .data/bible-en-fr); carry both.
# Writes $OUT/<date>_<hardware>_<bench>.json per benchmark and $OUT/suite.log.
#
# Three phases; in the first two each GPU runs its own lane:
#   1. GPU 0: throughput (P1: ours vs HF GPTNeoX, eager and compiled, 16k micro-batches)
#      GPU 1: ablation (Report 03 §6 at the truncated budget; $ABLATION_VARIANTS, default all)
#   2. GPU 0: idle (P6)  |  GPU 1: decode (P2) on a finished ablation run's weights
#   3. both:  scaling (P3: the same slice with 1 worker, then one per GPU)
# Timing-sensitive measurements of GPU 1 (decode) wait for phase 1 to end: torch.compile's
# workers take every CPU core and slow a neighbour's eager steps 2-4x (2026-11-28 suite).
# Each benchmark has a hard time limit (timeout), so the call ends in time and each benchmark
# leaves what it measured (its JSON is rewritten after every measurement).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-/tmp/amt-bench-out}
DATA=${DATA_DIR:-.data/bible-en-fr}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
exec > >(tee -a "$LOG") 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "suite: wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 AMT_PROGRESS=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export AMT_HOME=${AMT_HOME:-/tmp/amt-bench}   # one data cache and embedded server for all
mkdir -p "$AMT_HOME"
nvidia-smi -L
N_GPUS=$(nvidia-smi -L | grep -c '^GPU')
python3 -c "import torch, transformers, optuna; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'optuna', optuna.__version__)"
[ -f "$DATA/train.tsv" ] || { echo "suite: $DATA/train.tsv missing (carry .data)"; exit 1; }

# bench GPUS LIMIT_S NAME ARGS...: python -m bench.NAME on GPUS, killed after LIMIT_S
bench() {
  local gpus=$1 limit=$2 name=$3; shift 3
  echo "=== $name on GPU $gpus (limit ${limit}s) at +$(( $(date +%s) - START ))s"
  CUDA_VISIBLE_DEVICES=$gpus timeout --signal=TERM --kill-after=15 "$limit" \
    python3 -m "bench.$name" --data-dir "$DATA" --out-dir "$OUT" "$@" \
    > /dev/null 2> "$OUT/$name.log"
  echo "=== $name: exit $? at +$(( $(date +%s) - START ))s"
  tail -n 4 "$OUT/$name.log"
}

ABLATION_VARIANTS=${ABLATION_VARIANTS:-rope,sinusoid,no_label_smoothing,six_layers}
phase1_gpu0() { bench 0 300 throughput --budget-s 280 --sizes 16384; }
phase1_gpu1() {
  bench "$1" 300 ablation --work-dir "$AMT_HOME/ablation" --variants "$ABLATION_VARIANTS"
}
phase2_gpu0() { bench 0 100 idle; }
phase2_gpu1() {
  local run
  run=$(ls -d "$AMT_HOME"/ablation/*/ 2>/dev/null | while read -r d; do
          [ -f "$d/result.json" ] && echo "$d"; done | head -n 1)
  if [ -n "$run" ]; then
    bench "$1" 110 decode --from-run "$run" --repeats 2 --budget-s 90
  else
    bench "$1" 110 decode --repeats 1 --budget-s 90   # untrained weights: decodes to the limit
  fi
}

# the data cache (tokenizer, encoded splits) once, before the lanes share it
python3 - "$(realpath "$DATA")" <<'EOF' 2>&1 | tail -n 2
import dataclasses, sys
from trainer.config import load_config
from trainer.data import prepare
d = sys.argv[1]
cfg = load_config("configs/train.yaml").data
cfg = dataclasses.replace(cfg, source="tsv", path=None, train_path=f"{d}/train.tsv",
                          val_path=f"{d}/val.tsv", test_path=f"{d}/test.tsv")
data = prepare(cfg)
print("suite: data cache ready:", len(data.train), "train pairs, vocab", data.vocab_size)
EOF

if (( N_GPUS >= 2 )); then
  phase1_gpu0 & A=$!; phase1_gpu1 1 & B=$!; wait $A $B
  phase2_gpu0 & A=$!; phase2_gpu1 1 & B=$!; wait $A $B
  bench 0,1 150 scaling
else
  phase1_gpu0; phase2_gpu0; phase1_gpu1 0; phase2_gpu1 0
  echo "suite: scaling needs 2 GPUs"
fi
# at most 8 files come back from a device call: the benchmarks' logs go in one tarball
(cd "$OUT" && tar -cf logs.tar --exclude suite.log ./*.log && find . -maxdepth 1 -name '*.log' \
  ! -name suite.log -delete)
ls -la "$OUT"
echo "suite: done in $(( $(date +%s) - START ))s"
