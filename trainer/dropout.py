"""Dropout for compiled training on a GPU: the mask from one Triton kernel that draws eight
16-bit numbers per Philox call.

Why: Inductor lowers dropout to one Philox call (``tl.rand``) per element, inside the fused
dropout + residual + LayerNorm kernels of a compiled block, and those calls, not memory, set
their time (a 16-bit draw needs an eighth of a call). Here the mask (bool) comes from its own
small kernel, registered with ``torch.library.triton_op`` so that Inductor launches it from its
own wrapper (no operator dispatch per call); Inductor's fused kernel then multiplies by it and
keeps it for the backward, as it keeps its own dropout's mask.

An element is kept when its draw is >= round(p * 2**16): p is quantised to 2**-16 (0.1 ->
0.100006). Eager training keeps ``F.dropout`` (ATen's kernel already draws four per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs: F.dropout everywhere
    triton = None

__all__ = ["dropout", "dropout_mask", "random_mask"]

BLOCK = 4096  # mask elements per program (512 Philox calls)

if triton is not None:

    @triton.jit
    def _mask_kernel(seed_ptr, out, n, threshold, BLOCK: tl.constexpr):
        """``out[i]`` = draw(i) >= threshold for the ``BLOCK`` elements of this program: Philox
        counter ``i // 8`` gives four 32-bit numbers, each split into two 16-bit draws."""
        G: tl.constexpr = BLOCK // 8
        pid = tl.program_id(0).to(tl.int64)  # masks of >= 2**31 elements index past int32
        seed = tl.load(seed_ptr)
        r0, r1, r2, r3 = tl.randint4x(seed, pid * G + tl.arange(0, G))
        r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK // 2,))
        u = r.to(tl.uint32, bitcast=True)
        draws = tl.reshape(tl.join(u & 0xFFFF, u >> 16), (BLOCK,))
        i = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + i, draws >= threshold, mask=i < n)

    @triton_op("amt::dropout_mask", mutates_args=())
    def _dropout_mask(seed: torch.Tensor, shape: list[int], threshold: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.bool, device=seed.device)
        n = out.numel()
        wrap_triton(_mask_kernel)[(triton.cdiv(n, BLOCK),)](seed, out, n, threshold,
                                                            BLOCK=BLOCK)
        return out


def dropout_mask(shape: list[int], p: float, seed: torch.Tensor) -> torch.Tensor:
    """Keep mask (bool, ``shape``) with P(keep) = 1 - p (quantised to 2**-16), from the (1,)
    int64 ``seed`` on the mask's device (the same seed gives the same mask)."""
    return _dropout_mask(seed, list(shape), round(p * 2**16))


def random_mask(shape: list[int], p: float, device: torch.device) -> torch.Tensor:
    """A fresh keep mask: :func:`dropout_mask` on a seed drawn from the device's generator."""
    seed = torch.randint(0, 2**31 - 1, (1,), device=device)
    return dropout_mask(shape, p, seed)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``; while Dynamo traces a graph for a GPU, with the mask from
    :func:`dropout_mask` (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if triton is None or not x.is_cuda or not torch.compiler.is_compiling():
        return F.dropout(x, p, True)
    return x * random_mask(list(x.shape), p, x.device) * (1.0 / (1.0 - p))
