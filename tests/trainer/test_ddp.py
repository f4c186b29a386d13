"""Data parallel: ``torchrun --nproc-per-node 2 -m trainer.cli`` on CPU (gloo), then resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.trainer.synthetic import write_task

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "trainer.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_two_ranks_train_evaluate_and_resume(tmp_path: Path) -> None:
    task = write_task(tmp_path / "task.tsv")
    args = ["--config", "configs/tiny.yaml", "--set", "data.source=tsv",
            "--set", f"data.path={task}", "--set", f"data.cache_dir={tmp_path}/cache",
            "--set", "data.vocab_size=300", "--set", "model.d_model=32", "--set", "model.d_ff=64",
            "--set", "train.tokens_per_batch=512", "--set", "train.eval_every=2",
            "--set", "train.eval_subset=4", "--set", "train.eval_max_new_tokens=4",
            "--set", "train.max_time_s=600",  # exercises the ranks' stop agreement
            "--out-dir", str(tmp_path / "run")]
    first = torchrun(*args, "--set", "train.max_steps=4")
    assert first.returncode == 0, first.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 4
    second = torchrun(*args, "--set", "train.max_steps=6", "--resume")
    assert second.returncode == 0, second.stderr
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6]  # rank 0 wrote each once
