"""``trainer.norm``: post-norm's dropout + drop-path + residual add + LayerNorm in two kernels
(on CPU tensors in Triton's interpreter, see tests/conftest.py; on a GPU also compiled, in
bf16), against the same maths in PyTorch with the same dropout mask."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("triton")

from trainer.norm import residual_norm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(x: torch.Tensor, branch: torch.Tensor, mask: torch.Tensor | None,
              scale: torch.Tensor | None, p: float, norm: torch.nn.LayerNorm,
              branch_bias: torch.Tensor | None = None) -> torch.Tensor:
    b = branch.float() if branch_bias is None else branch.float() + branch_bias
    if mask is not None:
        b = b * mask / (1 - p)
    if scale is not None:
        b = b * scale[:, None, None]
    return norm(x.float() + b).to(x.dtype)


def check_against_reference(f: Callable[..., torch.Tensor], x: torch.Tensor,
                            branch: torch.Tensor, mask: torch.Tensor | None,
                            scale: torch.Tensor | None, p: float, norm: torch.nn.LayerNorm,
                            bias: torch.Tensor | None, grad: torch.Tensor, bf16: bool = False
                            ) -> None:
    """``f`` (residual_norm, maybe compiled) against :func:`reference`: the output and every
    gradient (bf16: to its precision)."""
    y = f(x, branch, mask, scale, p, norm, bias)
    y.backward(grad)
    tensors = [x, branch, norm.weight, norm.bias] + ([bias] if bias is not None else [])
    ours = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    ref = reference(x, branch, mask, scale, p, norm, bias)
    ref.backward(grad)
    if not bf16:
        torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for a, t in zip(ours, tensors, strict=True):
        if bf16:
            torch.testing.assert_close(a.float(), t.grad.float(), rtol=2e-2,
                                       atol=1e-2 * t.grad.abs().max().item())
        else:
            torch.testing.assert_close(a, t.grad)
    for t in tensors:
        t.grad = None


def _norm(C: int) -> torch.nn.LayerNorm:
    norm = torch.nn.LayerNorm(C).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


@pytest.mark.parametrize(("shape", "masked", "scaled", "biased"), [
    ((3, 5, 40), True, True, True), ((2, 37, 24), True, False, False),
    ((4, 3, 16), False, True, True), ((1, 2, 8), False, False, False),
    ((2, 40, 24), True, True, True), ((2, 35, 768), True, True, True),
])
def test_matches_layer_norm_of_the_residual(shape: tuple[int, int, int], masked: bool,
                                            scaled: bool, biased: bool) -> None:
    """Rows over several programs and a partial one, widths not a power of two; with and
    without the dropout mask, the per-sequence scale and the branch's bias; every
    gradient."""
    torch.manual_seed(0)
    B, T, C = shape
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    branch = torch.randn(*shape, device=DEVICE, requires_grad=True)
    mask = torch.rand(*shape, device=DEVICE) > 0.1 if masked else None
    scale = (torch.tensor([0.0, 1 / 0.9, 1 / 0.9, 0.0], device=DEVICE)[:B] if scaled
             else None)
    norm = _norm(C)
    bias = torch.randn(C, device=DEVICE, requires_grad=True) if biased else None
    grad = torch.randn(*shape, device=DEVICE)
    check_against_reference(residual_norm, x, branch, mask, scale, 0.1, norm, bias, grad)


def test_bf16_stream_keeps_its_dtype() -> None:
    """A bf16 stream and branch (bf16 autocast): the output and both input gradients bf16,
    the LayerNorm's gradients float32, all close to the float32 maths."""
    torch.manual_seed(1)
    x = torch.randn(2, 9, 48, device=DEVICE).bfloat16().requires_grad_()
    branch = torch.randn(2, 9, 48, device=DEVICE).bfloat16().requires_grad_()
    norm = _norm(48)
    y = residual_norm(x, branch, None, None, 0.0, norm)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == branch.grad.dtype == torch.bfloat16
    assert norm.weight.grad.dtype == torch.float32
    ref = torch.nn.functional.layer_norm(x.float() + branch.float(), (48,), norm.weight,
                                         norm.bias)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def _block_run(dropout: float, **attrs: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A post-norm block (the same weights each call) with ``attrs`` set, its output and
    parameter gradients for one input, the random state reset before the forward."""
    from trainer.config import ModelConfig
    from trainer.model import Block, attention_mask

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, dropout=dropout, drop_path=0.0)
    block = Block(cfg, layer=0, drop_path_p=0.0).to(DEVICE).train()
    for name, value in attrs.items():
        setattr(block, name, value)
    x = torch.randn(2, 6, 32, device=DEVICE)
    prefix = torch.tensor([2, 4], device=DEVICE)
    mask = attention_mask(torch.zeros_like(prefix), prefix, 6, 6)
    weights = torch.randn(2, 6, 32, device=DEVICE)  # a random linear loss: (sum of y^2 would
    torch.manual_seed(5)  # not do: a LayerNorm's output keeps it, its input gradient ~ 0)
    y = block(x, None, mask)
    (y * weights).sum().backward()
    return y.detach(), [p.grad.clone() for p in block.parameters()]


def test_block_fused_norm_matches_plain_block_without_randomness() -> None:
    """``Block.fused_norm`` (set by the trainer from ``train.fused_norm``): with dropout and
    drop-path at 0, the same output and gradients as the plain post-norm block."""
    (y0, g0), (y1, g1) = _block_run(0.0, fused_norm=False), _block_run(0.0, fused_norm=True)
    torch.testing.assert_close(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False])
def test_residual_linear_gradients(with_bias: bool) -> None:
    """``residual_linear``: the linear's output and ``x`` itself; its backward (the residual's
    gradient added by addmm) passes torch's numerical gradient check."""
    from trainer.norm import residual_linear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True) if with_bias else None
    y, residual = residual_linear(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    assert torch.equal(residual, x)

    def both(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y, residual = residual_linear(x, w, b)  # both outputs feed the result
        return (y.sin().sum(-1, keepdim=True) * residual.cos()).sum()

    assert torch.autograd.gradcheck(both, (x, w, b))


def test_residual_linear_compiled_adds_in_place() -> None:
    """Compiled (Inductor on CPU), the backward adds into the residual's gradient in place
    (``amt::addmm_``). As ``Block`` uses it the residual's consumer writes a fresh gradient
    (here a product's backward; ``c``'s is another tensor): autograd's gradients, eager. (With
    ``residual + c`` instead, ``c``'s gradient would be overwritten: residual_linear's
    contract.)"""
    from trainer.norm import residual_linear

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, w2: torch.Tensor,
          c: torch.Tensor) -> torch.Tensor:
        y, residual = residual_linear(x, w, b)
        z = (residual * 0.5 + c) + torch.nn.functional.linear(torch.relu(y), w2)
        return (torch.nn.functional.layer_norm(z, (x.shape[-1],)) * weights).sum()

    torch.manual_seed(0)
    weights = torch.randn(3, 5, 16)
    args = [torch.randn(*s, requires_grad=True)
            for s in ((3, 5, 16), (24, 16), (24,), (16, 24), (3, 5, 16))]
    eager = torch.autograd.grad(f(*args), args)
    compiled = torch.autograd.grad(torch.compile(f, dynamic=True, fullgraph=True)(*args), args)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_block_with_residual_addmm_matches_eager(bf16: bool,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The block's wiring compiled as training compiles it (Inductor, dynamic shapes, here on
    CPU; float32, or a bf16 stream under bf16 autocast): with ``residual_addmm`` (the in-place
    add) the same output and gradients as the eager block without it, over two shapes. The
    Triton kernels cannot be traced on CPU, so ``residual_norm`` is its PyTorch reference here
    (no dropout: the graphs draw nothing)."""
    from trainer.config import ModelConfig
    from trainer.model import Block, attention_mask

    monkeypatch.setattr("trainer.norm.residual_norm", reference)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, dropout=0.0, drop_path=0.0)
    torch.manual_seed(0)
    eager = Block(cfg, layer=0, drop_path_p=0.0).train()
    ours = Block(cfg, layer=0, drop_path_p=0.0).train()
    ours.load_state_dict(eager.state_dict())
    eager.fused_norm = ours.fused_norm = ours.residual_addmm = True
    compiled = torch.compile(ours, dynamic=True)
    for B, T in ((2, 6), (3, 9)):
        x = torch.randn(B, T, 32).to(torch.bfloat16 if bf16 else torch.float32)
        x.requires_grad_()
        prefix = torch.randint(1, T, (B,))
        mask = attention_mask(torch.zeros_like(prefix), prefix, T, T)
        weights = torch.randn(B, T, 32)
        grads = []
        for block, f in ((eager, eager), (ours, compiled)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = f(x, None, mask)
            grads.append([y, *torch.autograd.grad((y.float() * weights).sum(),
                                                   [x, *block.parameters()])])
        for a, b in zip(*grads, strict=True):
            assert a.dtype == b.dtype
            if bf16:  # one rounding fewer in the addmm, others in Inductor's fusions
                torch.testing.assert_close(a.float(), b.float(), rtol=2e-2,
                                           atol=2e-2 * b.abs().max().item())
            else:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stream", [torch.bfloat16, torch.float32])
def test_residual_linear_under_autocast(stream: torch.dtype) -> None:
    """Under bf16 autocast, a bf16 stream (the addmm) or a float32 one (``train.fp32_residual``:
    a separate add): each gradient in its tensor's dtype, close to autograd's own."""
    from trainer.norm import residual_linear

    torch.manual_seed(0)
    x = torch.randn(4, 6, 16).to(stream).requires_grad_()
    lin = torch.nn.Linear(16, 24)
    g_y, g_r = torch.randn(4, 6, 24), torch.randn(4, 6, 16)

    def run(ours: bool) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, r = residual_linear(x, lin.weight, lin.bias) if ours else (lin(x), x)
        assert y.dtype == torch.bfloat16
        torch.autograd.backward([y, r], [g_y.to(y.dtype), g_r.to(r.dtype)])
        grads = [t.grad for t in (x, lin.weight, lin.bias)]
        x.grad = lin.weight.grad = lin.bias.grad = None
        return grads

    for a, b in zip(run(True), run(False), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2,
                                   atol=1e-2 * b.abs().max().item())


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_block_residual_addmm_matches_fused_block(dropout: float,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``Block.residual_addmm`` (``train.residual_addmm``): under the same random state, the
    same output and gradients as the fused block without it, both branches' first matmuls
    through ``residual_linear``."""
    from trainer.norm import residual_linear

    calls = []

    def counted(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(args[1].shape)
        return residual_linear(*args)

    y0, g0 = _block_run(dropout, fused_norm=True)
    monkeypatch.setattr("trainer.norm.residual_linear", counted)
    y1, g1 = _block_run(dropout, fused_norm=True, residual_addmm=True)
    assert calls == [(96, 32), (64, 32)]  # QKV, MLP up
    torch.testing.assert_close(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Inductor + Triton)")
def test_compiled_bf16_with_dropout_matches_reference() -> None:
    """As the block uses it: compiled with dynamic shapes, a bf16 stream, the dropout mask
    from trainer.dropout's kernel and a drop-path scale; against the reference with the same
    mask and scale."""
    from trainer.dropout import dropout_mask

    torch.manual_seed(0)
    norm = _norm(768)
    f = torch.compile(residual_norm, dynamic=True)
    for B, T in ((64, 40), (30, 70)):
        x = torch.randn(B, T, 768, device=DEVICE).bfloat16().requires_grad_()
        branch = torch.randn(B, T, 768, device=DEVICE).bfloat16().requires_grad_()
        mask = dropout_mask([B, T, 768], 0.1, torch.tensor([7], device=DEVICE))
        scale = (torch.rand(B, device=DEVICE) > 0.1).float() / 0.9
        grad = torch.randn(B, T, 768, device=DEVICE).bfloat16()
        bias = (torch.randn(768, device=DEVICE) * 0.1).requires_grad_()
        check_against_reference(f, x, branch, mask, scale, 0.1, norm, bias, grad, bf16=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Inductor + Triton)")
def test_compiled_bf16_block_residual_addmm() -> None:
    """As training runs it: a post-norm block of the report's width compiled with dynamic
    shapes under bf16 autocast on a bf16 stream, with and without ``residual_addmm`` (no
    dropout: the two graphs draw nothing): the same output and gradients to bf16's precision,
    over two shapes."""
    from trainer.config import ModelConfig
    from trainer.model import Block, rotary_angles

    cfg = ModelConfig(d_model=768, n_heads=12, d_ff=3072, dropout=0.0, drop_path=0.0)
    results = []
    for addmm in (False, True):
        torch.manual_seed(0)
        block = Block(cfg, layer=0, drop_path_p=0.0).to(DEVICE).train()
        block.fused_norm, block.residual_addmm = True, addmm
        f = torch.compile(block, dynamic=True)
        for B, T in ((64, 40), (30, 70)):
            torch.manual_seed(B)
            x = torch.randn(B, T, 768, device=DEVICE).bfloat16().requires_grad_()
            prefix = torch.randint(1, T, (B,), device=DEVICE).int()  # the fused attention
            angles = rotary_angles(torch.arange(T, device=DEVICE).expand(B, T), 64, 10000.0)
            rope = (angles[:, :, None].cos(), angles[:, :, None].sin())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = f(x, rope, prefix)
            (y.float() * torch.randn(B, T, 768, device=DEVICE)).sum().backward()
            results.append([y.detach(), x.grad] + [p.grad for p in block.parameters()])
            block.zero_grad(set_to_none=True)
    half = len(results) // 2
    for ours, ref in zip(results[half:], results[:half], strict=True):
        for a, b in zip(ours, ref, strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2,
                                       atol=1e-2 * b.abs().max().item())
