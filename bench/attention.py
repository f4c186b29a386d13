"""P1 drill-down: attention alone, the fused kernel (``trainer.attention``) against SDPA.

Per row length, the same qkv projection output (B, T, 3C) of the report's shape (12 heads of
64) at ``--tokens`` per micro-batch, with the prefix-LM mask, dropout 0.1 and RoPE:
- ``sdpa``: what the block did before the kernel (the reference of the run): RoPE on q and k,
  transposes, ``F.scaled_dot_product_attention`` with a (B, 1, T, T) mask (the memory-efficient
  kernel: the only one taking a mask and dropout), the output transposed back;
- ``fused``: ``trainer.attention.fused_attention``, under each block configuration of
  ``--sweep`` (queries and keys per block, warps; kernel by kernel), then with the best one and
  with the current ``trainer.attention.TILES``; at rows of 65 to 64 + ``TAIL_MAX`` tokens also
  without the one-kernel backward's tail tile (one tile of 128 keys).
Forward and forward + backward, device time of ``--iters`` calls (their kernels' time summed by
the profiler: the host's launch overhead is not counted), eager (the compiled block calls both
the same way: an opaque custom op and SDPA's kernels). The best blocks per
``tile_width`` are what ``trainer.attention.TILES`` should hold.

Run on a GPU: ``python -m bench.attention``; on CPU, ``TRITON_INTERPRET=1 python -m
bench.attention --tiny`` is a smoke run in Triton's interpreter (its times mean nothing).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench import common

log = logging.getLogger("bench.attention")


def sdpa_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                   prefix: torch.Tensor, n_heads: int, dropout: float) -> torch.Tensor:
    from trainer.model import apply_rotary, attention_mask

    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_heads, C3 // (3 * n_heads)).unbind(2)
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = attention_mask(torch.zeros_like(prefix), prefix, T, T)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)


def timed(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call of ``fn``: on a GPU its kernels' device time, summed by the profiler
    over ``iters`` calls (at short rows the host's launch overhead outlasts the kernels, so
    a wall clock would time the host); on CPU (the interpreter) wall time. After one call."""
    fn()
    if not common.on_gpu():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters
    busy = common.profile_ops(lambda: [fn() for _ in range(iters)], top=0)["device_busy_s"]
    return float(busy) / iters


def main(argv: list[str] | None = None) -> int:
    p = common.parser("attention", __doc__ or "")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per micro-batch")
    p.add_argument("--lengths", default="66,40,100,128,24")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", default="fwd_m=32,64,128;fwd_n=32,64;fwd_warps=4,8;"
                   "bwd_m=16,32,64;bwd_warps=4,8;"
                   "dq_m=32,64;dq_n=32,64;dq_warps=4,8;dkv_m=32,64;dkv_n=32,64;dkv_warps=4,8",
                   help="block values to try, key=v1,v2;... (keys of trainer.attention."
                   "DEFAULT_TILES, and fwd_stages, bwd_maxnreg...; 0: the default); swept "
                   "kernel by kernel: forward (forward times), then the backward's (forward + "
                   "backward)")
    args = p.parse_args(argv)
    common.setup_logging()
    from trainer import attention
    from trainer.model import rotary_angles

    gpu = common.on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    if attention.triton is None:
        p.error("needs Triton (pip install triton; CUDA builds of torch bring it)")
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("needs a GPU; on CPU run --tiny with TRITON_INTERPRET=1 (Triton's interpreter)")
    n_heads, hs, dropout = 12, 64, 0.1
    if args.tiny:
        n_heads, args.tokens, args.lengths, args.iters = 2, 280, "20,140", 1
        args.sweep = "fwd_m=16,32;bwd_m=16;dq_n=16;dkv_m=16"
    sweep = {k: [int(x) for x in v.split(",")]
             for k, v in (item.split("=") for item in args.sweep.split(";") if item)}
    lengths = [int(n) for n in args.lengths.split(",") if n]
    dtype = torch.bfloat16 if gpu else torch.float32
    report = common.Report("attention", args, {
        "heads": n_heads, "head_size": hs, "dropout": dropout, "mask": "prefix (random ends)",
        "rope": True, "tokens": args.tokens, "lengths": lengths, "dtype": str(dtype),
        "sweep": sweep, "reference": "sdpa (RoPE + transposes + memory-efficient SDPA), same run"})
    results: dict[str, Any] = {}
    report["results"] = results
    gen = torch.Generator().manual_seed(0)
    for T in lengths:
        B = args.tokens // T
        qkv = torch.randn(B, T, 3 * n_heads * hs, generator=gen).to(device, dtype)
        grad = torch.randn(B, T, n_heads * hs, generator=gen).to(device, dtype)
        prefix = torch.randint(T // 4, T * 3 // 4 + 1, (B,), generator=gen).to(device)
        angles = rotary_angles(torch.arange(T, device=device).expand(B, T), hs,
                               10000.0)[:, :, None]
        rope = (angles.cos(), angles.sin())
        x = qkv.clone().requires_grad_()

        def run(fn: Callable[..., torch.Tensor], backward: bool, x: torch.Tensor = x,
                qkv: torch.Tensor = qkv, rope: Any = rope, prefix: torch.Tensor = prefix,
                grad: torch.Tensor = grad) -> None:
            if backward:
                fn(x, rope, prefix, n_heads, dropout).backward(grad)
            else:
                with torch.no_grad():
                    fn(qkv, rope, prefix, n_heads, dropout)

        def both(fn: Callable[..., torch.Tensor]) -> dict[str, float]:
            return {"fwd_ms": timed(lambda: run(fn, False), args.iters) * 1e3,
                    "fwd_bwd_ms": timed(lambda: run(fn, True), args.iters) * 1e3}

        ref = both(sdpa_attention)
        width = attention.tile_width(T)
        saved = dict(attention.TILES)
        times: dict[str, dict[str, float]] = {}  # kernel -> str(tiles) (the JSON's keys) -> ms
        best: dict[str, int] = {}
        # greedy: the forward's blocks, then the backward's with those (one kernel up to
        # ONE_TILE_MAX_T tokens, else dq's, then dk/dv's)
        kernels = ("fwd", "bwd") if T <= attention.ONE_TILE_MAX_T else ("fwd", "dq", "dkv")
        try:
            for kernel in kernels:
                keys = [k for k in sweep if k.split("_")[0] == kernel]
                tried: dict[str, dict[str, int]] = {}
                for values in itertools.product(*(sweep[k] for k in keys)):
                    tiles = {**best, **dict(zip(keys, values, strict=True))}
                    tried[str(tiles)] = attention.TILES[width] = tiles
                    times.setdefault(kernel, {})[str(tiles)] = timed(functools.partial(
                        run, attention.fused_attention, kernel != "fwd"), args.iters) * 1e3
                if tried:
                    best = tried[min(times[kernel], key=times[kernel].__getitem__)]
        finally:
            attention.TILES.clear()
            attention.TILES.update(saved)
        attention.TILES[width] = best
        fused = both(attention.fused_attention)
        attention.TILES.clear()
        attention.TILES.update(saved)
        default = both(attention.fused_attention)
        one_tile = None
        if 64 < T <= 64 + attention.TAIL_MAX:  # what the backward's tail tile of keys gains
            saved_tail, attention.TAIL_MAX = attention.TAIL_MAX, 0
            try:
                one_tile = both(attention.fused_attention)
            finally:
                attention.TAIL_MAX = saved_tail
        results[str(T)] = {
            "batch": B, "tile_width": width, "sdpa": {k: round(v, 3) for k, v in ref.items()},
            "fused_best_tiles": best,
            "fused_best": {k: round(v, 3) for k, v in fused.items()},
            "fused_current_tiles": {k: round(v, 3) for k, v in default.items()},
            "speedup_fwd": round(ref["fwd_ms"] / fused["fwd_ms"], 3),
            "speedup_fwd_bwd": round(ref["fwd_bwd_ms"] / fused["fwd_bwd_ms"], 3),
            "speedup_fwd_bwd_current_tiles": round(ref["fwd_bwd_ms"] / default["fwd_bwd_ms"], 3),
            **({"fused_current_tiles_without_tail": {k: round(v, 3)
                                                     for k, v in one_tile.items()},
                "tail_speedup_fwd_bwd": round(one_tile["fwd_bwd_ms"] / default["fwd_bwd_ms"],
                                              3)} if one_tile else {}),
            "sweep_ms": {kernel: {k: round(v, 3) for k, v in t.items()}
                         for kernel, t in times.items()},
        }
        log.info("T=%d: sdpa %.3f/%.3f ms, fused %.3f/%.3f ms (fwd/fwd+bwd) with %s", T,
                 ref["fwd_ms"], ref["fwd_bwd_ms"], fused["fwd_ms"], fused["fwd_bwd_ms"], best)
        report.save()
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
