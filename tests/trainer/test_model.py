"""The decoder: parameter counts, masks, positions, drop-path, checkpointing, decoding."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ModelConfig
from trainer.decode import generate
from trainer.model import DecoderLM

torch.set_num_threads(1)

SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=64, dropout=0.0,
             drop_path=0.0)
VARIANTS = [
    dict(positional=pos, attention_mask=mask, norm=norm)
    for pos in ("rope", "sinusoidal") for mask in ("prefix", "causal") for norm in ("post", "pre")
]


def small(**kw: object) -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(ModelConfig(**{**SMALL, **kw}), vocab_size=50, pad_id=0).eval()


@pytest.mark.parametrize(("n_layers", "millions"), [(12, 85.05), (6, 42.53)])
def test_report_shape_parameter_counts(n_layers: int, millions: float) -> None:
    # Report 03 says 86 M (12 layers) and 43 M (6 layers): non-embedding parameters
    with torch.device("meta"):
        counts = DecoderLM(ModelConfig(n_layers=n_layers), 16000, 0).param_counts()
    assert counts["non_embedding"] / 1e6 == pytest.approx(millions, abs=0.01)
    assert counts["embedding"] == 16000 * 768  # tied: the LM head is the embedding
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]


def test_untied_head_counts_as_embedding() -> None:
    tied, untied = small(), small(tie_embeddings=False)
    assert untied.param_counts()["embedding"] == 2 * tied.param_counts()["embedding"]
    assert untied.param_counts()["non_embedding"] == tied.param_counts()["non_embedding"]


def test_prefix_mask_source_bidirectional_target_causal() -> None:
    model = small()
    tokens = torch.randint(3, 50, (1, 10))
    prefix = torch.tensor([4])  # positions 0-3: source and <sep>
    base = model(tokens, prefix)
    changed = tokens.clone()
    changed[0, 2] = (tokens[0, 2] + 1 - 3) % 47 + 3  # a later source token ...
    assert not torch.allclose(model(changed, prefix)[0, 0], base[0, 0])  # ... is seen by 0
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1 - 3) % 47 + 3  # a target token ...
    out = model(changed, prefix)
    torch.testing.assert_close(out[0, :7], base[0, :7])  # ... is not seen before it
    assert not torch.allclose(out[0, 7:], base[0, 7:])


def test_causal_mask_matches_prefix_mask_with_empty_prefix() -> None:
    causal, prefix = small(attention_mask="causal"), small(attention_mask="prefix")
    tokens = torch.randint(3, 50, (2, 9))
    lens = torch.tensor([0, 1])  # a prefix of one token is causal too
    torch.testing.assert_close(causal(tokens, lens), prefix(tokens, lens))


def test_drop_path_grows_linearly_to_the_top_block() -> None:
    model = DecoderLM(ModelConfig(**{**SMALL, "n_layers": 5, "drop_path": 0.2}), 50, 0)
    rates = [float(b.drop_path_p) for b in model.blocks]  # type: ignore[union-attr]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    tokens, lens = torch.randint(3, 50, (2, 12)), torch.tensor([5, 7])
    grads = []
    for ckpt in (False, True):
        model = small(grad_checkpointing=ckpt, dropout=0.1, drop_path=0.1).train()
        torch.manual_seed(1)
        model(tokens, lens).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v.values()))
@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_decoding_equals_recomputing(variant: dict[str, str], beam_size: int) -> None:
    model = small(**variant)
    sources = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 3]]
    args = dict(sep_id=1, eos_id=2, pad_id=0, max_new_tokens=15, beam_size=beam_size)
    cached = generate(model, sources, use_cache=True, static=False, **args)  # type: ignore[arg-type]
    # the fixed-shape steps a GPU replays as a CUDA graph (here without the graph)
    fixed = generate(model, sources, use_cache=True, static=True, **args)  # type: ignore[arg-type]
    recomputed = generate(model, sources, use_cache=False, **args)  # type: ignore[arg-type]
    alone = [generate(model, [s], **args)[0] for s in sources]  # type: ignore[arg-type]
    assert cached == fixed == recomputed == alone  # left padding changes nothing


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda v: "-".join(v.values()))
def test_greedy_decoding_matches_the_training_forward(variant: dict[str, str]) -> None:
    """Decoding's positions and masks are those of training: each generated token is the
    argmax of the teacher-forced forward pass over ``source <sep> generated``."""
    model = small(**variant)
    source = [5, 6, 7, 8]
    out = generate(model, [source, [9]], sep_id=1, eos_id=2, pad_id=0, max_new_tokens=10)[0]
    seq = torch.tensor([source + [1] + out])
    logits = model(seq, torch.tensor([len(source) + 1]))
    assert logits[0, len(source):-1].argmax(-1).tolist() == out


def test_generation_stops_at_max_len() -> None:
    model = small(max_len=12)
    out = generate(model, [[5, 6, 7, 8, 9]], sep_id=1, eos_id=2, pad_id=0, max_new_tokens=50)
    assert len(out[0]) <= 12 - 6


@pytest.mark.parametrize("beam_size", [1, 3])
def test_length_ratio_stops_each_row_at_its_own_limit(beam_size: int) -> None:
    """An untrained model never emits <eos>: each row stops at ratio * len(source) + 10 and
    the rows that fit keep the hypothesis they have without the limit."""
    model = small(max_len=64, tie_embeddings=False)
    with torch.no_grad():  # <eos> (id 2) can never win: every row runs to its limit
        model.lm_head.weight[2] = -100 * model.lm_head.weight[3:].abs().max()  # type: ignore
    sources = [[5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    args = dict(sep_id=1, eos_id=2, pad_id=0, max_new_tokens=30, beam_size=beam_size)
    free = generate(model, sources, **args)  # type: ignore[arg-type]
    limited = generate(model, sources, max_new_ratio=1.0, **args)  # type: ignore[arg-type]
    assert [len(r) for r in free] == [30, 30]
    assert [len(r) for r in limited] == [2 + 10, 14 + 10]
    if beam_size == 1:
        assert [r[: len(x)] for r, x in zip(free, limited, strict=True)] == limited


def test_select_gives_the_logits_of_those_positions() -> None:
    model = small()
    tokens, lens = torch.randint(3, 50, (2, 9)), torch.tensor([3, 5])
    select = torch.tensor([2, 3, 8, 13, 17])  # flat indices into B*T
    full = model(tokens, lens).flatten(0, 1)
    torch.testing.assert_close(model(tokens, lens, select), full[select])


def test_rope_pairs_half_and_interleaved_are_one_model_up_to_a_permutation() -> None:
    """Rotating dims (i, i + hs/2) is rotating (2i, 2i + 1) after reordering the q/k features:
    the same logits once the weights are permuted (``model.rope_pairs`` picks a layout, not
    a model)."""
    inter = small(rope_pairs="interleaved")
    half = small(rope_pairs="half")
    hs, C = SMALL["d_model"] // SMALL["n_heads"], SMALL["d_model"]
    perm = torch.cat((torch.arange(0, hs, 2), torch.arange(1, hs, 2)))  # half dim j <- this
    rows = torch.cat([h * hs + perm for h in range(SMALL["n_heads"])])
    rows = torch.cat((rows, C + rows, torch.arange(2 * C, 3 * C)))  # q, k permuted; v as is
    state = inter.state_dict()
    for b in range(SMALL["n_layers"]):  # peaky attention, so positions matter
        state[f"blocks.{b}.attn.qkv.weight"] *= 30
    inter.load_state_dict(state)
    half.load_state_dict(state)  # not permuted: another model
    tokens = torch.randint(3, 50, (2, 9))
    prefix = torch.tensor([3, 5])
    with torch.no_grad():
        assert (half(tokens, prefix) - inter(tokens, prefix)).abs().max() > 1e-2
        for b in range(SMALL["n_layers"]):
            for name in ("weight", "bias"):
                key = f"blocks.{b}.attn.qkv.{name}"
                state[key] = state[key][rows]
        half.load_state_dict(state)
        torch.testing.assert_close(half(tokens, prefix), inter(tokens, prefix))


def test_residual_stream_is_bf16_under_bf16_autocast_unless_fp32_residual() -> None:
    """Post-norm blocks pass the residual stream on in their input's dtype: bf16 under bf16
    autocast (``bf16_residual``, the default), float32 with ``train.fp32_residual``; both
    give about the same logits."""
    m = small().train()  # (eval calls block.forward: no hooks; SMALL has no dropout)
    dtypes: list[torch.dtype] = []
    for block in m.blocks:
        block.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    tokens = torch.randint(1, 50, (2, 9))
    prefix = torch.tensor([4, 6])
    logits = {}
    for bf16 in (True, False):
        m.bf16_residual = bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits[bf16] = m(tokens, prefix).float()
    assert dtypes == [torch.bfloat16] * 2 + [torch.float32] * 2
    torch.testing.assert_close(logits[True], logits[False], atol=0.05, rtol=0.05)
    dtypes.clear()
    m(tokens, prefix)  # no autocast: float32 throughout
    assert dtypes == [torch.float32] * 2
