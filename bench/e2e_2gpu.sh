#!/usr/bin/env bash
# Issue 9 on a 2-GPU host with no network, driven by the CLI exactly as a team would:
#   embedded PostgreSQL (from its wheel) -> create-study (configs/search.yaml: the report's
#   space, its three trials enqueued, Hyperband, the truncated budget; the Bible TSV) ->
#   launch --gpus all (one worker per GPU, nvidia-smi snapshot) -> trials / status / best ->
#   promote -> torchrun on both GPUs for a bounded time (EMA, early stopping, test-split BLEU-4)
#   -> checkpoint manifest verified and reloaded -> report (figures, REPORT.md).
# Needs .whl/ (bash ../shared/tools/offline-wheels.sh .whl) and .data/bible-en-fr/*.tsv
# (python -m trainer.data export --src 4 --tgt 5 --out .data/bible-en-fr); carry both.
#
#   SEARCH_S=230 N_TRIALS=30 FULL_STEPS=2000 FULL_S=170 bash bench/e2e_2gpu.sh
#
# SEARCH_S: no trial starts after it (the study's timeout_s; running trials finish).
# MAX_STEPS / EVAL_EVERY: the trials' budget (default: search.yaml's, 480 / 80).
# FULL_STEPS / FULL_S: the promoted run's schedule length and wall-clock bound.
# Writes to $OUT: e2e.log, nvidia-smi-workers.csv, trials.json, status.json, full_run.json,
# report.tar (amt-search report's REPORT.md and figures).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/amt-e2e-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/e2e.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 AMT_PROGRESS=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export AMT_HOME=${AMT_HOME:-/tmp/amt-e2e}
STUDY=${STUDY:-e2e-2xh200}
amt() { python3 -m search.cli "$@"; }
START=$(date +%s)
stamp() { echo "=== $* at +$(( $(date +%s) - START ))s"; }
nvidia-smi -L

# configs/search.yaml as it is, on the exported Bible, with the e2e's time bound
python3 - <<EOF
import yaml
raw = yaml.safe_load(open("configs/search.yaml"))
raw["name"] = "$STUDY"
raw["base_config"] = "train.yaml"
d = "$PWD/.data/bible-en-fr"
raw["overrides"] = {"data.source": "tsv", "data.train_path": f"{d}/train.tsv",
                    "data.val_path": f"{d}/val.tsv", "data.test_path": f"{d}/test.tsv"}
t = raw["truncation"]
t["max_steps"] = int("${MAX_STEPS:-0}") or t["max_steps"]
t["eval_every"] = int("${EVAL_EVERY:-0}") or t["eval_every"]
raw.update(n_trials=${N_TRIALS:-30}, timeout_s=${SEARCH_S:-230}, heartbeat_interval_s=10,
           grace_period_s=40)
yaml.safe_dump(raw, open("configs/$STUDY.yaml", "w"), sort_keys=False)
print("truncation:", t)
EOF
amt create-study --config "configs/$STUDY.yaml" || exit 1
( sleep 60; nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv \
    > "$OUT/nvidia-smi-workers.csv"; nvidia-smi >> "$OUT/nvidia-smi-workers.csv" ) &
stamp "launch"
timeout --signal=TERM --kill-after=30 $(( ${SEARCH_S:-230} + 150 )) \
  python3 -m search.cli launch --study "$STUDY" --gpus all --progress-every 30
stamp "search done (exit $?)"
amt trials --study "$STUDY" --sort number
amt trials --study "$STUDY" --sort number --format json > "$OUT/trials.json"
amt status --study "$STUDY" --format json > "$OUT/status.json"
BEST=$(python3 -c "import json; print(json.load(open('$OUT/status.json'))['best_trial'])")
stamp "best trial: $BEST"
amt promote --study "$STUDY" --trial "$BEST" --out "$AMT_HOME/full.yaml" || exit 1

# The full recipe (EMA, early stopping, eval.test) on both GPUs, bounded: FULL_STEPS steps of
# one 16k-token micro-batch per GPU (the schedule compressed to them), FULL_S seconds at most.
stamp "full run"
torchrun --standalone --nproc-per-node 2 -m trainer.cli --config "$AMT_HOME/full.yaml" \
  --out-dir "$AMT_HOME/full-run" --set train.max_time_s=${FULL_S:-170} \
  --set train.max_steps=${FULL_STEPS:-2000} --set train.grad_accum=1 --set optim.warmup=0.05 \
  --set train.eval_every=$(( ${FULL_STEPS:-2000} / 8 )) --set train.eval_subset=300 \
  --set train.ema_decay=0.999 --set eval.test=true --set eval.ndd=true
stamp "full run done (exit $?)"
python3 - <<EOF
import json, pathlib
from storage.checkpoints import latest_checkpoint, load_checkpoint, verify
from trainer.config import config_from_dict
from trainer.model import DecoderLM
run = pathlib.Path("$AMT_HOME/full-run")
checks = verify(run)
ckpt = latest_checkpoint(run)
state = load_checkpoint(ckpt)
cfg = config_from_dict(state["config"])
model = DecoderLM(cfg.model, state["ema"]["wte.weight"].shape[0], 0)
model.load_state_dict(state["ema"])  # the EMA weights the test BLEU was computed with
res = json.loads((run / "result.json").read_text())
print("manifest:", [(c.path.name, c.ok) for c in checks], "reloaded", ckpt.name,
      sum(p.numel() for p in model.parameters()), "parameters")
curve = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
json.dump({"result": res, "manifest_ok": all(c.ok for c in checks), "checkpoint": ckpt.name,
           "reloaded_parameters": sum(p.numel() for p in model.parameters()), "curve": curve,
           "config": state["config"]}, open("$OUT/full_run.json", "w"), indent=1)
EOF
stamp "report"
amt report --study "$STUDY" --out "$AMT_HOME/report" --run "$AMT_HOME/full-run"
tar -C "$AMT_HOME" -cf "$OUT/report.tar" report
stamp "e2e done"
# P1's eager comparison on the idle GPU when the call has time left (E2E_BUDGET_S, default 480)
if (( $(date +%s) - START < ${E2E_BUDGET_S:-480} - 90 )); then
  CUDA_VISIBLE_DEVICES=0 timeout 85 python3 -m bench.throughput --data-dir .data/bible-en-fr \
    --sizes 16384 --compile-sizes '' --no-causal --budget-s 75 --out "$OUT/throughput.json" \
    > /dev/null 2> "$OUT/throughput.log"
  stamp "throughput (eager) done (exit $?)"
fi
