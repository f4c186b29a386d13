"""The MLP's bias + exact GELU in two Triton kernels, the bias gradient in the backward's pass.

Why: compiled, the up-projection is a cuBLAS matmul with the bias in its epilogue and then
Inductor's GELU; its backward is a pointwise kernel (reads the pre-activation and the gradient,
writes the pre-activation's gradient ``dh``) and a column sum that reads ``dh`` once more for
the bias gradient (H200, report shape, 64k-token micro-batches: 19.6 + 5.3 ms of device time
per two steps, BENCHMARKS.md P1). Here the matmul runs without its bias; the forward adds it
and applies GELU; the backward recomputes the pre-activation, writes ``dh`` and each block of
rows' partial bias sums (float32) in the same pass, and a small sum over the blocks finishes
the bias gradient. Same maths as ``F.gelu(F.linear(x, w, b))`` (``approximate="none"``),
computed in float32; the bias gradient is summed from the float32 ``dh``. erf is a polynomial
(:func:`_cdf_pdf`): libdevice's made both kernels compute-bound (``bench.gelu``: forward 0.28
against a 0.21 ms floor for one read and one write). H200, 64k-token micro-batches: 40.2 ->
32.0 ms per two steps in the compiled step, 1.025x its tokens/s (``train.fused_mlp``).

The kernels load their inputs themselves, not through a ``@triton.jit`` helper: Inductor's
analysis of what a user kernel writes takes any pointer passed to a helper as written, and
copies such an input before the launch when it is used again (here the saved activation: a
64k x 3072 copy per layer that ate the gain; tests/trainer/test_kernel_writes.py).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: F.gelu everywhere
    triton = None

__all__ = ["available", "bias_gelu"]

# rows x columns per program, warps; erf by a polynomial (see _cdf_pdf); H200, 64k x 3072
# bf16: 32 x 128 with 4 warps among the fastest of the shapes bench.gelu sweeps
BLOCK_M, BLOCK_N, WARPS, FAST_ERF = 32, 128, 4, True


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (a GPU with Triton; the tests also run them
    on CPU tensors in Triton's interpreter)."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _tile(M, N, stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's (BLOCK_M, BLOCK_N) tile: element offsets, mask, columns (indices
        only: a helper given pointers would make Inductor copy them, see the docstring)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        return rows[:, None] * stride + cols[None, :], mask, cols

    @triton.jit
    def _cdf_pdf(h, FAST_ERF: tl.constexpr):
        """The standard normal's CDF and density at ``h`` (float32). FAST_ERF: erf by
        Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, below float32's resolution of the
        CDF near 1), sharing its exp(-h^2 / 2) with the density; else libdevice's erff."""
        e = tl.exp(-0.5 * h * h)
        if FAST_ERF:
            t = 1.0 / (1.0 + 0.23164193 * tl.abs(h))  # 0.3275911 * |h / sqrt(2)|
            poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736)
                    * t + 0.254829592) * t
            tail = 0.5 * poly * e  # (1 - erf(|h| / sqrt(2))) / 2
            cdf = tl.where(h < 0, tail, 1.0 - tail)
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return cdf, e * 0.3989422804014327

    @triton.jit
    def _gelu_forward_kernel(x, b, y, M, N, stride, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, FAST_ERF: tl.constexpr):
        offsets, mask, cols = _tile(M, N, stride, BLOCK_M, BLOCK_N)
        # the loads stay in the kernel (see the module docstring)
        h = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
        h += tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        cdf, _ = _cdf_pdf(h, FAST_ERF)
        tl.store(y + offsets, (h * cdf).to(y.dtype.element_ty), mask=mask)

    @triton.jit
    def _gelu_backward_kernel(x, b, dy, dx, partial, M, N, stride, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, FAST_ERF: tl.constexpr):
        offsets, mask, cols = _tile(M, N, stride, BLOCK_M, BLOCK_N)
        h = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)  # x + b, as forward
        h += tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        g = tl.load(dy + offsets, mask=mask, other=0.0).to(tl.float32)
        cdf, pdf = _cdf_pdf(h, FAST_ERF)
        d = g * (cdf + h * pdf)  # 0 where masked (g is 0 there)
        tl.store(dx + offsets, d.to(dx.dtype.element_ty), mask=mask)
        tl.store(partial + tl.program_id(0) * N + cols, tl.sum(d, 0), mask=cols < N)

    def _grid(M: int, N: int) -> tuple[int, int]:
        return triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N)

    @triton_op("amt::bias_gelu", mutates_args=())
    def _bias_gelu(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        M, N = x.shape
        y = torch.empty_like(x)
        wrap_triton(_gelu_forward_kernel)[_grid(M, N)](x, b, y, M, N, x.stride(0),
                                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                       FAST_ERF=FAST_ERF, num_warps=WARPS)
        return y

    @triton_op("amt::bias_gelu_backward", mutates_args=())
    def _bias_gelu_backward(x: torch.Tensor, b: torch.Tensor, dy: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        M, N = x.shape
        dx = torch.empty_like(x)
        grid = _grid(M, N)
        partial = x.new_empty(grid[0], N, dtype=torch.float32)
        wrap_triton(_gelu_backward_kernel)[grid](x, b, dy, dx, partial, M, N, x.stride(0),
                                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                 FAST_ERF=FAST_ERF, num_warps=WARPS)
        return dx, partial.sum(0).to(b.dtype)

    def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs)

    def _backward(ctx, dy):  # type: ignore[no-untyped-def]
        x, b = ctx.saved_tensors
        return _bias_gelu_backward(x, b, dy.contiguous())

    _bias_gelu.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x + bias)`` over the last dimension of ``x`` (..., N), in ``x``'s dtype; the
    bias may be another dtype (a float32 parameter under autocast) and gets its gradient in
    its own."""
    flat = x.flatten(0, -2)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return _bias_gelu(flat, bias).view_as(x)
