"""Post-norm "Add & Norm" of a residual branch in two Triton kernels:
``LayerNorm(x + branch * dropout_mask / (1 - p) * row_scale)``.

Why: compiled, the forward is one Inductor kernel, but the backward is four or five: the
LayerNorm's input gradient (a row reduction), its weight and bias gradients (column sums that
re-read the gradient and the normalised input), and the dropout/drop-path gradient of the
branch (H200, report shape, 64k-token micro-batches: ~20 ms of ~31 ms of such kernels per two
steps, BENCHMARKS.md P1). Here the backward recomputes the normalised input from ``x``, the
branch and the mask, writes both input gradients and each program's partial weight and bias
sums in one pass; a small sum over the programs finishes them. Statistics in float32; the
output in ``x``'s dtype (the residual stream's). On by default (``train.fused_norm``): on the
H200 the compiled step's device time fell 1.2-1.7 % (BENCHMARKS.md P1, session 11), mostly
because the output projections' matmuls lose their bias epilogues; kernel for kernel the
norm path takes about what Inductor's did (Inductor 2.11 already fuses the LayerNorm
backward's column sums into one kernel).

``mask`` is the dropout keep mask (bool, as ``trainer.dropout.dropout_mask`` draws it) or
None (drawing it inside the kernels from its seed instead was tried and removed: no gain in
the whole step on the H200, BENCHMARKS.md P1 session 12); ``row_scale`` (B,) float32
multiplies every position of sequence ``b`` (stochastic depth's keep / (1 - p)) or is None;
``branch_bias`` (C,) is the bias of the matmul that made the branch (then computed without
it), its gradient summed in the same pass as the LayerNorm's (Inductor's separate column sum
re-read the 64k x 768 gradient: 4.3 ms per two steps for the MLP's alone), or None.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: Block.residual's plain path
    triton = None

__all__ = ["available", "residual_norm"]

# (rows per step of a program's loop, steps per program, warps) of each kernel; the backward's
# partial weight/bias sums cover rows * steps rows each (64k rows make 2,048 of them). H200,
# 64k x 768 bf16 (bench.norm, bench/results/2026-11-29_nvidia-h200_norm.json): forward 4 rows
# in 4 warps 0.112 ms (1 row x 8 steps: 0.128); backward 1 row x 32 steps in 4 warps 0.206 ms
# + 0.049 for the partial sums (16 steps: 0.194 + 0.036, one run, within the sweep's noise)
FORWARD, BACKWARD = (4, 1, 4), (1, 32, 4)


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (a GPU with Triton; the tests also run them
    on CPU tensors in Triton's interpreter)."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _rows(step, M, C, ROWS: tl.constexpr, STEPS: tl.constexpr, BLOCK_C: tl.constexpr):
        """Step ``step`` of this program's loop: its rows, the (ROWS, BLOCK_C) mask of the
        elements that exist and their offsets (indices only: a helper given pointers would
        make Inductor copy them, see trainer.gelu)."""
        rows = (tl.program_id(0).to(tl.int64) * STEPS + step) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        return rows, (rows < M)[:, None] & (cols < C)[None, :], rows[:, None] * C + cols[None, :]

    @triton.jit
    def _norm_forward_kernel(x, branch, branch_bias, mask, row_scale, weight, bias, y,
                             mean_out, rstd_out, M, C, T, keep_scale, eps,
                             HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                             HAS_SCALE: tl.constexpr, ROWS: tl.constexpr,
                             STEPS: tl.constexpr, BLOCK_C: tl.constexpr):
        # compiled with dynamic shapes, Inductor passes Python floats as float64: the
        # arithmetic stays in float32
        keep_scale, eps = tl.cast(keep_scale, tl.float32), tl.cast(eps, tl.float32)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(weight + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bb = tl.load(branch_bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        for step in range(STEPS):
            rows, ok, offsets = _rows(step, M, C, ROWS, STEPS, BLOCK_C)
            # the loads stay in the kernel: Inductor takes any pointer passed to a helper as
            # written (see trainer.gelu)
            br = tl.load(branch + offsets, mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                br += bb[None, :]
            if HAS_MASK:
                br = tl.where(tl.load(mask + offsets, mask=ok, other=0) != 0, br * keep_scale,
                              0.0)
            if HAS_SCALE:
                br *= tl.load(row_scale + rows // T, mask=rows < M, other=0.0)[:, None]
            s = tl.load(x + offsets, mask=ok, other=0.0).to(tl.float32) + br
            mean = tl.sum(s, 1) / C
            centred = tl.where(ok, s - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + eps)
            out = centred * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(y + offsets, out.to(y.dtype.element_ty), mask=ok)
            tl.store(mean_out + rows, mean, mask=rows < M)
            tl.store(rstd_out + rows, rstd, mask=rows < M)

    @triton.jit
    def _norm_backward_kernel(x, branch, branch_bias, mask, row_scale, weight, mean_in,
                              rstd_in, dy, dx, dbranch, partial_w, partial_b, partial_bb, M, C,
                              T, keep_scale, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                              HAS_SCALE: tl.constexpr, ROWS: tl.constexpr,
                              STEPS: tl.constexpr, BLOCK_C: tl.constexpr):
        keep_scale = tl.cast(keep_scale, tl.float32)  # float64 from Inductor (see the forward)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < C
        w = tl.load(weight + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bb = tl.load(branch_bias + cols, mask=col_ok, other=0.0).to(tl.float32)
        sum_w = tl.zeros((BLOCK_C,), tl.float32)
        sum_b = tl.zeros((BLOCK_C,), tl.float32)
        sum_bb = tl.zeros((BLOCK_C,), tl.float32)
        for step in range(STEPS):
            rows, ok, offsets = _rows(step, M, C, ROWS, STEPS, BLOCK_C)
            factor = tl.full((ROWS, BLOCK_C), 1.0, tl.float32)  # d s / d branch
            if HAS_MASK:
                keep = tl.load(mask + offsets, mask=ok, other=0) != 0
                factor = tl.where(keep, keep_scale, 0.0)
            if HAS_SCALE:
                factor *= tl.load(row_scale + rows // T, mask=rows < M, other=0.0)[:, None]
            br = tl.load(branch + offsets, mask=ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                br += bb[None, :]
            s = tl.load(x + offsets, mask=ok, other=0.0).to(tl.float32) + br * factor
            mean = tl.load(mean_in + rows, mask=rows < M, other=0.0)
            rstd = tl.load(rstd_in + rows, mask=rows < M, other=0.0)
            xhat = tl.where(ok, (s - mean[:, None]) * rstd[:, None], 0.0)
            g = tl.load(dy + offsets, mask=ok, other=0.0).to(tl.float32)
            sum_w += tl.sum(g * xhat, 0)
            sum_b += tl.sum(g, 0)
            gw = g * w[None, :]
            ds = rstd[:, None] * (gw - (tl.sum(gw, 1)[:, None]
                                        + xhat * tl.sum(gw * xhat, 1)[:, None]) / C)
            tl.store(dx + offsets, ds.to(dx.dtype.element_ty), mask=ok)
            d_branch = tl.where(ok, ds * factor, 0.0)
            tl.store(dbranch + offsets, d_branch.to(dbranch.dtype.element_ty), mask=ok)
            sum_bb += tl.sum(d_branch, 0)
        tl.store(partial_w + tl.program_id(0) * C + cols, sum_w, mask=col_ok)
        tl.store(partial_b + tl.program_id(0) * C + cols, sum_b, mask=col_ok)
        if HAS_BIAS:
            tl.store(partial_bb + tl.program_id(0) * C + cols, sum_bb, mask=col_ok)

    def _launch(M: int, C: int, tiles: tuple[int, int, int]
                ) -> tuple[tuple[int], dict[str, int]]:
        rows, steps, warps = tiles
        grid = (triton.cdiv(M, rows * steps),)
        return grid, {"ROWS": rows, "STEPS": steps, "BLOCK_C": triton.next_power_of_2(C),
                      "num_warps": warps}

    def forward_launch(x: torch.Tensor, branch: torch.Tensor, branch_bias: torch.Tensor | None,
                       mask: torch.Tensor | None, row_scale: torch.Tensor | None, T: int,
                       p: float, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       y: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                       ) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any]]:
        """The forward kernel's grid, arguments and keywords (the op launches them; bench.norm
        launches the kernel alone). Absent tensors are stood in for by ones never read."""
        M, C = x.shape
        grid, meta = _launch(M, C, FORWARD)
        args = (x, branch, bias if branch_bias is None else branch_bias,
                x if mask is None else mask, mean if row_scale is None else row_scale,
                weight, bias, y, mean, rstd, M, C, T, 1.0 / (1.0 - p), eps)
        return grid, args, dict(HAS_BIAS=branch_bias is not None, HAS_MASK=mask is not None,
                                HAS_SCALE=row_scale is not None, **meta)

    def backward_launch(x: torch.Tensor, branch: torch.Tensor, branch_bias: torch.Tensor | None,
                        mask: torch.Tensor | None, row_scale: torch.Tensor | None, T: int,
                        p: float, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        dy: torch.Tensor, dx: torch.Tensor, dbranch: torch.Tensor
                        ) -> tuple[tuple[int], tuple[Any, ...], dict[str, Any]]:
        """As :func:`forward_launch`, for the backward kernel; its partial sums (programs x C,
        float32: weight, bias, branch bias) are the last three arguments."""
        M, C = x.shape
        grid, meta = _launch(M, C, BACKWARD)
        partial_w = x.new_empty(grid[0], C, dtype=torch.float32)
        partial_b = torch.empty_like(partial_w)
        partial_bb = torch.empty_like(partial_w) if branch_bias is not None else partial_w
        args = (x, branch, weight if branch_bias is None else branch_bias,
                x if mask is None else mask, mean if row_scale is None else row_scale,
                weight, mean, rstd, dy, dx, dbranch, partial_w, partial_b, partial_bb, M, C, T,
                1.0 / (1.0 - p))
        return grid, args, dict(HAS_BIAS=branch_bias is not None, HAS_MASK=mask is not None,
                                HAS_SCALE=row_scale is not None, **meta)

    @triton_op("amt::residual_norm", mutates_args=())
    def _residual_norm(x: torch.Tensor, branch: torch.Tensor, branch_bias: torch.Tensor | None,
                       mask: torch.Tensor | None, row_scale: torch.Tensor | None, T: int,
                       p: float, weight: torch.Tensor, bias: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.empty_like(x)
        mean = x.new_empty(x.shape[0], dtype=torch.float32)
        rstd = torch.empty_like(mean)
        grid, args, kwargs = forward_launch(x, branch, branch_bias, mask, row_scale, T, p,
                                            weight, bias, eps, y, mean, rstd)
        wrap_triton(_norm_forward_kernel)[grid](*args, **kwargs)
        return y, mean, rstd

    @triton_op("amt::residual_norm_backward", mutates_args=())
    def _residual_norm_backward(x: torch.Tensor, branch: torch.Tensor,
                                branch_bias: torch.Tensor | None, mask: torch.Tensor | None,
                                row_scale: torch.Tensor | None, T: int, p: float,
                                weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                dy: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
        dx = torch.empty_like(x)
        dbranch = torch.empty_like(branch)
        grid, args, kwargs = backward_launch(x, branch, branch_bias, mask, row_scale, T, p,
                                             weight, mean, rstd, dy, dx, dbranch)
        wrap_triton(_norm_backward_kernel)[grid](*args, **kwargs)
        partial_w, partial_b, partial_bb = args[11:14]
        C = x.shape[1]
        # the branch bias's gradient (zeros when there is none: an op returns tensors only)
        dbb = (partial_bb.sum(0) if branch_bias is not None else weight.new_zeros(C))
        return (dx, dbranch, partial_w.sum(0).to(weight.dtype),
                partial_b.sum(0).to(weight.dtype),
                dbb.to(weight.dtype if branch_bias is None else branch_bias.dtype))

    def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        x, branch, branch_bias, mask, row_scale, T, p, weight, _, _ = inputs
        ctx.save_for_backward(x, branch, branch_bias, mask, row_scale, weight, output[1],
                              output[2])
        ctx.T, ctx.p = T, p

    def _backward(ctx, dy, _dmean, _drstd):  # type: ignore[no-untyped-def]
        x, branch, branch_bias, mask, row_scale, weight, mean, rstd = ctx.saved_tensors
        dx, dbranch, dw, db, dbb = _residual_norm_backward(
            x, branch, branch_bias, mask, row_scale, ctx.T, ctx.p, weight, mean, rstd,
            dy.contiguous())
        return (dx, dbranch, dbb if branch_bias is not None else None, None, None, None, None,
                dw, db, None)

    _residual_norm.register_autograd(_backward, setup_context=_setup_context)


def residual_norm(x: torch.Tensor, branch: torch.Tensor, mask: torch.Tensor | None,
                  row_scale: torch.Tensor | None, p: float, norm: torch.nn.LayerNorm,
                  branch_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x + (branch + branch_bias) * mask / (1 - p) * row_scale[b])`` in ``x``'s dtype,
    for ``x`` and ``branch`` (B, T, C), ``row_scale`` (B,); or (N, C) and (N,), one scale per
    token (see the module docstring). ``mask``: a bool keep mask of their shape, or None."""
    C = x.size(-1)
    T = x.size(1) if x.dim() == 3 else 1  # tokens per entry of row_scale
    flat = [t.reshape(-1, C).contiguous() for t in (x, branch)]
    m = None if mask is None else mask.reshape(-1, C).contiguous()
    y, _, _ = _residual_norm(flat[0], flat[1], branch_bias, m, row_scale, T, float(p),
                             norm.weight, norm.bias, float(norm.eps))
    return y.view(x.shape)


@torch.library.custom_op("amt::addmm_", mutates_args=("out",))
def _addmm_(out: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> None:
    """``out += mat1 @ mat2`` in place: Inductor's ``aten.addmm`` copies its input into a new
    buffer first, every call (H200, 64k micro-batches: 4.8 ms of copies per two steps, which
    left ~1 ms of the 6.6 ms add saved)."""
    out.addmm_(mat1, mat2)


class _ResidualLinear(torch.autograd.Function):
    """``(x W^T + b, x)``: see :func:`residual_linear`."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[no-untyped-def]
        y = torch.nn.functional.linear(x, weight, bias)  # autocast picks y's dtype
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y, x.view_as(x)

    @staticmethod
    def backward(ctx, dy, dresidual):  # type: ignore[no-untyped-def]
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        w = weight.to(dy.dtype)
        dx = dresidual.reshape(dy2.shape[0], -1)
        if dresidual.dtype == dy.dtype and torch.compiler.is_compiling():
            _addmm_(dx, dy2, w)  # in place: see residual_linear for when that is safe
        elif dresidual.dtype == dy.dtype:
            dx = torch.addmm(dx, dy2, w)
        else:  # a float32 stream under autocast (train.fp32_residual)
            dx = dx + (dy2 @ w).to(dx.dtype)
        dw = (dy2.t() @ x.reshape(dy2.shape[0], -1).to(dy.dtype)).to(weight.dtype)
        db = dy2.sum(0, dtype=torch.float32).to(weight.dtype) if ctx.has_bias else None
        return dx.view(x.shape), dw, db


def residual_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A branch's first projection ``F.linear(x, weight, bias)`` and ``x`` again, for the
    residual path: the same values, but in the backward the residual's gradient of ``x`` is
    added by the input-gradient matmul (``addmm``: cuBLAS's C input, read by the epilogue)
    instead of by autograd's separate add, a kernel that reads both gradients and writes their
    sum (H200, 64k micro-batches: 96 of them, 6.6 ms per two steps; ``train.residual_addmm``).

    Compiled, the matmul adds into the residual's gradient **in place**, so that gradient must
    be the residual's alone: ``residual`` goes to :func:`residual_norm` (whose backward writes a
    fresh one), as ``Block`` uses it. A consumer whose backward hands one tensor to several
    inputs (``residual + c``) would have ``c``'s gradient overwritten. Eager, it is added out of
    place (safe everywhere)."""
    return _ResidualLinear.apply(x, weight, bias)
