"""P1 drill-down: post-norm's dropout + drop-path + residual add + LayerNorm (``trainer.norm``)
against Inductor's, alone.

On a residual stream of the report's shape (``--tokens`` x 768, bf16), a branch with its
projection's bias, a dropout keep mask (p 0.1) and a drop-path scale per sequence: Inductor's
compiled PyTorch of the same function (the reference of the run, as the compiled block ran it
before ``train.fused_norm``; forward, then forward + backward), a plain copy of the stream
(what one read and one write cost), then ``trainer.norm``'s kernels under each (rows, steps,
warps) of the forward's and the backward's sweeps. Milliseconds per call (CUDA events over
``--iters`` calls after three warm-up calls) and the bandwidth each kernel reaches on the bytes
it must move.

Run on a GPU: ``python -m bench.norm``; ``--tiny`` is a CPU smoke run in Triton's interpreter
(``TRITON_INTERPRET=1``; its times mean nothing).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from bench import common
from bench.gelu import per_call_ms

log = logging.getLogger("bench.norm")

# (rows, steps, warps)
FORWARD_SWEEP = [(1, 8, 4), (1, 1, 1), (1, 4, 1), (1, 8, 1), (1, 1, 2), (1, 4, 2), (1, 8, 2),
                 (1, 1, 4), (2, 4, 2), (2, 4, 4), (4, 2, 4), (4, 2, 8)]
BACKWARD_SWEEP = [(1, 32, 4), (1, 16, 2), (1, 32, 2), (1, 64, 2), (1, 16, 4), (1, 64, 4),
                  (1, 128, 4), (1, 32, 8), (2, 16, 4), (2, 32, 8), (1, 32, 1), (1, 64, 1)]


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

    x, branch, dy = (randn(B, T, C).bfloat16() for _ in range(3))
    bias = randn(C) * 0.1
    layer_norm = torch.nn.LayerNorm(C).to(device)
    mask = dropout_mask([B, T, C], 0.1, torch.tensor([7], device=device))
    scale = (torch.rand(B, device=device, generator=gen) > 0.1).float() / 0.9
    leaves = [t.requires_grad_() for t in (x, branch)]

    def plain(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        b = (branch + bias.to(branch.dtype)) * mask * (1.0 / 0.9)
        b = b * scale.to(x.dtype)[:, None, None]
        return layer_norm(x + b).type_as(x)

    def ours(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return norm.residual_norm(x, branch, mask, scale, 0.1, layer_norm, bias)

    def fwd_bwd(fn: Any) -> Any:
        def run() -> None:
            fn(*leaves).backward(dy)
        return run

    reference_fn = plain
    if gpu:  # as train.compile compiles (dynamic shapes, kernel tuning)
        reference_fn = torch.compile(plain, dynamic=True,
                                     options={"coordinate_descent_tuning": True})
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=gpu)
    with autocast, torch.no_grad():
        reference = {"fwd_ms": per_call_ms(lambda: reference_fn(x, branch), iters)}
    with autocast:
        reference["fwd_bwd_ms"] = per_call_ms(fwd_bwd(reference_fn), iters)
    report["inductor"] = reference
    report["copy_ms"] = per_call_ms(lambda: x.detach().clone(), iters)

    def gbps(nbytes: int, ms: float) -> float:
        return round(nbytes / ms / 1e6, 1)

    saved = norm.FORWARD, norm.BACKWARD
    forward: dict[str, dict[str, float]] = {}
    backward: dict[str, dict[str, float]] = {}
    report["forward"], report["backward"] = forward, backward
    try:
        with torch.no_grad():
            for tiles in fwd_sweep:
                norm.FORWARD = tiles
                ms = per_call_ms(lambda: ours(x, branch), iters)
                forward["r{}s{}w{}".format(*tiles)] = {"ms": ms, "gb_per_s": gbps(fwd_bytes, ms)}
                log.info("forward %s: %.4f ms", tiles, ms)
                report.save()
        best_fwd = min(forward, key=lambda k: forward[k]["ms"])
        norm.FORWARD = fwd_sweep[list(forward).index(best_fwd)]
        for tiles in bwd_sweep:  # forward + backward, less the best forward
            norm.BACKWARD = tiles
            ms = per_call_ms(fwd_bwd(ours), iters)
            bwd = round(ms - forward[best_fwd]["ms"], 4)
            backward["r{}s{}w{}".format(*tiles)] = {
                "fwd_bwd_ms": ms, "ms": bwd, "gb_per_s": gbps(bwd_bytes, max(bwd, 1e-6))}
            log.info("backward %s: %.4f ms (with the forward %.4f)", tiles, bwd, ms)
            report.save()
    finally:
        norm.FORWARD, norm.BACKWARD = saved
    best_bwd = min(backward, key=lambda k: backward[k]["ms"])
    report["best"] = {"forward": best_fwd, "backward": best_bwd,
                      "fwd_ms": forward[best_fwd]["ms"],
                      "fwd_bwd_ms": backward[best_bwd]["fwd_bwd_ms"]}
    report["comparison"] = {
        "fwd_vs_inductor": round(reference["fwd_ms"] / forward[best_fwd]["ms"], 3),
        "fwd_bwd_vs_inductor": round(reference["fwd_bwd_ms"]
                                     / backward[best_bwd]["fwd_bwd_ms"], 3),
        "copy_gb_per_s": gbps(2 * M * C * 2, report["copy_ms"])}
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
