"""Fused training attention for short rows: RoPE, the prefix-LM mask, softmax, dropout and
``P @ V`` in one Triton kernel per (row, head), read straight from the qkv projection.

Why: at the corpus's lengths (T ~ 66) SDPA's masked kernel (memory-efficient, the only one
taking both a mask and dropout) took 2.3 of a block's 9.2 ms of GPU time (64k tokens, H200),
with RoPE, transposes and the qkv gradient's concatenation around it. Here a whole row of
keys fits one tile (T <= ``MAX_T``): no online softmax, queries 16-64 at a time against it,
and the backward writes one (B, T, 3C) gradient (bench.attention, BENCHMARKS.md P1).

Same maths as :class:`trainer.model.SelfAttention` on SDPA: key ``k`` is visible to query
``q`` of row ``b`` when ``k < prefix_end[b]`` or ``k <= q`` (right padding only, as in
training); dropout drops probabilities after the softmax and scales by 1 / (1 - p). Random
bits come from Philox (``tl.randint4x``) on a per-call seed, regenerated in the backward.
"""

from __future__ import annotations

import math
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model uses SDPA
    triton = None

__all__ = ["MAX_T", "available", "fused_attention"]

MAX_T = 128  # longest row one key tile holds (the backward keeps its dk, dv in registers)


def available(device: torch.device, head_size: int) -> bool:
    """Whether training on ``device`` can use the kernel: a GPU, Triton, and a head size of
    32, 64 or 128 (RoPE splits it in halves, each a ``tl.dot`` operand of >= 16). (The tests
    also run it on CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``.)"""
    return triton is not None and device.type == "cuda" and head_size in (32, 64, 128)


def tile_width(T: int) -> int:
    """The key tile (``BLOCK_N``) of rows of T tokens: T rounded up to a power of two, >= 16."""
    return max(16, 1 << (T - 1).bit_length())


# tile shapes per key tile width (``tile_width``): queries
# per inner iteration and warps, of the forward and of the backward, and how many programs
# share a (row, head) in the forward; measured on an H200 (bench.attention)
TILES: dict[int, dict[str, int]] = {16: {"fwd_warps": 2},
                                     32: {"fwd_m": 32, "fwd_warps": 2, "bwd_m": 32},
                                     64: {"fwd_m": 64, "bwd_m": 64}}
DEFAULT_TILES = {"fwd_m": 16, "fwd_warps": 4, "fwd_split": 1, "bwd_m": 16, "bwd_warps": 4}


if triton is not None:

    @triton.jit
    def _rows(qkv, cos, sin, b, h, t, T, s_b, s_t, s_cb, s_ct, which: tl.constexpr,
              NH: tl.constexpr, HS: tl.constexpr, ROPE: tl.constexpr):
        """Rows ``t`` of q (which=0) or k (1) of head ``h``, rotated, as two halves (M, HS/2)
        in the input dtype."""
        HALF: tl.constexpr = HS // 2
        d = tl.arange(0, HALF)
        rows = (t < T)[:, None]
        base = qkv + b * s_b + t[:, None] * s_t + which * NH * HS + h * HS + d[None, :]
        x1 = tl.load(base, mask=rows, other=0.0)
        x2 = tl.load(base + HALF, mask=rows, other=0.0)
        if ROPE:
            angle = b * s_cb + t[:, None] * s_ct + d[None, :]
            c = tl.load(cos + angle, mask=rows, other=1.0)
            s = tl.load(sin + angle, mask=rows, other=0.0)
            y1 = x1.to(tl.float32) * c - x2.to(tl.float32) * s
            y2 = x1.to(tl.float32) * s + x2.to(tl.float32) * c
            return y1.to(x1.dtype), y2.to(x1.dtype)
        return x1, x2

    @triton.jit
    def _unrotate(g1, g2, cos, sin, b, t, T, s_cb, s_ct, HS: tl.constexpr):
        """The rotation's transpose: the gradient of rotated rows -> of the projection's."""
        d = tl.arange(0, HS // 2)
        rows = (t < T)[:, None]
        angle = b * s_cb + t[:, None] * s_ct + d[None, :]
        c = tl.load(cos + angle, mask=rows, other=1.0)
        s = tl.load(sin + angle, mask=rows, other=0.0)
        return g1 * c + g2 * s, g2 * c - g1 * s

    @triton.jit
    def _probs(q1, q2, k1, k2, tq, prefix, b, T, scale, PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
        """Scaled scores (M, BLOCK_N) fp32 of queries ``tq`` and the visibility mask."""
        tk = tl.arange(0, BLOCK_N)
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s = (s + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale
        end = tl.load(prefix + b)
        visible = ((tk[None, :] < end) | (tk[None, :] <= tq[:, None])) & (tk[None, :] < T)
        return s, visible

    @triton.jit
    def _keep(seed, pid, tq, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Dropout's keep mask (BLOCK_M, BLOCK_N) of queries ``tq``: one Philox counter per four
        keys gives four 32-bit draws; a key is kept when its draw's top 24 bits are >=
        ``threshold`` = p * 2**24 (the backward regenerates the same mask)."""
        c = tl.arange(0, BLOCK_N // 4)
        counters = (pid.to(tl.int64) * BLOCK_N + tq[:, None]) * (BLOCK_N // 4) + c[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
        r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
        return (r.to(tl.uint32, bitcast=True) >> 8).to(tl.int32) >= threshold

    # T is not a specialisation key: one compiled kernel per key-tile width, not one per length
    @triton.jit(do_not_specialize=["T"])
    def _forward_kernel(qkv, cos, sin, prefix, seed_ptr, out, lse, T, s_b, s_t, s_cb, s_ct,
                        scale, p_drop, threshold, NH: tl.constexpr, HS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                        ROPE: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // NH
        h = pid % NH
        tk = tl.arange(0, BLOCK_N)
        k1, k2 = _rows(qkv, cos, sin, b, h, tk, T, s_b, s_t, s_cb, s_ct, 1, NH, HS, ROPE)
        dv = tl.arange(0, HS)
        v = tl.load(qkv + b * s_b + tk[:, None] * s_t + 2 * NH * HS + h * HS + dv[None, :],
                    mask=(tk < T)[:, None], other=0.0)
        seed = tl.load(seed_ptr)  # (a dummy without dropout)
        for m0 in range(tl.program_id(1) * BLOCK_M, T, BLOCK_M * SPLIT):
            tq = m0 + tl.arange(0, BLOCK_M)
            q1, q2 = _rows(qkv, cos, sin, b, h, tq, T, s_b, s_t, s_cb, s_ct, 0, NH, HS, ROPE)
            s, visible = _probs(q1, q2, k1, k2, tq, prefix, b, T, scale, PRECISION, BLOCK_N)
            s = tl.where(visible, s, float("-inf"))
            m = tl.max(s, 1)
            p = tl.exp(s - m[:, None])
            total = tl.sum(p, 1)
            tl.store(lse + pid * T + tq, m + tl.log(total), mask=tq < T)
            p = p / total[:, None]
            if DROPOUT:
                keep = _keep(seed, pid, tq, threshold, BLOCK_M, BLOCK_N)
                p = tl.where(keep, p / (1.0 - p_drop), 0.0)
            o = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            tl.store(out + (b * T + tq[:, None]) * (NH * HS) + h * HS + dv[None, :],
                     o.to(v.dtype), mask=(tq < T)[:, None])

    @triton.jit(do_not_specialize=["T"])
    def _backward_kernel(qkv, cos, sin, prefix, seed_ptr, out, dout, lse, dqkv, T, s_b, s_t,
                         s_cb, s_ct, scale, p_drop, threshold, NH: tl.constexpr,
                         HS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        HALF: tl.constexpr = HS // 2
        pid = tl.program_id(0)
        b = pid // NH
        h = pid % NH
        tk = tl.arange(0, BLOCK_N)
        dv_ = tl.arange(0, HS)
        d = tl.arange(0, HALF)
        k1, k2 = _rows(qkv, cos, sin, b, h, tk, T, s_b, s_t, s_cb, s_ct, 1, NH, HS, ROPE)
        v = tl.load(qkv + b * s_b + tk[:, None] * s_t + 2 * NH * HS + h * HS + dv_[None, :],
                    mask=(tk < T)[:, None], other=0.0)
        dtype = v.dtype
        seed = tl.load(seed_ptr)  # (a dummy without dropout)
        dk1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        dk2 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, HS), dtype=tl.float32)
        for m0 in range(0, T, BLOCK_M):
            tq = m0 + tl.arange(0, BLOCK_M)
            rows = (tq < T)[:, None]
            q1, q2 = _rows(qkv, cos, sin, b, h, tq, T, s_b, s_t, s_cb, s_ct, 0, NH, HS, ROPE)
            at = (b * T + tq[:, None]) * (NH * HS) + h * HS + dv_[None, :]
            do = tl.load(dout + at, mask=rows, other=0.0)
            o = tl.load(out + at, mask=rows, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # rowsum(dO * O)
            s, visible = _probs(q1, q2, k1, k2, tq, prefix, b, T, scale, PRECISION, BLOCK_N)
            row_lse = tl.load(lse + pid * T + tq, mask=tq < T, other=0.0)
            p = tl.where(visible, tl.exp(s - row_lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # of the dropped-out p
            if DROPOUT:
                keep = _keep(seed, pid, tq, threshold, BLOCK_M, BLOCK_N)
                pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
                dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
            else:
                pd = p
            dv += tl.dot(tl.trans(pd.to(dtype)), do, input_precision=PRECISION)
            ds = (p * (dp - delta[:, None]) * scale).to(dtype)
            dq1 = tl.dot(ds, k1, input_precision=PRECISION)
            dq2 = tl.dot(ds, k2, input_precision=PRECISION)
            dk1 += tl.dot(tl.trans(ds), q1, input_precision=PRECISION)
            dk2 += tl.dot(tl.trans(ds), q2, input_precision=PRECISION)
            if ROPE:
                dq1, dq2 = _unrotate(dq1, dq2, cos, sin, b, tq, T, s_cb, s_ct, HS)
            base = dqkv + (b * T + tq[:, None]) * (3 * NH * HS) + h * HS + d[None, :]
            tl.store(base, dq1.to(dtype), mask=rows)
            tl.store(base + HALF, dq2.to(dtype), mask=rows)
        if ROPE:
            dk1, dk2 = _unrotate(dk1, dk2, cos, sin, b, tk, T, s_cb, s_ct, HS)
        keys = (tk < T)[:, None]
        base = dqkv + (b * T + tk[:, None]) * (3 * NH * HS) + NH * HS + h * HS + d[None, :]
        tl.store(base, dk1.to(dtype), mask=keys)
        tl.store(base + HALF, dk2.to(dtype), mask=keys)
        tl.store(dqkv + (b * T + tk[:, None]) * (3 * NH * HS) + 2 * NH * HS + h * HS
                 + dv_[None, :], dv.to(dtype), mask=keys)


def _launch_args(qkv: torch.Tensor, n_heads: int, rope: bool
                 ) -> tuple[int, int, int, dict[str, Any], dict[str, int]]:
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_heads)
    block_n = tile_width(T)
    meta: dict[str, Any] = {
        "NH": n_heads, "HS": hs, "BLOCK_N": block_n, "ROPE": rope,
        "PRECISION": "ieee" if qkv.dtype == torch.float32 else "tf32"}
    tiles = {**DEFAULT_TILES, **TILES.get(block_n, {})}
    tiles = {k: (min(v, block_n) if k.endswith("_m") else v) for k, v in tiles.items()}
    return B, T, hs, meta, tiles


@torch.library.custom_op("amt::attention", mutates_args=())
def _attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: torch.Tensor,
               seed: torch.Tensor, p: float, n_heads: int, rope: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, hs, meta, tiles = _launch_args(qkv, n_heads, rope)
    out = qkv.new_empty(B, T, n_heads * hs)
    lse = torch.empty(B, n_heads, T, device=qkv.device, dtype=torch.float32)
    split = min(tiles["fwd_split"], triton.cdiv(T, tiles["fwd_m"]))
    _forward_kernel[(B * n_heads, split)](
        qkv, cos, sin, prefix, seed, out, lse, T, qkv.stride(0), qkv.stride(1),
        cos.stride(0), cos.stride(1), 1 / math.sqrt(hs), p, round(p * 2**24), DROPOUT=p > 0,
        **meta,
        BLOCK_M=tiles["fwd_m"], SPLIT=split, num_warps=tiles["fwd_warps"])
    return out, lse


@_attention.register_fake
def _(qkv, cos, sin, prefix, seed, p, n_heads, rope):  # type: ignore[no-untyped-def]
    B, T, C3 = qkv.shape
    return (qkv.new_empty(B, T, C3 // 3),
            qkv.new_empty(B, n_heads, T, dtype=torch.float32))


@torch.library.custom_op("amt::attention_backward", mutates_args=())
def _attention_backward(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        prefix: torch.Tensor, seed: torch.Tensor, p: float, n_heads: int,
                        rope: bool) -> torch.Tensor:
    B, T, hs, meta, tiles = _launch_args(qkv, n_heads, rope)
    dqkv = qkv.new_empty(B, T, 3 * n_heads * hs)
    _backward_kernel[(B * n_heads,)](
        qkv, cos, sin, prefix, seed, out, dout.contiguous(), lse, dqkv, T, qkv.stride(0),
        qkv.stride(1), cos.stride(0), cos.stride(1), 1 / math.sqrt(hs), p, round(p * 2**24),
        DROPOUT=p > 0, **meta, BLOCK_M=tiles["bwd_m"], num_warps=tiles["bwd_warps"])
    return dqkv


@_attention_backward.register_fake
def _(dout, out, lse, qkv, cos, sin, prefix, seed, p, n_heads, rope):  # type: ignore[no-untyped-def]
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    qkv, cos, sin, prefix, seed, p, n_heads, rope = inputs
    out, lse = output
    ctx.save_for_backward(qkv, cos, sin, prefix, seed, out, lse)
    ctx.p, ctx.n_heads, ctx.rope = p, n_heads, rope


def _backward(ctx, dout, dlse):  # type: ignore[no-untyped-def]
    qkv, cos, sin, prefix, seed, out, lse = ctx.saved_tensors
    dqkv = _attention_backward(dout, out, lse, qkv, cos, sin, prefix, seed, ctx.p,
                               ctx.n_heads, ctx.rope)
    return dqkv, None, None, None, None, None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                    prefix_end: torch.Tensor, n_heads: int, dropout: float,
                    seed: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output (B, T, C) for the qkv projection ``qkv`` (B, T, 3C) of right-padded
    rows, T <= ``MAX_T``; ``rope`` = (cos, sin) (B, T, 1, hs/2) or None; ``prefix_end`` (B,)
    int (zeros: causal); ``seed`` (1,) int64 for the dropout (drawn when None)."""
    B, T, _ = qkv.shape
    if T > MAX_T:
        raise ValueError(f"fused_attention takes rows of at most {MAX_T} tokens, got {T}")
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    if rope is None:
        cos = sin = qkv.new_zeros(1, 1, dtype=torch.float32)
    else:
        cos, sin = (r.squeeze(2) for r in rope)  # (B, T, hs/2), any strides over B and T
    if seed is None:  # (a dummy without dropout)
        seed = torch.randint(0, 2**31 - 1, (1,), device=qkv.device) if dropout > 0 else prefix_end
    prefix_end = prefix_end.to(torch.int32)
    return _attention(qkv, cos, sin, prefix_end, seed, float(dropout), n_heads,
                      rope is not None)[0]
