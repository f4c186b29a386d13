"""Fused training attention: RoPE, the prefix-LM mask, softmax, dropout and ``P @ V`` in
Triton kernels that read q, k, v straight from the qkv projection's output: (B, T, 3C) of
padded rows, or (N, 3C) of rows without padding back to back (``train.unpad``). The kernels
see only the latter: row ``b`` is ``lengths[b]`` tokens from token ``starts[b]`` (padded rows:
``b * T`` and ``T``), so the matmuls around them need not compute the padding.

Why: at the corpus's lengths (T ~ 66) SDPA's masked kernel (memory-efficient, the only one
taking both a mask and dropout) took 2.3 of a block's 9.2 ms of GPU time (64k tokens, H200),
with RoPE, transposes and the qkv gradient's concatenation around it (bench.attention,
BENCHMARKS.md P1). Flash-attention's tiling: the forward takes ``BLOCK_M`` queries of one
(row, head) against keys ``BLOCK_N`` at a time with an online softmax. The backward has no atomics
(deterministic): on rows of <= ``ONE_TILE_MAX_T`` tokens one program per (row, head) holds
all its keys and their dk, dv (each score computed once: the fastest there); on longer rows
two kernels, dq per query block (it also stores rowsum(dO * O)), then dk and dv per key
block. Blocks the mask hides entirely are skipped. Any row length.

Same maths as :class:`trainer.model.SelfAttention` on SDPA: key ``k`` is visible to query
``q`` of row ``b`` when ``k < prefix_end[b]`` or ``k <= q`` (right padding only, as in
training); dropout drops probabilities after the softmax and scales by 1 / (1 - p). Random
bits come from Philox (``tl.randint4x``) on a per-call seed and the (row, head, query, key)
counter (laid out by the padded width T), so every kernel regenerates the same mask whatever
its tiles, and a row's mask is the same padded or not.
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

__all__ = ["available", "fused_attention"]


def available(device: torch.device, head_size: int) -> bool:
    """Whether training on ``device`` can use the kernel: a GPU, Triton, and a head size of
    32, 64 or 128 (RoPE splits it in halves, each a ``tl.dot`` operand of >= 16). (The tests
    also run it on CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``.)"""
    return triton is not None and device.type == "cuda" and head_size in (32, 64, 128)


def tile_width(T: int) -> int:
    """Which entry of ``TILES`` rows of T tokens use: T rounded up to a power of two, 16 to
    128 (no block is wider than the row's power of two)."""
    return min(128, max(16, 1 << (T - 1).bit_length()))


ONE_TILE_MAX_T = 128  # rows up to this long take the one-kernel backward (_backward_kernel)
# ... which holds rows of 65 to 64 + TAIL_MAX tokens in a 64-key tile and a 16- or 32-key
# tail (0: one tile of tile_width(T) keys)
TAIL_MAX = 32

# block shapes per ``tile_width``: queries (m) and keys (n) per block and warps of the
# forward (fwd_), the one-kernel backward (bwd_: queries per step; its keys are the row), the
# dq kernel (dq_) and the dk/dv kernel (dkv_); blocks are capped at the width; measured on an
# H200 (bench.attention, 2026-11-29; the forward's register cap: 6-9 % faster at T = 40-110)
TILES: dict[int, dict[str, int]] = {64: {"bwd_m": 64}}
DEFAULT_TILES = {"fwd_m": 64, "fwd_n": 32, "fwd_warps": 4, "fwd_maxnreg": 128,
                 "bwd_m": 16, "bwd_warps": 4,
                 "dq_m": 64, "dq_n": 32, "dq_warps": 4, "dkv_m": 64, "dkv_n": 64,
                 "dkv_warps": 4}


if triton is not None:

    @triton.jit
    def _rows(qkv, cos, sin, row0, L, h, t, s_t, s_ct, which: tl.constexpr,
              NH: tl.constexpr, HS: tl.constexpr, ROPE: tl.constexpr):
        """Positions ``t`` (of ``L``) of the row starting at token ``row0``: q (which=0) or k
        (1) of head ``h``, rotated, as two halves (M, HS/2) in the input dtype."""
        HALF: tl.constexpr = HS // 2
        d = tl.arange(0, HALF)
        rows = (t < L)[:, None]
        base = qkv + (row0 + t)[:, None] * s_t + which * NH * HS + h * HS + d[None, :]
        x1 = tl.load(base, mask=rows, other=0.0)
        x2 = tl.load(base + HALF, mask=rows, other=0.0)
        if ROPE:
            angle = (row0 + t)[:, None] * s_ct + d[None, :]
            c = tl.load(cos + angle, mask=rows, other=1.0)
            s = tl.load(sin + angle, mask=rows, other=0.0)
            y1 = x1.to(tl.float32) * c - x2.to(tl.float32) * s
            y2 = x1.to(tl.float32) * s + x2.to(tl.float32) * c
            return y1.to(x1.dtype), y2.to(x1.dtype)
        return x1, x2

    @triton.jit
    def _values(qkv, row0, L, h, t, s_t, NH: tl.constexpr, HS: tl.constexpr):
        """Positions ``t`` of v of head ``h`` (N, HS)."""
        d = tl.arange(0, HS)
        return tl.load(qkv + (row0 + t)[:, None] * s_t + 2 * NH * HS + h * HS + d[None, :],
                       mask=(t < L)[:, None], other=0.0)

    @triton.jit
    def _keys(qkv, cos, sin, row0, L, h, tk, s_t, s_ct, NH: tl.constexpr,
              HS: tl.constexpr, ROPE: tl.constexpr):
        """Keys ``tk`` of head ``h``: k as two rotated halves, and v."""
        k1, k2 = _rows(qkv, cos, sin, row0, L, h, tk, s_t, s_ct, 1, NH, HS, ROPE)
        return k1, k2, _values(qkv, row0, L, h, tk, s_t, NH, HS)

    @triton.jit
    def _head_rows(x, row0, L, h, t, NH: tl.constexpr, HS: tl.constexpr):
        """Positions ``t`` of head ``h`` of ``x`` (tokens, NH * HS): the output or its
        gradient."""
        d = tl.arange(0, HS)
        return tl.load(x + (row0 + t)[:, None] * (NH * HS) + h * HS + d[None, :],
                       mask=(t < L)[:, None], other=0.0)

    @triton.jit
    def _unrotate(g1, g2, cos, sin, row0, L, t, s_ct, HS: tl.constexpr):
        """The rotation's transpose: the gradient of rotated rows -> of the projection's."""
        d = tl.arange(0, HS // 2)
        rows = (t < L)[:, None]
        angle = (row0 + t)[:, None] * s_ct + d[None, :]
        c = tl.load(cos + angle, mask=rows, other=1.0)
        s = tl.load(sin + angle, mask=rows, other=0.0)
        return g1 * c + g2 * s, g2 * c - g1 * s

    @triton.jit
    def _scores(q1, q2, k1, k2, tq, tk, end, L, scale, PRECISION: tl.constexpr):
        """Scaled scores (M, N) fp32 of queries ``tq`` against keys ``tk``, and which are
        visible: ``k < end`` (the prefix) or ``k <= q`` (causal), within the row's ``L``."""
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
        s = (s + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale
        visible = ((tk[None, :] < end) | (tk[None, :] <= tq[:, None])) & (tk[None, :] < L)
        return s, visible

    @triton.jit
    def _keep(seed, bh, tq, tk0, T, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Dropout's keep mask (BLOCK_M, BLOCK_N) of queries ``tq`` and keys ``tk0`` + 0..N-1
        of (row, head) ``bh``: one Philox counter per four keys gives four 32-bit draws; a key
        is kept when its draw's top 24 bits are >= ``threshold`` = p * 2**24. The counter
        depends on (bh, query, key) only, so any tiling regenerates the same mask."""
        groups = (T + 3) // 4
        c = tk0 // 4 + tl.arange(0, BLOCK_N // 4)
        counters = (bh.to(tl.int64) * T + tq[:, None]) * groups + c[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, counters)
        r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
        return (r.to(tl.uint32, bitcast=True) >> 8).to(tl.int32) >= threshold

    # T is not a specialisation key: one compiled kernel per tile shape, not one per length
    @triton.jit(do_not_specialize=["T"])
    def _forward_kernel(qkv, cos, sin, prefix, starts, lengths, seed_ptr, out, lse, T, s_t,
                        s_ct, scale, p_drop, threshold, NH: tl.constexpr, HS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
                        DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """Queries ``BLOCK_M`` at a time against keys ``BLOCK_N`` at a time, online softmax."""
        bh = tl.program_id(0)
        b = bh // NH
        h = bh % NH
        row0 = tl.load(starts + b).to(tl.int64)
        L = tl.load(lengths + b)
        m0 = tl.program_id(1) * BLOCK_M
        tq = m0 + tl.arange(0, BLOCK_M)
        q1, q2 = _rows(qkv, cos, sin, row0, L, h, tq, s_t, s_ct, 0, NH, HS, ROPE)
        end = tl.load(prefix + b)
        seed = tl.load(seed_ptr)  # (a dummy without dropout)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HS), tl.float32)
        hi = tl.minimum(L, tl.maximum(end, m0 + BLOCK_M))  # keys past it are hidden
        for n0 in range(0, hi, BLOCK_N):
            tk = n0 + tl.arange(0, BLOCK_N)
            k1, k2, v = _keys(qkv, cos, sin, row0, L, h, tk, s_t, s_ct, NH, HS, ROPE)
            s, visible = _scores(q1, q2, k1, k2, tq, tk, end, L, scale, PRECISION)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past L see nothing
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_keep(seed, bh, tq, n0, T, threshold, BLOCK_M, BLOCK_N), p, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        if DROPOUT:
            acc = acc / (1.0 - p_drop)
        tl.store(lse + bh * T + tq, m_i + tl.log(l_i), mask=tq < L)
        dv = tl.arange(0, HS)
        tl.store(out + (row0 + tq)[:, None] * (NH * HS) + h * HS + dv[None, :],
                 (acc / l_i[:, None]).to(out.dtype.element_ty), mask=(tq < L)[:, None])

    @triton.jit
    def _dscores(q1, q2, k1, k2, v, do, row_lse, delta, seed, bh, tq, n0, end, L, T, scale,
                 p_drop, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """Of queries ``tq`` against keys ``n0`` + 0..N-1: the probabilities as dropout left
        them (M, N) fp32 and the scores' gradient (M, N) in the input dtype (a row of ``L``
        positions; ``T``, the padded width, lays out the dropout's counters)."""
        tk = n0 + tl.arange(0, BLOCK_N)
        s, visible = _scores(q1, q2, k1, k2, tq, tk, end, L, scale, PRECISION)
        p = tl.where(visible, tl.exp(s - row_lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # of the dropped-out p
        if DROPOUT:
            keep = _keep(seed, bh, tq, n0, T, threshold, BLOCK_M, BLOCK_N)
            pd = tl.where(keep, p / (1.0 - p_drop), 0.0)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        else:
            pd = p
        ds = (p * (dp - delta[:, None]) * scale).to(do.dtype)
        return pd, ds

    @triton.jit
    def _queries(qkv, cos, sin, out, dout, lse, bh, row0, L, h, tq, T, s_t, s_ct,
                 NH: tl.constexpr, HS: tl.constexpr, ROPE: tl.constexpr):
        """Queries ``tq`` of head ``h`` as the backward needs them: q (two rotated halves),
        their output's gradient, rowsum(dO * O) and the forward's log-sum-exp."""
        q1, q2 = _rows(qkv, cos, sin, row0, L, h, tq, s_t, s_ct, 0, NH, HS, ROPE)
        do = _head_rows(dout, row0, L, h, tq, NH, HS)
        o = _head_rows(out, row0, L, h, tq, NH, HS)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        row_lse = tl.load(lse + bh * T + tq, mask=tq < L, other=0.0)
        return q1, q2, do, delta, row_lse

    @triton.jit
    def _add_dkv(dk1, dk2, dv, pd, ds, q1, q2, do, PRECISION: tl.constexpr):
        """dk (two halves) and dv plus what queries (q1, q2, dO) give them through the
        dropped-out probabilities ``pd`` and the scores' gradient ``ds``."""
        dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)
        dk1 += tl.dot(tl.trans(ds), q1, input_precision=PRECISION)
        dk2 += tl.dot(tl.trans(ds), q2, input_precision=PRECISION)
        return dk1, dk2, dv

    @triton.jit
    def _store_dq(dqkv, dq1, dq2, cos, sin, row0, L, h, tq, s_ct, NH: tl.constexpr,
                  HS: tl.constexpr, ROPE: tl.constexpr):
        """dq of queries ``tq`` (two halves, rotated) into the q part of ``dqkv``."""
        if ROPE:
            dq1, dq2 = _unrotate(dq1, dq2, cos, sin, row0, L, tq, s_ct, HS)
        d = tl.arange(0, HS // 2)
        base = dqkv + (row0 + tq)[:, None] * (3 * NH * HS) + h * HS + d[None, :]
        dtype = dqkv.dtype.element_ty
        tl.store(base, dq1.to(dtype), mask=(tq < L)[:, None])
        tl.store(base + HS // 2, dq2.to(dtype), mask=(tq < L)[:, None])

    @triton.jit
    def _store_dkv(dqkv, dk1, dk2, dv, cos, sin, row0, L, h, tk, s_ct, NH: tl.constexpr,
                   HS: tl.constexpr, ROPE: tl.constexpr):
        """dk (two halves, rotated) and dv of keys ``tk`` into the k and v parts of ``dqkv``."""
        if ROPE:
            dk1, dk2 = _unrotate(dk1, dk2, cos, sin, row0, L, tk, s_ct, HS)
        keys = (tk < L)[:, None]
        d = tl.arange(0, HS // 2)
        dh = tl.arange(0, HS)
        dtype = dqkv.dtype.element_ty
        base = dqkv + (row0 + tk)[:, None] * (3 * NH * HS) + NH * HS + h * HS
        tl.store(base + d[None, :], dk1.to(dtype), mask=keys)
        tl.store(base + HS // 2 + d[None, :], dk2.to(dtype), mask=keys)
        tl.store(base + NH * HS + dh[None, :], dv.to(dtype), mask=keys)

    @triton.jit(do_not_specialize=["T"])
    def _backward_kernel(qkv, cos, sin, prefix, starts, lengths, seed_ptr, out, dout, lse, dqkv,
                         T, s_t, s_ct, scale, p_drop, threshold, NH: tl.constexpr,
                         HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         TAIL_N: tl.constexpr, ROPE: tl.constexpr, DROPOUT: tl.constexpr,
                         PRECISION: tl.constexpr):
        """The whole backward of rows of <= ``BLOCK_N + TAIL_N`` tokens: one program per (row,
        head) holds every key with its dk and dv, keys 0..BLOCK_N-1 in one tile and, with
        ``TAIL_N`` > 0, the next ``TAIL_N`` in a second one (a row of 66 tokens: 64 + 16 keys,
        not 128), and takes queries ``BLOCK_M`` at a time (faster there than dq and dk/dv
        apart: each score is computed once)."""
        HALF: tl.constexpr = HS // 2
        bh = tl.program_id(0)
        b = bh // NH
        h = bh % NH
        row0 = tl.load(starts + b).to(tl.int64)
        L = tl.load(lengths + b)
        tk = tl.arange(0, BLOCK_N)
        k1, k2, v = _keys(qkv, cos, sin, row0, L, h, tk, s_t, s_ct, NH, HS, ROPE)
        end = tl.load(prefix + b)
        seed = tl.load(seed_ptr)  # (a dummy without dropout)
        dk1 = tl.zeros((BLOCK_N, HALF), tl.float32)
        dk2 = tl.zeros((BLOCK_N, HALF), tl.float32)
        dv = tl.zeros((BLOCK_N, HS), tl.float32)
        if TAIL_N > 0:
            tk_t = BLOCK_N + tl.arange(0, TAIL_N)
            k1_t, k2_t, v_t = _keys(qkv, cos, sin, row0, L, h, tk_t, s_t, s_ct, NH, HS, ROPE)
            dk1_t = tl.zeros((TAIL_N, HALF), tl.float32)
            dk2_t = tl.zeros((TAIL_N, HALF), tl.float32)
            dv_t = tl.zeros((TAIL_N, HS), tl.float32)
        for m0 in range(0, L, BLOCK_M):
            tq = m0 + tl.arange(0, BLOCK_M)
            q1, q2, do, delta, row_lse = _queries(qkv, cos, sin, out, dout, lse, bh, row0, L, h,
                                                  tq, T, s_t, s_ct, NH, HS, ROPE)
            pd, ds = _dscores(q1, q2, k1, k2, v, do, row_lse, delta, seed, bh, tq, 0, end, L,
                              T, scale, p_drop, threshold, BLOCK_M, BLOCK_N, DROPOUT,
                              PRECISION)
            dk1, dk2, dv = _add_dkv(dk1, dk2, dv, pd, ds, q1, q2, do, PRECISION)
            dq1 = tl.dot(ds, k1, input_precision=PRECISION)
            dq2 = tl.dot(ds, k2, input_precision=PRECISION)
            # the tail's keys are hidden from queries before them and past the prefix
            if TAIL_N > 0:
                if (m0 + BLOCK_M > BLOCK_N) | (end > BLOCK_N):
                    pd_t, ds_t = _dscores(q1, q2, k1_t, k2_t, v_t, do, row_lse, delta, seed,
                                          bh, tq, BLOCK_N, end, L, T, scale, p_drop,
                                          threshold, BLOCK_M, TAIL_N, DROPOUT, PRECISION)
                    dk1_t, dk2_t, dv_t = _add_dkv(dk1_t, dk2_t, dv_t, pd_t, ds_t, q1, q2, do,
                                                  PRECISION)
                    dq1 += tl.dot(ds_t, k1_t, input_precision=PRECISION)
                    dq2 += tl.dot(ds_t, k2_t, input_precision=PRECISION)
            _store_dq(dqkv, dq1, dq2, cos, sin, row0, L, h, tq, s_ct, NH, HS, ROPE)
        _store_dkv(dqkv, dk1, dk2, dv, cos, sin, row0, L, h, tk, s_ct, NH, HS, ROPE)
        if TAIL_N > 0:
            _store_dkv(dqkv, dk1_t, dk2_t, dv_t, cos, sin, row0, L, h, tk_t, s_ct, NH, HS, ROPE)

    @triton.jit(do_not_specialize=["T"])
    def _dq_kernel(qkv, cos, sin, prefix, starts, lengths, seed_ptr, out, dout, lse, delta_ptr,
                   dqkv, T, s_t, s_ct, scale, p_drop, threshold, NH: tl.constexpr,
                   HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ROPE: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """dq of ``BLOCK_M`` queries (keys ``BLOCK_N`` at a time); stores rowsum(dO * O) for
        the dk/dv kernel."""
        HALF: tl.constexpr = HS // 2
        bh = tl.program_id(0)
        b = bh // NH
        h = bh % NH
        row0 = tl.load(starts + b).to(tl.int64)
        L = tl.load(lengths + b)
        m0 = tl.program_id(1) * BLOCK_M
        tq = m0 + tl.arange(0, BLOCK_M)
        q1, q2, do, delta, row_lse = _queries(qkv, cos, sin, out, dout, lse, bh, row0, L, h, tq,
                                              T, s_t, s_ct, NH, HS, ROPE)
        tl.store(delta_ptr + bh * T + tq, delta, mask=tq < L)
        end = tl.load(prefix + b)
        seed = tl.load(seed_ptr)
        dq1 = tl.zeros((BLOCK_M, HALF), tl.float32)
        dq2 = tl.zeros((BLOCK_M, HALF), tl.float32)
        hi = tl.minimum(L, tl.maximum(end, m0 + BLOCK_M))
        for n0 in range(0, hi, BLOCK_N):
            tk = n0 + tl.arange(0, BLOCK_N)
            k1, k2, v = _keys(qkv, cos, sin, row0, L, h, tk, s_t, s_ct, NH, HS, ROPE)
            _, ds = _dscores(q1, q2, k1, k2, v, do, row_lse, delta, seed, bh, tq, n0, end, L, T,
                             scale, p_drop, threshold, BLOCK_M, BLOCK_N, DROPOUT, PRECISION)
            dq1 += tl.dot(ds, k1, input_precision=PRECISION)
            dq2 += tl.dot(ds, k2, input_precision=PRECISION)
        _store_dq(dqkv, dq1, dq2, cos, sin, row0, L, h, tq, s_ct, NH, HS, ROPE)

    @triton.jit(do_not_specialize=["T"])
    def _dkv_kernel(qkv, cos, sin, prefix, starts, lengths, seed_ptr, dout, lse, delta_ptr, dqkv,
                    T, s_t, s_ct, scale, p_drop, threshold, NH: tl.constexpr, HS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr,
                    DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        """dk and dv of ``BLOCK_N`` keys (queries ``BLOCK_M`` at a time)."""
        HALF: tl.constexpr = HS // 2
        bh = tl.program_id(0)
        b = bh // NH
        h = bh % NH
        row0 = tl.load(starts + b).to(tl.int64)
        L = tl.load(lengths + b)
        n0 = tl.program_id(1) * BLOCK_N
        tk = n0 + tl.arange(0, BLOCK_N)
        k1, k2, v = _keys(qkv, cos, sin, row0, L, h, tk, s_t, s_ct, NH, HS, ROPE)
        end = tl.load(prefix + b)
        seed = tl.load(seed_ptr)
        dk1 = tl.zeros((BLOCK_N, HALF), tl.float32)
        dk2 = tl.zeros((BLOCK_N, HALF), tl.float32)
        dv = tl.zeros((BLOCK_N, HS), tl.float32)
        # queries before both the prefix's end and these keys see none of them
        lo = tl.where(n0 < end, 0, (n0 // BLOCK_M) * BLOCK_M)
        for m0 in range(lo, L, BLOCK_M):
            tq = m0 + tl.arange(0, BLOCK_M)
            q1, q2 = _rows(qkv, cos, sin, row0, L, h, tq, s_t, s_ct, 0, NH, HS, ROPE)
            do = _head_rows(dout, row0, L, h, tq, NH, HS)
            row_lse = tl.load(lse + bh * T + tq, mask=tq < L, other=0.0)
            delta = tl.load(delta_ptr + bh * T + tq, mask=tq < L, other=0.0)
            pd, ds = _dscores(q1, q2, k1, k2, v, do, row_lse, delta, seed, bh, tq, n0, end, L, T,
                              scale, p_drop, threshold, BLOCK_M, BLOCK_N, DROPOUT, PRECISION)
            dk1, dk2, dv = _add_dkv(dk1, dk2, dv, pd, ds, q1, q2, do, PRECISION)
        _store_dkv(dqkv, dk1, dk2, dv, cos, sin, row0, L, h, tk, s_ct, NH, HS, ROPE)


def _launch_args(qkv: torch.Tensor, T: int, n_heads: int, rope: bool
                 ) -> tuple[dict[str, Any], dict[str, int]]:
    hs = qkv.size(1) // (3 * n_heads)
    width = tile_width(T)
    args: dict[str, Any] = {
        "scale": 1 / math.sqrt(hs), "NH": n_heads, "HS": hs, "ROPE": rope,
        "PRECISION": "ieee" if qkv.dtype == torch.float32 else "tf32"}
    tiles = {**DEFAULT_TILES, **TILES.get(width, {})}
    tiles = {k: (min(v, width) if k.endswith(("_m", "_n")) else v) for k, v in tiles.items()}
    return args, tiles


def _compile_args(tiles: dict[str, int], kernel: str) -> dict[str, int]:
    """Blocks, warps (and pipeline stages, a register cap, where ``tiles`` names them and not
    0) of ``kernel``. A cap (``maxnreg``) trades spills for programs per SM: the kernels are
    latency-bound, and at 4 warps 177 registers a thread hold 2 programs per SM, 128 hold 4."""
    out = {"BLOCK_M": tiles[f"{kernel}_m"], "num_warps": tiles[f"{kernel}_warps"]}
    if f"{kernel}_n" in tiles:
        out["BLOCK_N"] = tiles[f"{kernel}_n"]
    for key, option in (("stages", "num_stages"), ("maxnreg", "maxnreg")):
        if tiles.get(f"{kernel}_{key}"):
            out[option] = tiles[f"{kernel}_{key}"]
    return out


def _dropout_args(p: float) -> dict[str, Any]:
    return {"p_drop": p, "threshold": round(p * 2**24), "DROPOUT": p > 0}


@torch.library.custom_op("amt::attention", mutates_args=())
def _attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, prefix: torch.Tensor,
               starts: torch.Tensor, lengths: torch.Tensor, seed: torch.Tensor, p: float,
               n_heads: int, rope: bool, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    B = prefix.size(0)
    args, tiles = _launch_args(qkv, T, n_heads, rope)
    out = qkv.new_empty(qkv.size(0), qkv.size(1) // 3)
    lse = torch.empty(B, n_heads, T, device=qkv.device, dtype=torch.float32)
    _forward_kernel[(B * n_heads, triton.cdiv(T, tiles["fwd_m"]))](
        qkv, cos, sin, prefix, starts, lengths, seed, out, lse, T, qkv.stride(0),
        cos.stride(0), **args, **_dropout_args(p), **_compile_args(tiles, "fwd"))
    return out, lse


@_attention.register_fake
def _(qkv, cos, sin, prefix, starts, lengths, seed, p, n_heads, rope, T):  # type: ignore[no-untyped-def]
    return (qkv.new_empty(qkv.size(0), qkv.size(1) // 3),
            qkv.new_empty(prefix.size(0), n_heads, T, dtype=torch.float32))


@torch.library.custom_op("amt::attention_backward", mutates_args=())
def _attention_backward(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        prefix: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                        seed: torch.Tensor, p: float, n_heads: int, rope: bool, T: int
                        ) -> torch.Tensor:
    B = prefix.size(0)
    args, tiles = _launch_args(qkv, T, n_heads, rope)
    dqkv = torch.empty_like(qkv)
    delta = torch.empty_like(lse)
    dout = dout.contiguous()
    rows = (prefix, starts, lengths, seed)
    common = (T, qkv.stride(0), cos.stride(0))
    args.update(_dropout_args(p))
    if T <= min(ONE_TILE_MAX_T, 128):  # its key tiles must hold the row
        keys, tail = (64, tile_width(T - 64)) if 64 < T <= 64 + TAIL_MAX else (tile_width(T), 0)
        _backward_kernel[(B * n_heads,)](
            qkv, cos, sin, *rows, out, dout, lse, dqkv, *common, **args,
            BLOCK_N=keys, TAIL_N=tail, **_compile_args(tiles, "bwd"))
        return dqkv
    _dq_kernel[(B * n_heads, triton.cdiv(T, tiles["dq_m"]))](
        qkv, cos, sin, *rows, out, dout, lse, delta, dqkv, *common, **args,
        **_compile_args(tiles, "dq"))
    _dkv_kernel[(B * n_heads, triton.cdiv(T, tiles["dkv_n"]))](
        qkv, cos, sin, *rows, dout, lse, delta, dqkv, *common, **args,
        **_compile_args(tiles, "dkv"))
    return dqkv


@_attention_backward.register_fake
def _(dout, out, lse, qkv, cos, sin, prefix, starts, lengths, seed, p, n_heads, rope, T):  # type: ignore[no-untyped-def]
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
    qkv, cos, sin, prefix, starts, lengths, seed, p, n_heads, rope, T = inputs
    out, lse = output
    ctx.save_for_backward(qkv, cos, sin, prefix, starts, lengths, seed, out, lse)
    ctx.p, ctx.n_heads, ctx.rope, ctx.T = p, n_heads, rope, T


def _backward(ctx, dout, dlse):  # type: ignore[no-untyped-def]
    qkv, cos, sin, prefix, starts, lengths, seed, out, lse = ctx.saved_tensors
    dqkv = _attention_backward(dout, out, lse, qkv, cos, sin, prefix, starts, lengths, seed,
                               ctx.p, ctx.n_heads, ctx.rope, ctx.T)
    return (dqkv,) + (None,) * 10


_attention.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                    prefix_end: torch.Tensor, n_heads: int, dropout: float,
                    seed: torch.Tensor | None = None,
                    packed: tuple[torch.Tensor, torch.Tensor, int] | None = None
                    ) -> torch.Tensor:
    """Attention output for the qkv projection ``qkv`` of right-padded rows (B, T, 3C) ->
    (B, T, C), every position computed (as SDPA would); or, with ``packed`` = (starts,
    lengths, T), of rows without padding, back to back (N, 3C) -> (N, C): row ``b`` is tokens
    ``starts[b]`` to ``starts[b] + lengths[b] - 1`` (int32 (B,)), none longer than ``T``.
    ``rope`` = (cos, sin), one (hs/2) angle row per token in ``qkv``'s layout ((B, T, 1, hs/2)
    or (N, 1, hs/2)), or None; ``prefix_end`` (B,) int (zeros: causal; int32 saves a cast per
    call); ``seed`` (1,) int64 for the dropout (drawn when None). A row's dropout mask depends
    on T, not on the layout: padded and packed rows of one batch get the same."""
    out_shape: tuple[int, ...]
    if packed is None:
        B, T, C3 = qkv.shape
        starts = torch.arange(B, device=qkv.device, dtype=torch.int32) * T
        lengths = torch.full((B,), T, device=qkv.device, dtype=torch.int32)
        out_shape = (B, T, C3 // 3)
        qkv = qkv.reshape(B * T, C3)
    else:
        starts, lengths, T = packed
        out_shape = (qkv.size(0), qkv.size(1) // 3)
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    if rope is None:
        cos = sin = qkv.new_zeros(1, 1, dtype=torch.float32)
    else:
        cos, sin = (r.reshape(-1, r.size(-1)) for r in rope)  # (tokens, hs/2)
    if seed is None:  # (a dummy without dropout)
        seed = torch.randint(0, 2**31 - 1, (1,), device=qkv.device) if dropout > 0 else prefix_end
    prefix_end = prefix_end.to(torch.int32)
    out = _attention(qkv, cos, sin, prefix_end, starts, lengths, seed, float(dropout), n_heads,
                     rope is not None, T)[0]
    return out.view(out_shape)
