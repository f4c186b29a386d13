"""AdamW groups, layer-wise LR decay and the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ModelConfig, OptimConfig
from trainer.model import DecoderLM
from trainer.optim import build_optimizer, lr_multiplier, set_lr, warmup_steps


def model(norm: str = "pre", tie: bool = True) -> DecoderLM:
    cfg = ModelConfig(n_layers=3, d_model=16, n_heads=2, d_ff=32, max_len=32, norm=norm,  # type: ignore[arg-type]
                      tie_embeddings=tie)
    return DecoderLM(cfg, vocab_size=20, pad_id=0)


def lr_by_name(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {n: g["lr"] for g in opt.param_groups for n in g["names"]}


def test_layer_wise_lr_decay_is_exact() -> None:
    """L = 3, d = 0.5: embeddings lr*d^4, block l lr*d^(3-l), final norm and head lr."""
    m = model(tie=False)
    opt = build_optimizer(m, OptimConfig(lr=1.0, layer_lr_decay=0.5, warmup=0))
    set_lr(opt, step=0, cfg=OptimConfig(lr=1.0, layer_lr_decay=0.5, warmup=0), max_steps=10)
    lrs = lr_by_name(opt)
    assert set(lrs) == {n for n, _ in m.named_parameters()}
    expected = {"wte.weight": 0.5**4, "norm_f.weight": 1.0, "norm_f.bias": 1.0,
                "lm_head.weight": 1.0}
    for layer in range(3):
        for name, _ in m.blocks[layer].named_parameters():
            expected[f"blocks.{layer}.{name}"] = 0.5 ** (3 - layer)
    assert lrs == expected  # exact: powers of two


def test_layer_wise_lr_follows_the_schedule() -> None:
    cfg = OptimConfig(lr=2e-4, layer_lr_decay=0.95, warmup=10)
    m = model()
    opt = build_optimizer(m, cfg)
    peak = set_lr(opt, step=4, cfg=cfg, max_steps=100)
    assert peak == pytest.approx(2e-4 * 5 / 10)
    assert lr_by_name(opt)["blocks.0.attn.qkv.weight"] == pytest.approx(peak * 0.95**3)
    assert lr_by_name(opt)["wte.weight"] == pytest.approx(peak * 0.95**4)


def test_weight_decay_only_on_matrices() -> None:
    m = model(tie=False)
    opt = build_optimizer(m, OptimConfig(weight_decay=0.01))
    decay = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    for name, p in m.named_parameters():
        is_matrix = p.dim() == 2 and name not in ("wte.weight", "lm_head.weight")
        assert decay[name] == (0.01 if is_matrix else 0.0), name
    assert decay["blocks.0.mlp.up.weight"] == 0.01
    assert decay["blocks.0.norm1.weight"] == decay["blocks.0.mlp.up.bias"] == 0.0


def test_optimizer_betas_and_param_coverage() -> None:
    m = model()
    opt = build_optimizer(m, OptimConfig())
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(("warmup", "steps"), [(0.05, 50), (10000, 10000), (0, 0), (0.5, 500)])
def test_warmup_steps_or_fraction(warmup: float, steps: int) -> None:
    assert warmup_steps(OptimConfig(warmup=warmup), max_steps=1000) == steps


def test_cosine_schedule_shape() -> None:
    cfg = OptimConfig(warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    values = [lr_multiplier(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_and_constant_schedules() -> None:
    linear = OptimConfig(warmup=0, schedule="linear")
    assert lr_multiplier(50, linear, 100) == pytest.approx(0.5)
    constant = OptimConfig(warmup=0.1, schedule="constant")
    assert lr_multiplier(4, constant, 100) == pytest.approx(0.5)
    assert lr_multiplier(99, constant, 100) == 1.0
    assert not math.isnan(lr_multiplier(0, OptimConfig(warmup=0), 1))
