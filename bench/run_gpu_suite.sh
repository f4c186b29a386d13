#!/usr/bin/env bash
# Issue 8's GPU benchmarks (and Report 03 §6's ablation) in one device call of < 10 minutes.
#
#   bash bench/run_gpu_suite.sh            on a machine with 2 H200s (or 1: the lanes run in turn)
#
# Needs, beside the repository: the wheels in .whl/ (bash ../shared/tools/offline-wheels.sh .whl, and
# pip download --only-binary=:all: --python-version 3.12 --platform any -d .whl pytest)
# and the exported Bible in .data/bible-en-fr/{train,val,test}.tsv
# (python -m trainer.data export --src 4 --tgt 5 --out .data/bible-en-fr); carry both.
# Writes $OUT/<date>_<hardware>_<bench>.json per benchmark and $OUT/suite.log.
#
# Two phases:
#   1. GPU 0: throughput (P1: ours vs HF GPTNeoX, eager and compiled, 16k micro-batches;
#             Inductor limited to $COMPILE_THREADS compile workers, recompiles logged)
#      GPU 1: ablation (Report 03 §6 at the truncated budget; $ABLATION_VARIANTS, default all),
#             then decode (P2) on a finished ablation run's weights, then idle (P6)
#   2. both:  scaling (P3: the same slice with 1 worker, then one per GPU)
# torch.compile's workers take every CPU core unless limited and slow a neighbour's eager
# steps 2-4x (2026-11-28 suite): with 8 of 32 cores for them, GPU 1's lane runs beside.
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
COMPILE_THREADS=${COMPILE_THREADS:-8}
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:---sizes 16384 --profile}   # e.g. "--sizes 16384 --compile-sizes=" (eager only)
lane0() {
  # shellcheck disable=SC2086
  TORCHINDUCTOR_COMPILE_THREADS=$COMPILE_THREADS TORCH_LOGS=recompiles \
    bench 0 420 throughput --budget-s 400 $THROUGHPUT_ARGS  # lane 1 takes ~450 s anyway
}
lane1() {
  local gpu=$1 run
  echo "=== tests/trainer/test_cuda.py -k decoding on GPU $gpu"  # CUDA-graph decoding checked
  CUDA_VISIBLE_DEVICES=$gpu timeout 90 python3 -m pytest -q -p no:cacheprovider \
    tests/trainer/test_cuda.py -k decoding > "$OUT/test_cuda.log" 2>&1; tail -n 3 "$OUT/test_cuda.log"
  echo "=== the trainer's Triton kernels on GPU $gpu (compiled, bf16)"
  CUDA_VISIBLE_DEVICES=$gpu timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/trainer/test_loss.py tests/trainer/test_gelu.py tests/trainer/test_norm.py \
    tests/trainer/test_kernel_writes.py > "$OUT/test_kernels.log" 2>&1
  tail -n 3 "$OUT/test_kernels.log"
  bench "$gpu" 270 ablation --work-dir "$AMT_HOME/ablation" --variants "$ABLATION_VARIANTS"
  run=$(ls -d "$AMT_HOME"/ablation/*/ 2>/dev/null | while read -r d; do
          [ -f "$d/result.json" ] && echo "$d"; done | head -n 1)
  if [ -n "$run" ]; then
    bench "$gpu" 75 decode --from-run "$run" --repeats 2 --budget-s 60 --profile
  else
    bench "$gpu" 75 decode --repeats 1 --budget-s 60   # untrained weights: decodes to the limit
  fi
  bench "$gpu" 50 idle
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
  lane0 & A=$!; lane1 1 & B=$!; wait $A $B
  bench 0,1 200 scaling
else
  lane0; lane1 0
  echo "suite: scaling needs 2 GPUs"
fi
# at most 8 files come back from a device call: the benchmarks' logs go in one tarball
(cd "$OUT" && tar -cf logs.tar --exclude suite.log ./*.log && find . -maxdepth 1 -name '*.log' \
  ! -name suite.log -delete)
ls -la "$OUT"
echo "suite: done in $(( $(date +%s) - START ))s"
