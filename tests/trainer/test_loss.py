"""``trainer.loss``: the cross-entropy kernels (on CPU tensors in Triton's interpreter, see
tests/conftest.py; on a GPU also compiled, in bf16) against ``F.cross_entropy``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from trainer.loss import cross_entropy_sums  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference(logits: torch.Tensor, targets: torch.Tensor, smoothing: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    z, t = logits.float().flatten(0, -2), targets.flatten()
    return (F.cross_entropy(z, t, label_smoothing=smoothing, reduction="sum"),
            F.cross_entropy(z, t, reduction="sum"))


@pytest.mark.parametrize(("vocab", "smoothing"), [(37, 0.1), (5000, 0.1), (4096, 0.0)])
def test_sums_and_gradient_match_cross_entropy(vocab: int, smoothing: float) -> None:
    """Vocabularies under one block, over several (5000: 4096 + a partial block) and exactly
    one; ignored targets count nothing and get no gradient; the gradient of a weighted sum of
    both outputs (the NLL's too)."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, vocab, device=DEVICE) * 4).requires_grad_()
    targets = torch.randint(0, vocab, (2, 5), device=DEVICE)
    targets[0, :3] = -100
    loss, nll = cross_entropy_sums(logits, targets, smoothing)
    (0.7 * loss + 0.3 * nll).backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref_loss, ref_nll = reference(ref_logits, targets, smoothing)
    (0.7 * ref_loss + 0.3 * ref_nll).backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert torch.all(logits.grad[0, :3] == 0)


def test_only_the_loss_used() -> None:
    """The NLL output unused: its gradient is None in the backward."""
    logits = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 50, (6,), device=DEVICE)
    cross_entropy_sums(logits, targets, 0.1)[0].backward()
    ref = logits.detach().clone().requires_grad_()
    reference(ref, targets, 0.1)[0].backward()
    torch.testing.assert_close(logits.grad, ref.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Inductor + Triton)")
def test_compiled_bf16_matches_token_losses() -> None:
    from trainer.loop import token_losses

    torch.manual_seed(0)
    for n in (3000, 4100):  # two shapes, one graph (dynamic)
        logits = (torch.randn(n, 16000, device=DEVICE) * 3).bfloat16().requires_grad_()
        targets = torch.randint(0, 16000, (n,), device=DEVICE)
        targets[:7] = -100
        f = torch.compile(cross_entropy_sums, dynamic=True)
        loss, nll = f(logits, targets, 0.1)
        loss.backward()
        ref_logits = logits.detach().clone().requires_grad_()
        ref_loss, ref_nll = token_losses(ref_logits, targets, 0.1)
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(),
                                   rtol=2e-2, atol=1e-6)
