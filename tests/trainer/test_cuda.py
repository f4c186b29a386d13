"""The CUDA paths (bf16/fp16 autocast, GradScaler, fused AdamW, torch.compile); skipped
without a GPU. Run on a GPU machine: ``pytest tests/trainer/test_cuda.py``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from storage.checkpoints import load_checkpoint
from tests.trainer.synthetic import tiny_config, write_task
from trainer import fit
from trainer.config import ModelConfig
from trainer.decode import generate
from trainer.model import DecoderLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("task") / "task.tsv")


@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_fit_on_cuda(task: Path, tmp_path: Path, precision: str) -> None:
    cfg = tiny_config(task, tmp_path / "run", **{"train.precision": precision,
                                                  "model.grad_checkpointing": True})
    result = fit(cfg)
    assert math.isfinite(result.val_loss) and result.steps == 12
    state = load_checkpoint(result.checkpoint)  # type: ignore[arg-type]
    assert bool(state["scaler"]) == (precision == "fp16")  # GradScaler state only for fp16


def test_fit_compiled_and_resumed(task: Path, tmp_path: Path) -> None:
    first = fit(tiny_config(task, tmp_path / "run", **{"train.compile": True,
                                                        "train.max_steps": 8}))
    state = load_checkpoint(first.checkpoint)  # type: ignore[arg-type]
    assert not any(k.startswith("_orig_mod") for k in state["model"])  # the plain module's
    resumed = fit(tiny_config(task, tmp_path / "run", **{"train.compile": True}), resume=True)
    assert resumed.steps == 12 and math.isfinite(resumed.val_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decoding_on_cuda(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=64)
    model = DecoderLM(cfg, 50, 0).cuda().eval()
    sources = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 3]]
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        graphed = generate(model, sources, 1, 2, 0, 20)  # CUDA graph replays
        cached = generate(model, sources, 1, 2, 0, 20, static=False)
        recomputed = generate(model, sources, 1, 2, 0, 20, use_cache=False)
        beams = generate(model, sources, 1, 2, 0, 20, beam_size=4)
        beams_eager = generate(model, sources, 1, 2, 0, 20, beam_size=4, static=False)
    assert len(beams) == 3
    if dtype == torch.float32:
        assert graphed == cached == recomputed and beams == beams_eager


def test_unpadded_training_matches_padded(task: Path, tmp_path: Path) -> None:
    # train.unpad (the fused attention's rows without padding) against padded rows: the same
    # run in float32 without dropout (whose masks are drawn per element of other shapes);
    # stochastic depth draws per row either way. Then compiled in bf16, with dropout.
    common = {"model.d_model": 64, "model.n_heads": 2, "model.norm": "post",
              "model.dropout": 0.0, "train.attention": "fused", "train.precision": "fp32"}
    runs = [fit(tiny_config(task, tmp_path / f"run{unpad}", **common, **{"train.unpad": unpad}))
            for unpad in (False, True)]
    assert math.isclose(runs[0].val_loss, runs[1].val_loss, rel_tol=1e-3), runs
    compiled = fit(tiny_config(task, tmp_path / "compiled", **{
        **common, "model.dropout": 0.1, "train.precision": "auto", "train.compile": True}))
    assert math.isfinite(compiled.val_loss) and compiled.steps == 12
