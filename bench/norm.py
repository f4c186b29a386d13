"""P1 drill-down: post-norm's dropout + drop-path + residual add + LayerNorm (``trainer.norm``)
against Inductor's, alone.

On a residual stream of the report's shape (``--tokens`` x 768, bf16), a branch with its
projection's bias, a dropout keep mask (p 0.1) and a drop-path scale per sequence: Inductor's
compiled PyTorch of the same function (the reference of the run, as the compiled block ran it
before ``train.fused_norm``) against ``trainer.norm.residual_norm`` compiled the same way, forward
and forward + backward; a plain copy of the stream (what one read and one write cost); then
``trainer.norm``'s two kernels alone, launched directly, under each (rows, steps, warps) of the
forward's and the backward's sweeps. (Its session-12 version also timed the mask drawn inside
the kernels from its seed, since removed: ``..._norm-2.json``'s ``drawn``.) Milliseconds per
call (CUDA events over ``--iters`` calls after three warm-up
calls) and the bandwidth each kernel reaches on the bytes it must move.

Run on a GPU: ``python -m bench.norm``; ``--tiny`` is a CPU smoke run in Triton's interpreter
(``TRITON_INTERPRET=1``; its times mean nothing).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from bench import common
from bench.gelu import per_call_ms

log = logging.getLogger("bench.norm")

# (rows, steps, warps)
FORWARD_SWEEP = [(4, 1, 4), (1, 8, 4), (1, 1, 4), (1, 16, 4), (8, 1, 8), (2, 4, 8), (1, 1, 2)]
BACKWARD_SWEEP = [(1, 32, 4), (1, 8, 4), (1, 16, 4), (1, 64, 4), (1, 32, 1), (1, 32, 2),
                  (1, 32, 8)]


def _add_up(partials: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [t.sum(0) for t in partials]


def main(argv: list[str] | None = None) -> int:
    p = common.parser("norm", __doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536, help="rows (tokens of a micro-batch)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (drop-path rows)")
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args(argv)
    common.setup_logging()
    from trainer import norm
    from trainer.dropout import dropout_mask

    gpu = common.on_gpu()
    M, C, T = (args.tokens, args.d_model, args.seq) if not args.tiny else (96, 160, 8)
    fwd_sweep = FORWARD_SWEEP if not args.tiny else FORWARD_SWEEP[:2]
    bwd_sweep = BACKWARD_SWEEP if not args.tiny else BACKWARD_SWEEP[:2]
    iters = args.iters if not args.tiny else 2
    device = torch.device("cuda" if gpu else "cpu")
    # bytes a kernel must move: forward reads x, branch, mask, writes y; backward reads x,
    # branch, mask, dy, writes dx, dbranch (bf16 streams, a bool mask)
    fwd_bytes, bwd_bytes = M * C * (2 * 3 + 1), M * C * (2 * 5 + 1)
    report = common.Report("norm", args, {
        "rows": M, "d_model": C, "seq": T, "dtype": "bfloat16", "iters": iters,
        "forward_sweep": fwd_sweep, "backward_sweep": bwd_sweep,
        "current": {"forward": norm.FORWARD, "backward": norm.BACKWARD}})
    gen = torch.Generator(device=device).manual_seed(0)
    B = M // T

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen)

    x, branch, dy = (randn(M, C).bfloat16() for _ in range(3))
    bias = randn(C) * 0.1
    layer_norm = torch.nn.LayerNorm(C).to(device)
    mask = dropout_mask([M, C], 0.1, torch.tensor([7], device=device))
    scale = (torch.rand(B, device=device, generator=gen) > 0.1).float() / 0.9
    seq = (B, T, C)

    def plain(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """As the compiled block ran it before train.fused_norm (trainer.model.Block.residual)."""
        b = (branch + bias.to(branch.dtype)) * mask.view(seq) * (1.0 / 0.9)
        b = b * scale.to(x.dtype)[:, None, None]
        return layer_norm(x + b).type_as(x)

    def ours(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return norm.residual_norm(x, branch, mask.view(seq), scale, 0.1, layer_norm, bias)

    # whole functions, forward and backward, compiled as train.compile compiles (dynamic
    # shapes, kernel tuning): what a training step runs, launches and small sums included
    compiled: dict[str, Any] = {}
    for name, fn in (("inductor", plain), ("ours", ours)):
        compiled[name] = torch.compile(fn, dynamic=True, options={
            "coordinate_descent_tuning": True}) if gpu else fn
    leaves = [t.view(seq).clone().requires_grad_() for t in (x, branch)]
    bias.requires_grad_()

    def fwd_bwd(fn: Any) -> Any:
        def run() -> None:
            fn(*leaves).backward(dy.view(seq))
            for t in (*leaves, bias, layer_norm.weight, layer_norm.bias):
                t.grad = None
        return run

    whole: dict[str, dict[str, float]] = {}
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=gpu)
    for name, fn in compiled.items():
        with autocast, torch.no_grad():
            fwd_ms = per_call_ms(functools.partial(fn, *leaves), iters)
        with autocast:
            whole[name] = {"fwd_ms": fwd_ms, "fwd_bwd_ms": per_call_ms(fwd_bwd(fn), iters)}
    report["compiled"] = whole
    report["copy_ms"] = per_call_ms(lambda: x.clone(), iters)

    def gbps(nbytes: int, ms: float) -> float:
        return round(nbytes / ms / 1e6, 1)

    # the kernels alone, launched directly (no op or autograd around them)
    y, dx, dbranch = (torch.empty_like(x) for _ in range(3))
    mean, rstd = (torch.empty(M, device=device) for _ in range(2))
    w, b = layer_norm.weight.detach(), layer_norm.bias.detach()
    saved = norm.FORWARD, norm.BACKWARD
    forward: dict[str, dict[str, float]] = {}
    backward: dict[str, dict[str, float]] = {}
    report["forward"], report["backward"] = forward, backward
    try:
        for tiles in fwd_sweep:
            norm.FORWARD = tiles
            grid, fargs, kw = norm.forward_launch(x, branch, bias.detach(), mask, scale, T,
                                                  0.1, w, b, 1e-5, y, mean, rstd)
            ms = per_call_ms(functools.partial(norm._norm_forward_kernel[grid], *fargs, **kw),
                             iters)
            forward["r{}s{}w{}".format(*tiles)] = {"ms": ms, "gb_per_s": gbps(fwd_bytes, ms)}
            log.info("forward %s: %.4f ms", tiles, ms)
            report.save()
        for tiles in bwd_sweep:
            norm.BACKWARD = tiles
            grid, bargs, kw = norm.backward_launch(x, branch, bias.detach(), mask, scale, T,
                                                   0.1, w, mean, rstd, dy, dx, dbranch)
            ms = per_call_ms(functools.partial(norm._norm_backward_kernel[grid], *bargs, **kw),
                             iters)
            sums_ms = per_call_ms(functools.partial(_add_up, bargs[11:14]), iters)
            backward["r{}s{}w{}".format(*tiles)] = {
                "ms": ms, "partial_sums_ms": sums_ms, "gb_per_s": gbps(bwd_bytes, ms)}
            log.info("backward %s: %.4f ms (+ %.4f ms adding up the partial sums)", tiles, ms,
                     sums_ms)
            report.save()
    finally:
        norm.FORWARD, norm.BACKWARD = saved
    best_fwd = min(forward, key=lambda k: forward[k]["ms"])
    best_bwd = min(backward, key=lambda k: backward[k]["ms"] + backward[k]["partial_sums_ms"])
    report["best"] = {"forward": best_fwd, "backward": best_bwd}
    report["comparison"] = {
        "fwd_vs_inductor": round(whole["inductor"]["fwd_ms"] / whole["ours"]["fwd_ms"], 3),
        "fwd_bwd_vs_inductor": round(whole["inductor"]["fwd_bwd_ms"]
                                     / whole["ours"]["fwd_bwd_ms"], 3),
        "copy_gb_per_s": gbps(2 * M * C * 2, report["copy_ms"])}
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
