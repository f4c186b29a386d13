"""Label-smoothed cross-entropy over the vocabulary in two Triton kernels (GPU).

Why: compiled, ``trainer.loop.token_losses`` (log-softmax, gather, mean) is three Inductor
kernels and ~3 ms a 64k-token micro-batch on an H200 (~32k target rows x 16k vocabulary):
the forward writes nothing large, but the backward scatters the target's gradient into a
zeroed float32 (N, V) buffer and reads it back (BENCHMARKS.md P1, session 9). Here the forward
reads each row of logits once (online log-sum-exp, the sum of the row for the smoothing, the
target's logit) and keeps the log-sum-exp; the backward reads the row once more and writes
its gradient, ``g_loss * (softmax - smoothing / V - (1 - smoothing) * onehot) + g_nll *
(softmax - onehot)``: 3 passes over the logits instead of ~7.

Rows whose target is ``IGNORE_INDEX`` contribute 0 and get a zero gradient. On by default
(``train.fused_loss``): 1.017x the compiled step on an H200 (64k-token micro-batches).
"""

from __future__ import annotations

import torch

from trainer.data import IGNORE_INDEX

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: token_losses everywhere
    triton = None

__all__ = ["available", "cross_entropy_sums"]

BLOCK = 4096  # vocabulary entries per step of a row's loop


def available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (a GPU with Triton; the tests also run them
    on CPU tensors in Triton's interpreter)."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _ce_forward_kernel(z, targets, loss, nll, lse_out, V, stride, smoothing, ignore,
                           BLOCK: tl.constexpr):
        """Row ``program_id``: its log-sum-exp, NLL and smoothed loss (0 if ignored)."""
        smoothing = tl.cast(smoothing, tl.float32)  # Inductor may pass a Python float as float64
        row = tl.program_id(0).to(tl.int64)
        zrow = z + row * stride
        cols = tl.arange(0, BLOCK)
        m = tl.full((), -1e30, tl.float32)  # running max (finite: exp(m - m_new) is 0 at first)
        s = tl.zeros((), tl.float32)  # sum of exp(z - m)
        total = tl.zeros((BLOCK,), tl.float32)  # the row's sum, lane by lane
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x = tl.load(zrow + c, mask=c < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            total += tl.where(c < V, x, 0.0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(targets + row)
        keep = t != ignore
        z_target = tl.load(zrow + tl.where(keep, t, 0)).to(tl.float32)
        row_nll = lse - z_target
        row_loss = (1.0 - smoothing) * row_nll + smoothing * (lse - tl.sum(total, 0) / V)
        tl.store(loss + row, tl.where(keep, row_loss, 0.0))
        tl.store(nll + row, tl.where(keep, row_nll, 0.0))
        tl.store(lse_out + row, lse)

    @triton.jit
    def _ce_backward_kernel(z, targets, lse, g_loss, g_nll, dz, V, stride, d_stride,
                            g_stride, smoothing, ignore, BLOCK: tl.constexpr):
        """The gradient of row ``program_id``'s logits from its loss's and NLL's."""
        smoothing = tl.cast(smoothing, tl.float32)  # as in the forward: no float64 per element
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(targets + row)
        keep = t != ignore
        gl = tl.where(keep, tl.load(g_loss + row * g_stride), 0.0)
        gn = tl.where(keep, tl.load(g_nll + row * g_stride), 0.0)
        row_lse = tl.load(lse + row)
        on_target = gl * (1.0 - smoothing) + gn
        uniform = gl * smoothing / V
        cols = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            c = v0 + cols
            x = tl.load(z + row * stride + c, mask=c < V, other=0.0).to(tl.float32)
            d = (gl + gn) * tl.exp(x - row_lse) - uniform - tl.where(c == t, on_target, 0.0)
            tl.store(dz + row * d_stride + c, d.to(dz.dtype.element_ty), mask=c < V)

    def _block(V: int) -> int:
        return min(BLOCK, triton.next_power_of_2(V))

    @triton_op("amt::cross_entropy", mutates_args=())
    def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, V = logits.shape
        loss = logits.new_empty(N, dtype=torch.float32)
        nll = torch.empty_like(loss)
        lse = torch.empty_like(loss)
        wrap_triton(_ce_forward_kernel)[(N,)](logits, targets, loss, nll, lse, V,
                                              logits.stride(0), smoothing, IGNORE_INDEX,
                                              BLOCK=_block(V), num_warps=8)
        return loss, nll, lse

    @triton_op("amt::cross_entropy_backward", mutates_args=())
    def _cross_entropy_backward(logits: torch.Tensor, targets: torch.Tensor,
                                lse: torch.Tensor, g_loss: torch.Tensor, g_nll: torch.Tensor,
                                smoothing: float) -> torch.Tensor:
        N, V = logits.shape
        dz = torch.empty_like(logits)
        wrap_triton(_ce_backward_kernel)[(N,)](logits, targets, lse, g_loss, g_nll, dz, V,
                                               logits.stride(0), dz.stride(0),
                                               g_loss.stride(0), smoothing, IGNORE_INDEX,
                                               BLOCK=_block(V), num_warps=8)
        return dz

    def _setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        logits, targets, smoothing = inputs
        ctx.save_for_backward(logits, targets, output[2])
        ctx.smoothing = smoothing

    def _backward(ctx, g_loss, g_nll, g_lse):  # type: ignore[no-untyped-def]
        logits, targets, lse = ctx.saved_tensors
        zero = lse.new_zeros(1).expand_as(lse)  # an output the loss did not use
        # one stride serves both: make them alike (a sum's gradient is an expanded scalar)
        g_loss = zero if g_loss is None else g_loss.expand_as(lse)
        g_nll = zero if g_nll is None else g_nll.expand_as(lse)
        if g_loss.stride(0) != g_nll.stride(0):
            g_loss, g_nll = g_loss.contiguous(), g_nll.contiguous()
        dz = _cross_entropy_backward(logits, targets, lse, g_loss, g_nll, ctx.smoothing)
        return dz, None, None

    _cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy_sums(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``trainer.loop.token_losses`` returns (the summed label-smoothed loss and the
    summed NLL over targets that are not ``IGNORE_INDEX``), from the kernels: logits (..., V),
    targets (...)."""
    z = logits.flatten(0, -2)
    if z.stride(1) != 1:
        z = z.contiguous()
    loss, nll, _ = _cross_entropy(z, targets.flatten(), float(label_smoothing))
    return loss.sum(), nll.sum()
