"""AdamW with layer-wise LR decay and the warm-up + decay schedule (Report 03 §2, §3).

Layer-wise LR decay (``optim.layer_lr_decay`` = d, L = ``model.n_layers``), blocks numbered
l = 0 (bottom) ... L-1 (top), as in BEiT/ELECTRA:

=====================================  =================
parameters                             learning rate
=====================================  =================
token embedding (also the tied head)   lr * d**(L + 1)
block l                                lr * d**(L - l)
final norm (pre-norm), untied LM head  lr
=====================================  =================

so the top block trains at ``lr * d`` and every step down multiplies by ``d`` once more.
Weight decay applies to matrices only: never to norms, biases or embeddings.

The learning rate is a pure function of the optimiser step (:func:`lr_multiplier`), so a
checkpoint only needs the step to resume the schedule.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainer.config import OptimConfig
from trainer.model import DecoderLM

__all__ = ["build_optimizer", "layer_lr_scales", "lr_multiplier", "set_lr", "warmup_steps"]


def _layer_of(name: str, n_layers: int) -> int:
    """Depth used for the LR decay: 0 embeddings, 1 + l for block l, n_layers + 1 on top."""
    if name.startswith("wte."):
        return 0
    if name.startswith("blocks."):
        return 1 + int(name.split(".")[1])
    return n_layers + 1


def layer_lr_scales(model: DecoderLM, decay: float) -> dict[str, float]:
    """The LR multiplier of every parameter by name (see the module docstring)."""
    L = model.cfg.n_layers
    return {n: decay ** (L + 1 - _layer_of(n, L)) for n, _ in model.named_parameters()}


def build_optimizer(model: DecoderLM, cfg: OptimConfig, *, fused: bool = False
                    ) -> torch.optim.AdamW:
    """AdamW over one parameter group per (LR scale, decay or not).

    Each group carries ``lr_scale``; :func:`set_lr` sets ``lr = peak * lr_scale * schedule``.
    """
    scales = layer_lr_scales(model, cfg.layer_lr_decay)
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = p.dim() >= 2 and not name.startswith(("wte.", "lm_head."))
        key = (scales[name], decays)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scales[name],
                           "weight_decay": cfg.weight_decay if decays else 0.0,
                           "lr": cfg.lr * scales[name]}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)


def warmup_steps(cfg: OptimConfig, max_steps: int) -> int:
    """``optim.warmup`` below 1 is a fraction of ``max_steps``, otherwise a number of steps."""
    return round(cfg.warmup * max_steps) if cfg.warmup < 1 else int(cfg.warmup)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Schedule factor for optimiser step ``step`` (0-based): linear warm-up to 1 over the
    warm-up steps, then cosine/linear decay to ``min_lr_ratio`` at ``max_steps`` (or constant)."""
    warm = warmup_steps(cfg, max_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, max_steps - warm))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, max_steps: int
           ) -> float:
    """Set every group's LR for ``step``; returns the peak-scale LR (for logging)."""
    lr = cfg.lr * lr_multiplier(step, cfg, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr
