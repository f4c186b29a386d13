"""``trainer.gelu``: the bias + GELU kernels (on CPU tensors in Triton's interpreter, see
tests/conftest.py; on a GPU also compiled, in bf16) against ``F.gelu(x + b)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from trainer.gelu import bias_gelu  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("shape", [(3, 5, 40), (70, 130), (32, 128)])
@pytest.mark.parametrize("fast_erf", [True, False])
def test_matches_gelu_of_biased_input(shape: tuple[int, ...], fast_erf: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Shapes under one block, over several (partial blocks in both dimensions) and exactly
    one; the input's and the bias's gradients; the polynomial erf and libdevice's."""
    monkeypatch.setattr("trainer.gelu.FAST_ERF", fast_erf)
    torch.manual_seed(0)
    x = (torch.randn(*shape, device=DEVICE) * 3).requires_grad_()
    b = torch.randn(shape[-1], device=DEVICE, requires_grad=True)
    grad = torch.randn(*shape, device=DEVICE)
    y = bias_gelu(x, b)
    y.backward(grad)
    rx, rb = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = F.gelu(rx + rb)
    ref.backward(grad)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, rx.grad)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Inductor + Triton)")
def test_compiled_bf16_matches_the_linear_layer() -> None:
    """As the MLP uses it: a bf16 matmul without bias, a float32 bias, autocast, compiled with
    dynamic shapes; against ``F.gelu(F.linear(x, w, b))`` under the same autocast."""
    torch.manual_seed(0)
    w = (torch.randn(3072, 768, device=DEVICE) * 0.02).requires_grad_()
    b = (torch.randn(3072, device=DEVICE) * 0.1).requires_grad_()

    def fused(x: torch.Tensor) -> torch.Tensor:
        return bias_gelu(F.linear(x, w), b)

    f = torch.compile(fused, dynamic=True)
    for rows in (3000, 4100):  # two shapes, one graph
        x = torch.randn(rows, 768, device=DEVICE, requires_grad=True)
        grad = torch.randn(rows, 3072, device=DEVICE, dtype=torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = f(x)
        y.backward(grad)
        gx, gw, gb = x.grad, w.grad, b.grad
        x.grad = w.grad = b.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = F.gelu(F.linear(x, w, b))
        ref.backward(grad)
        assert y.dtype == ref.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
        torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gx, x.grad, rtol=2e-2, atol=2e-2)
        # sums over the rows: the reference sums bf16 terms, the kernel float32 ones
        for ours, ref_grad in ((gw, w.grad), (gb, b.grad)):
            torch.testing.assert_close(ours, ref_grad, rtol=2e-2,
                                       atol=1e-2 * ref_grad.abs().max().item())
        x.grad = w.grad = b.grad = None


def test_mlp_fused_matches_unfused_in_training() -> None:
    """``MLP.fused`` (set by the trainer from ``train.fused_mlp``): the same output and
    gradients as the plain module in training; evaluation never takes the kernels."""
    from trainer.config import ModelConfig
    from trainer.model import MLP

    torch.manual_seed(0)
    mlp = MLP(ModelConfig(d_model=32, n_heads=4, d_ff=96)).to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    grads = []
    outs = []
    for fused in (False, True):
        mlp.fused = fused
        mlp.zero_grad()
        y = mlp(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in mlp.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
