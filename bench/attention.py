"""P1 drill-down: attention alone, the fused kernel (``trainer.attention``) against SDPA.

Per row length, the same qkv projection output (B, T, 3C) of the report's shape (12 heads of
64) at ``--tokens`` per micro-batch, with the prefix-LM mask, dropout 0.1 and RoPE:
- ``sdpa``: what the block did before the kernel (the reference of the run): RoPE on q and k,
  transposes, ``F.scaled_dot_product_attention`` with a (B, 1, T, T) mask (the memory-efficient
  kernel: the only one taking a mask and dropout), the output transposed back;
- ``fused``: ``trainer.attention.fused_attention``, under each tile configuration of
  ``--sweep`` (queries per iteration, warps, programs per (row, head)).
Forward and forward + backward, ``--iters`` calls back to back (device time), eager (the compiled
block calls both the same way: an opaque custom op and SDPA's kernels). The best tiles per
key-tile width are what ``trainer.attention.TILES`` should hold.

Run on a GPU: ``python -m bench.attention``; on CPU, ``TRITON_INTERPRET=1 python -m
bench.attention --tiny`` is a smoke run in Triton's interpreter (its times mean nothing).
"""

from __future__ import annotations

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
    """Seconds per call of ``iters`` calls back to back (the host queues ahead, as in training:
    device time, not the host's launch overhead), median of three such runs."""
    fn()
    times = []
    for _ in range(3):
        common.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        common.synchronize()
        times.append((time.perf_counter() - t0) / iters)
    return common.median(times)


def main(argv: list[str] | None = None) -> int:
    p = common.parser("attention", __doc__ or "")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per micro-batch")
    p.add_argument("--lengths", default="66,40,100,128,24")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", default="fwd_m=16,32,64;fwd_warps=4,8;fwd_split=1,2;"
                   "bwd_m=16,32,64;bwd_warps=4,8",
                   help="tile values to try: key=v1,v2;... (forward and backward apart)")
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
        n_heads, args.tokens, args.lengths, args.iters = 2, 256, "20", 1
        args.sweep = "fwd_m=16;fwd_warps=4;fwd_split=1,2;bwd_m=16;bwd_warps=4"
    sweep = {k: [int(x) for x in v.split(",")]
             for k, v in (item.split("=") for item in args.sweep.split(";") if item)}
    fwd_keys = [k for k in sweep if k.startswith("fwd")]
    bwd_keys = [k for k in sweep if k.startswith("bwd")]
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

        ref = {"fwd_ms": timed(lambda: run(sdpa_attention, False), args.iters) * 1e3,
               "fwd_bwd_ms": timed(lambda: run(sdpa_attention, True), args.iters) * 1e3}
        block_n = attention.tile_width(T)
        saved = dict(attention.TILES)
        fwd_times: dict[str, float] = {}
        bwd_times: dict[str, float] = {}
        tried: dict[str, dict[str, int]] = {}  # str(tiles) (the JSON's keys) -> tiles
        try:
            for values in itertools.product(*(sweep[k] for k in fwd_keys)):
                tiles = dict(zip(fwd_keys, values, strict=True))
                tried[str(tiles)] = attention.TILES[block_n] = tiles
                fwd_times[str(tiles)] = timed(
                    lambda: run(attention.fused_attention, False), args.iters) * 1e3
            best_fwd = min(fwd_times, key=fwd_times.__getitem__)
            for values in itertools.product(*(sweep[k] for k in bwd_keys)):
                tiles = {**tried[best_fwd], **dict(zip(bwd_keys, values, strict=True))}
                tried[str(tiles)] = attention.TILES[block_n] = tiles
                bwd_times[str(tiles)] = timed(
                    lambda: run(attention.fused_attention, True), args.iters) * 1e3
        finally:
            attention.TILES.clear()
            attention.TILES.update(saved)
        best = min(bwd_times, key=bwd_times.__getitem__)
        results[str(T)] = {
            "batch": B, "block_n": block_n, "sdpa": {k: round(v, 3) for k, v in ref.items()},
            "fused_best_tiles": tried[best],
            "fused_best": {"fwd_ms": round(fwd_times[best_fwd], 3),
                           "fwd_bwd_ms": round(bwd_times[best], 3)},
            "fused_default": {"fwd_ms": round(fwd_times.get(str({k: attention.DEFAULT_TILES[k]
                              for k in fwd_keys}), float("nan")), 3)},
            "speedup_fwd": round(ref["fwd_ms"] / fwd_times[best_fwd], 3),
            "speedup_fwd_bwd": round(ref["fwd_bwd_ms"] / bwd_times[best], 3),
            "sweep_fwd_ms": {k: round(v, 3) for k, v in fwd_times.items()},
            "sweep_fwd_bwd_ms": {k: round(v, 3) for k, v in bwd_times.items()},
        }
        log.info("T=%d: sdpa %.3f/%.3f ms, fused %.3f/%.3f ms (fwd/fwd+bwd) with %s", T,
                 ref["fwd_ms"], ref["fwd_bwd_ms"], fwd_times[best_fwd], bwd_times[best], best)
        report.save()
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
