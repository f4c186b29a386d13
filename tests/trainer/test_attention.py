"""The fused attention kernel (``trainer.attention``) against SDPA on the same inputs: on CPU
tensors in Triton's interpreter (see tests/conftest.py), on a GPU where there is one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tests.trainer.synthetic import tiny_config, write_task  # noqa: E402
from trainer import attention, fit  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.model import DecoderLM, SelfAttention, attention_mask, rotary_angles  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(B: int, T: int, cfg: ModelConfig, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, cfg.d_model, generator=gen).to(DEVICE)
    prefix = torch.randint(0, T, (B,), generator=gen).to(DEVICE)
    prefix[0] = 0  # a causal row
    angles = rotary_angles(torch.arange(T, device=DEVICE).expand(B, T),
                           cfg.d_model // cfg.n_heads, cfg.rope_base)[:, :, None]
    return x, prefix, (angles.cos(), angles.sin())


SMALL = {f"{k}_{mn}": 16 for k in ("fwd", "dq", "dkv") for mn in "mn"}
MIXED = {"fwd_m": 32, "fwd_n": 16, "dq_m": 16, "dq_n": 32, "dkv_m": 32, "dkv_n": 16,
         "fwd_maxnreg": 128, "dq_maxnreg": 128, "dkv_maxnreg": 168}  # caps: on a GPU


def _use_tiles(monkeypatch: pytest.MonkeyPatch, tiles: dict) -> None:
    """``tiles`` for rows of 33-64 tokens; with blocks given, the two-kernel backward."""
    monkeypatch.setattr(attention, "TILES", {64: tiles})
    if tiles:
        monkeypatch.setattr(attention, "ONE_TILE_MAX_T", 0)


def _assert_kernel_matches_sdpa(attn: SelfAttention, x: torch.Tensor, prefix: torch.Tensor,
                                angles: tuple | None) -> None:
    """The output and every gradient (input, parameters) of ``attn`` on SDPA with a
    (B, 1, T, T) mask and on the kernel with the prefix ends (B,) agree."""
    T = x.size(1)
    mask = attention_mask(torch.zeros_like(prefix), prefix, T, T)
    outs, grads = [], []
    for m in (mask, prefix):
        xi = x.clone().requires_grad_()
        y = attn(xi, angles, m, None)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(torch.cat([xi.grad.flatten()]  # type: ignore[union-attr]
                               + [p.grad.flatten() for p in attn.parameters()]))
        attn.zero_grad()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tiles", [{}, SMALL, MIXED])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("T", [7, 33])
def test_matches_sdpa_with_the_prefix_mask(rope: bool, T: int, tiles: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # T=33: the forward in one block of 64 and the one-kernel backward (queries 16 at a
    # time), or every kernel in 2-3 query and key blocks: the online softmax, the skipped
    # blocks past the prefix and the diagonal, a last block mostly past T
    _use_tiles(monkeypatch, tiles)
    cfg = ModelConfig(d_model=64, n_heads=2, dropout=0.0)
    torch.manual_seed(0)
    attn = SelfAttention(cfg, layer=0).to(DEVICE)
    x, prefix, angles = _inputs(3, T, cfg)
    _assert_kernel_matches_sdpa(attn, x, prefix, angles if rope else None)


@pytest.mark.parametrize("T", [70, 96, 100])
def test_the_one_kernel_backward_with_a_tail_tile_matches_sdpa(T: int) -> None:
    # 70 and 96: keys in a 64-key tile and a 16- or 32-key tail; 100: one tile of 128
    cfg = ModelConfig(d_model=64, n_heads=2, dropout=0.0)
    torch.manual_seed(0)
    attn = SelfAttention(cfg, layer=0).to(DEVICE)
    x, prefix, angles = _inputs(2, T, cfg)
    prefix[1] = 66  # a prefix that reaches into the tail
    _assert_kernel_matches_sdpa(attn, x, prefix, angles)


@pytest.mark.parametrize(("tiles", "T"), [({}, 40), (MIXED, 40), ({}, 80)])
def test_dropout_keeps_the_expected_share_and_its_gradient_is_exact(
        tiles: dict, T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # the forward, the one-kernel backward (at T = 80 with a tail tile of keys) and (MIXED)
    # the two backward kernels tile differently; the mask they regenerate must be the same
    # (else the gradient is not the output's)
    _use_tiles(monkeypatch, tiles)
    B, nh, hs = 4, 2, 32
    qkv = torch.zeros(B, T, 3 * nh * hs, device=DEVICE)
    qkv[..., 2 * nh * hs:] = 1.0  # q = k = 0: uniform attention; v = 1: out = kept share
    prefix = torch.full((B,), T, device=DEVICE)  # every key visible
    seed = torch.tensor([7], device=DEVICE)
    out = attention.fused_attention(qkv, None, prefix, nh, 0.25, seed)
    kept = (out * 0.75).mean().item()  # mean of kept/T over 4*2*T rows of T keys
    assert abs(kept - 0.75) < 0.02
    assert torch.equal(out, attention.fused_attention(qkv, None, prefix, nh, 0.25, seed))
    assert not torch.equal(out, attention.fused_attention(
        qkv, None, prefix, nh, 0.25, torch.tensor([8], device=DEVICE)))

    # with the seed fixed the output is a smooth function of qkv: finite differences
    cfg = ModelConfig(d_model=nh * hs, n_heads=nh)
    _, prefix, rope = _inputs(B, T, cfg)
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3 * nh * hs, generator=gen, dtype=torch.float64).float().to(DEVICE)
    direction = torch.randn(qkv.shape, generator=gen).to(DEVICE)
    weight = torch.randn(B, T, nh * hs, generator=gen).to(DEVICE)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (attention.fused_attention(x, rope, prefix, nh, 0.3, seed) * weight).sum()

    (grad,) = torch.autograd.grad(f(qkv.requires_grad_()), qkv)
    with torch.no_grad():
        eps = 1e-2
        numeric = (f(qkv + eps * direction) - f(qkv - eps * direction)) / (2 * eps)
    assert math.isclose(numeric.item(), (grad * direction).sum().item(), rel_tol=2e-3)


def test_model_with_the_kernel_matches_sdpa_and_compiles() -> None:
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128, dropout=0.0,
                      drop_path=0.0, max_len=256)
    torch.manual_seed(0)
    model = DecoderLM(cfg, vocab_size=50, pad_id=0).to(DEVICE)
    for T in (130, 12):  # 130: three key blocks of 64
        tokens = torch.randint(1, 50, (2, T), device=DEVICE)
        prefix = torch.tensor([3, T // 2], device=DEVICE)
        reference = model(tokens, prefix)
        model.fused_attention = True
        torch.testing.assert_close(model(tokens, prefix), reference, rtol=1e-4, atol=1e-4)
        model.fused_attention = False
    # the kernel in a compiled block (the trainer's regional compile, dynamic shapes)
    model.fused_attention = True
    model.train()
    eager = model(tokens, prefix)
    for block in model.blocks:
        block.compile(dynamic=True)
    torch.testing.assert_close(model(tokens, prefix), eager, rtol=1e-4, atol=1e-4)
    tokens = torch.randint(1, 50, (3, 17), device=DEVICE)  # another shape, no recompile
    model(tokens, torch.tensor([2, 5, 9], device=DEVICE)).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_cuda_with_the_kernel(tmp_path: Path) -> None:
    task = write_task(tmp_path / "task.tsv")
    cfg = tiny_config(task, tmp_path / "run", **{"model.d_model": 64, "model.n_heads": 2,
                                                  "train.compile": True})
    result = fit(cfg)
    assert math.isfinite(result.val_loss) and result.steps == 12


def test_auto_takes_sdpa_only_for_compiled_small_micro_batches(tmp_path: Path) -> None:
    from trainer.config import FUSED_COMPILED_MIN_TOKENS
    from trainer.loop import uses_fused_attention

    task = write_task(tmp_path / "task.tsv")

    def fused(**overrides: object) -> bool:
        return uses_fused_attention(tiny_config(task, tmp_path / "run", **overrides))

    big = FUSED_COMPILED_MIN_TOKENS
    assert fused() and fused(**{"train.tokens_per_batch": 16384})  # eager: always
    assert not fused(**{"train.compile": True, "train.tokens_per_batch": big // 4})
    assert fused(**{"train.compile": True, "train.tokens_per_batch": big})
    assert fused(**{"train.compile": True, "train.attention": "fused"})
    assert not fused(**{"train.attention": "sdpa"})


def _padded_batch(B: int, T: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Right-padded rows of T or fewer tokens: tokens (B, T), prefix ends (B,), the target
    positions in the flattened B*T, the real positions (``packed``) and the target positions
    among those."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    lengths[0] = T
    real = torch.arange(T) < lengths[:, None]
    tokens = torch.randint(1, 50, (B, T), generator=gen) * real
    prefix = (lengths * torch.rand(B, generator=gen)).long().clamp(min=1)
    target = real & (torch.arange(T) >= prefix[:, None] - 1)
    select = target.flatten().nonzero().squeeze(1)
    packed = real.flatten().nonzero().squeeze(1)
    packed_select = target.flatten()[packed].nonzero().squeeze(1)
    return tuple(t.to(DEVICE) for t in (tokens, prefix, select, packed, packed_select))


@pytest.mark.parametrize(("fused_norm", "widths", "shape"), [
    (False, (70, 21), {}), (True, (21,), {}),
    (False, (21,), {"positional": "sinusoidal", "attention_mask": "causal", "norm": "pre"})])
def test_packed_rows_match_padded_rows(fused_norm: bool, widths: tuple[int, ...],
                                       shape: dict) -> None:
    # the blocks on the real tokens alone (rows back to back) give the padded rows' logits
    # and gradients; stochastic depth draws per row either way (dropout would draw per
    # element of different shapes, so it is off); T = 70: the backward's tail tile of keys
    # (the norm kernels, slow in the interpreter, do not depend on T)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128, dropout=0.0,
                      drop_path=0.5, max_len=256, **shape)
    torch.manual_seed(0)
    model = DecoderLM(cfg, vocab_size=50, pad_id=0).to(DEVICE).train()
    model.fused_attention = True
    for block in model.blocks:
        block.fused_norm = block.residual_addmm = fused_norm
    for T in widths:
        tokens, prefix, select, packed, packed_select = _padded_batch(3, T, seed=T)
        weight = torch.randn(len(select), 50, device=DEVICE)
        results = []
        for extra in ((select,), (packed_select, packed)):
            torch.manual_seed(1)  # the same stochastic-depth draws
            logits = model(tokens, prefix, *extra)
            (logits * weight).sum().backward()
            results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
        for got, want in zip(results[1][1], results[0][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.manual_seed(2)  # other draws drop other rows' branches: the draws matter
        assert not torch.allclose(model(tokens, prefix, packed_select, packed), results[1][0])


def test_packed_rows_compile_without_recompiling() -> None:
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128, dropout=0.1,
                      drop_path=0.1, max_len=256)
    torch.manual_seed(0)
    model = DecoderLM(cfg, vocab_size=50, pad_id=0).to(DEVICE).train()
    model.fused_attention = True
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile(dynamic=True)
    from torch._dynamo.utils import counters
    counters.clear()
    for B, T in ((3, 40), (4, 23), (2, 70)):
        tokens, prefix, _, packed, packed_select = _padded_batch(B, T, seed=T)
        logits = model(tokens, prefix, packed_select, packed)
        assert logits.shape == (len(packed_select), 50) and torch.isfinite(logits).all()
        logits.square().mean().backward()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_packed_rows_need_the_fused_kernel() -> None:
    cfg = ModelConfig(n_layers=1, d_model=64, n_heads=2, d_ff=128)
    model = DecoderLM(cfg, vocab_size=50, pad_id=0).to(DEVICE)
    tokens, prefix, _, packed, packed_select = _padded_batch(2, 9)
    with pytest.raises(ValueError, match="fused attention"):
        model(tokens, prefix, packed_select, packed)
