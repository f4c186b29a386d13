"""P1 drill-down: the MLP's bias + GELU (``trainer.gelu``) against Inductor's, alone.

On the up-projection's output of the report's shape (``--tokens`` x 3072, bf16) and a float32
bias: Inductor's compiled GELU (the reference of the run: forward ``gelu(h)``, backward
``gelu_backward`` and the bias gradient's column sum, as the compiled block ran them before
``train.fused_mlp``), a plain copy of the tensor (what one read and one write cost), then
``trainer.gelu``'s kernels under each block shape of the sweep, with the polynomial erf and
with libdevice's, and a kernel that only adds the bias (the sweep's memory floor). Milliseconds
per call, CUDA events over ``--iters`` calls after three warm-up calls.

Run on a GPU: ``python -m bench.gelu``; ``--tiny`` is a CPU smoke run in Triton's interpreter
(``TRITON_INTERPRET=1``; its times mean nothing).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench import common

log = logging.getLogger("bench.gelu")

SWEEP = [(32, 128, 4), (64, 64, 4), (16, 256, 4), (32, 64, 2), (16, 128, 2), (64, 128, 8),
         (32, 256, 8), (8, 512, 4)]  # (BLOCK_M, BLOCK_N, warps)


def per_call_ms(fn: Callable[[], Any], iters: int) -> float:
    for _ in range(3):
        fn()
    if not common.on_gpu():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return round((time.perf_counter() - t0) / iters * 1e3, 4)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) / iters, 4)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("gelu", __doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=65536, help="rows (tokens of a micro-batch)")
    p.add_argument("--d-ff", type=int, default=3072)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args(argv)
    common.setup_logging()
    import triton
    import triton.language as tl

    from trainer import gelu

    gpu = common.on_gpu()
    M, N = (args.tokens, args.d_ff) if not args.tiny else (96, 160)
    sweep = SWEEP if not args.tiny else SWEEP[:2]
    iters = args.iters if not args.tiny else 2
    device = torch.device("cuda" if gpu else "cpu")
    report = common.Report("gelu", args, {"rows": M, "d_ff": N, "dtype": "bfloat16",
                                          "iters": iters, "sweep": sweep,
                                          "current": [gelu.BLOCK_M, gelu.BLOCK_N, gelu.WARPS]})
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, N, device=device, generator=gen).bfloat16()
    b = torch.randn(N, device=device, generator=gen)
    dy = torch.randn(M, N, device=device, generator=gen).bfloat16()
    h = (x.float() + b).bfloat16()  # what the matmul's bias epilogue gives Inductor's GELU

    def backward(dy: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dh = torch.ops.aten.gelu_backward(dy, h)
        return dh, dh.float().sum(0)

    if gpu:  # as train.compile compiles (dynamic shapes, kernel tuning)
        options: dict[str, Any] = {"coordinate_descent_tuning": True}
        fwd_ref = torch.compile(F.gelu, dynamic=True, options=options)
        bwd_ref = torch.compile(backward, dynamic=True, options=options)
    else:
        fwd_ref, bwd_ref = F.gelu, backward
    reference = {"fwd_ms": per_call_ms(lambda: fwd_ref(h), iters),
                 "bwd_ms": per_call_ms(lambda: bwd_ref(dy, h), iters)}
    report["inductor"] = reference
    report["copy_ms"] = per_call_ms(lambda: x.clone(), iters)

    @triton.jit
    def _bias_only_kernel(x, b, y, M, N, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offsets = rows[:, None] * stride + cols[None, :]
        h = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(b + cols, mask=cols < N, other=0.0)[None, :]
        tl.store(y + offsets, h.to(y.dtype.element_ty), mask=mask)

    saved = gelu.BLOCK_M, gelu.BLOCK_N, gelu.WARPS, gelu.FAST_ERF
    y = torch.empty_like(x)
    results: dict[str, dict[str, float]] = {}
    report["results"] = results
    try:
        for bm, bn, warps in sweep:
            gelu.BLOCK_M, gelu.BLOCK_N, gelu.WARPS = bm, bn, warps
            floor = _bias_only_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))]
            kw = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps}
            row = {"floor_ms": per_call_ms(functools.partial(floor, x, b, y, M, N, N, **kw),
                                           iters)}
            for fast in (True, False):
                gelu.FAST_ERF = fast
                erf = "fast" if fast else "libdevice"
                row[f"{erf}_fwd_ms"] = per_call_ms(lambda: gelu._bias_gelu(x, b), iters)
                row[f"{erf}_bwd_ms"] = per_call_ms(
                    lambda: gelu._bias_gelu_backward(x, b, dy), iters)
            row["fast_vs_inductor"] = round(
                (reference["fwd_ms"] + reference["bwd_ms"])
                / (row["fast_fwd_ms"] + row["fast_bwd_ms"]), 3)
            results[f"{bm}x{bn}w{warps}"] = row
            log.info("%dx%d, %d warps: %s", bm, bn, warps, row)
            report.save()
    finally:
        gelu.BLOCK_M, gelu.BLOCK_N, gelu.WARPS, gelu.FAST_ERF = saved
    best = min(results, key=lambda k: results[k]["fast_fwd_ms"] + results[k]["fast_bwd_ms"])
    report["best"] = {"blocks": best, **results[best]}
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
