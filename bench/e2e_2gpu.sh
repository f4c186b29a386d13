#!/usr/bin/env bash
# Issue 9's slice on a 2-GPU host with no network, driven by the CLI exactly as a team would:
#   embedded PostgreSQL -> create-study (report space, truncated budget, Bible TSV) ->
#   launch --gpus all (one worker per GPU, nvidia-smi snapshot) -> best -> promote ->
#   torchrun on both GPUs for a bounded time (EMA, test-split BLEU-4) -> manifest verified ->
#   report figures.
# Needs .whl/ (bash ../shared/tools/offline-wheels.sh .whl) and .data/bible-en-fr/*.tsv
# (python -m trainer.data export --src 4 --tgt 5 --out .data/bible-en-fr); carry both.
#   SEARCH_S=150 FULL_S=120 bash bench/e2e_2gpu.sh
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
amt() { python3 -m search.cli "$@"; }
START=$(date +%s)
nvidia-smi -L

# The report's search space (configs/search.yaml) on a truncated budget, Bible TSV corpus.
python3 - <<EOF
import yaml
raw = yaml.safe_load(open("configs/search.yaml"))
raw["name"] = "e2e-2xh200"
d = "$PWD/.data/bible-en-fr"
raw["overrides"] = {"data.source": "tsv", "data.train_path": f"{d}/train.tsv",
                    "data.val_path": f"{d}/val.tsv", "data.test_path": f"{d}/test.tsv"}
raw["truncation"].update(max_steps=120, eval_every=30, eval_subset=100)
raw["truncation"]["overrides"].update({"train.grad_accum": 1, "train.eval_max_new_tokens": 96})
raw.update(n_trials=24, timeout_s=${SEARCH_S:-150}, heartbeat_interval_s=10, grace_period_s=40)
yaml.safe_dump(raw, open("configs/e2e-2xh200.yaml", "w"), sort_keys=False)
EOF
amt create-study --config configs/e2e-2xh200.yaml || exit 1
( sleep 45; nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv \
    > "$OUT/nvidia-smi-workers.csv"; nvidia-smi >> "$OUT/nvidia-smi-workers.csv" ) &
amt launch --study e2e-2xh200 --gpus all --progress-every 30
echo "=== search done after $(( $(date +%s) - START ))s"
amt trials --study e2e-2xh200 --sort number
BEST=$(amt best --study e2e-2xh200 --format json | python3 -c "import json,sys; print(json.load(sys.stdin)['trial'])")
echo "=== best trial: $BEST"
amt promote --study e2e-2xh200 --trial "$BEST" --out "$AMT_HOME/full.yaml"
# The full recipe (EMA, early stopping, both GPUs) bounded in time; the schedule compressed.
torchrun --standalone --nproc-per-node 2 -m trainer.cli --config "$AMT_HOME/full.yaml" \
  --out-dir "$AMT_HOME/full-run" --set train.max_time_s=${FULL_S:-120} \
  --set train.max_steps=200 --set optim.warmup=0.1 --set train.eval_every=40 \
  --set train.eval_subset=200 --set train.ema_decay=0.99 --set eval.test=true
python3 - <<EOF
import json, pathlib
from storage.checkpoints import latest_checkpoint, load_checkpoint, verify
run = pathlib.Path("$AMT_HOME/full-run")
checks = verify(run)
ckpt = latest_checkpoint(run)
state = load_checkpoint(ckpt)
res = json.loads((run / "result.json").read_text())
print("manifest:", [(c.path.name, c.ok) for c in checks], "reloaded", ckpt.name, len(state["model"]), "tensors")
curve = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
json.dump({"result": res, "manifest_ok": all(c.ok for c in checks), "curve": curve}, open("$OUT/full_run.json", "w"), indent=1)
EOF
amt report --study e2e-2xh200 --out "$OUT/report" --run "$AMT_HOME/full-run"
echo "=== e2e done after $(( $(date +%s) - START ))s"
