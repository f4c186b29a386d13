"""``trainer.dropout``: the mask kernel (on CPU tensors in Triton's interpreter, see
tests/conftest.py) and, on a GPU, dropout inside a compiled graph."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from trainer.dropout import dropout, dropout_mask  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keeps_the_expected_share_and_is_a_function_of_the_seed(p: float) -> None:
    seed = torch.tensor([1234], device=DEVICE)
    shape = [3, 1001, 7]  # not a multiple of the kernel's block
    mask = dropout_mask(shape, p, seed)
    assert mask.shape == torch.Size(shape) and mask.dtype == torch.bool
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, kept
    assert torch.equal(mask, dropout_mask(shape, p, seed))
    other = dropout_mask(shape, p, torch.tensor([1235], device=DEVICE))
    differ = (mask != other).float().mean().item()  # independent masks: 2 p (1 - p)
    assert abs(differ - 2 * p * (1 - p)) < 0.02, differ
    flat = mask.flatten().float()  # neighbours (the same 32-bit draw) are independent
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.03


def test_outside_a_compiled_gpu_graph_it_is_f_dropout() -> None:
    x = torch.ones(1000, device=DEVICE)
    assert dropout(x, 0.1, training=False) is x
    torch.manual_seed(0)
    a = dropout(x, 0.1, training=True)
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.functional.dropout(x, 0.1, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Inductor + Triton)")
def test_compiled_dropout_drops_the_expected_share_and_its_gradient_matches() -> None:
    f = torch.compile(lambda x: dropout(x * 2.0, 0.1, True), dynamic=True)
    for n in (10_000, 30_001):  # two shapes, one graph (dynamic)
        x = torch.full((n,), 0.5, device=DEVICE, requires_grad=True)
        y = f(x)
        kept = y != 0
        assert abs(kept.float().mean().item() - 0.9) < 0.02
        torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
        y.sum().backward()  # d(sum y)/dx = 2 / 0.9 where kept, else 0
        torch.testing.assert_close(x.grad, kept.float() * (2 / 0.9))
        assert not torch.equal(kept, f(x) != 0)  # a new mask every call
