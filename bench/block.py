"""P1 drill-down: one transformer block of the report's shape, forward + backward, compiled as
the trainer compiles it (``Block.compile(dynamic=True)``), under variants of its parts.

Where ``bench.throughput`` says how fast the whole step is, this says which part of the block
costs what: the same block and inputs (bf16 autocast, prefix mask, dropout 0.1, drop-path) timed
as it is (``current``, the reference of the run) and with one part changed or removed. Removed
parts (``no_*``) are lower bounds, not candidates: they show what a part costs at most.
Each variant is compiled afresh (no graph cache) and run at each of ``--lengths`` with
``--tokens`` per micro-batch: the first call at a new shape (what cuDNN attention spends
planning one), the median of ``--iters`` synchronised fwd+bwd, and a kernel profile
(``bench.common.profile_ops``) at the first length. ``a+b`` combines variants.

Run on a GPU: ``python -m bench.block`` (report shape, 64k tokens, the Bible's lengths).
``--tiny`` on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench import common

log = logging.getLogger("bench.block")


def rotary_swap(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: str = ""
                ) -> torch.Tensor:
    """The interleaved rotation without unbind/stack: ``x * cos' + swap(x) * sin'`` with the
    pairs swapped by a flip and the angles widened (``pairs`` ignored)."""
    cos2 = cos.repeat_interleave(2, -1)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x.float() * cos2 + swapped.float() * sin2).type_as(x)


def inductor_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """The residual branches' dropout as Inductor lowers ``F.dropout`` (one Philox call per
    element), not with ``trainer.dropout``'s mask kernel."""
    return torch.nn.functional.dropout(x, p, training)


def no_dropout_fn(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return x


def no_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: str = ""
              ) -> torch.Tensor:
    return x


# name -> (patches of trainer.model, model config overrides, inductor options)
VARIANTS: dict[str, tuple[dict[str, Callable[..., Any]], dict[str, Any], dict[str, Any]]] = {
    "current": ({}, {}, {}),
    "sdpa": ({}, {}, {"sdpa": True}),  # SDPA with a (B, 1, T, T) mask, not the fused kernel
    "cudnn": ({}, {}, {"cudnn": True, "sdpa": True}),
    "rope_interleaved": ({}, {"rope_pairs": "interleaved"}, {}),
    "rope_swap": ({"apply_rotary": rotary_swap}, {}, {}),
    "coordinate_descent": ({}, {}, {"coordinate_descent_tuning": True}),
    "cpp_wrapper": ({}, {}, {"cpp_wrapper": True}),
    # Inductor's Triton matmul templates against cuBLAS, epilogues (bias, GELU) fused into the
    # template where that benchmarks faster (benchmark_epilogue_fusion)
    "max_autotune": ({}, {}, {"max_autotune": True}),
    "max_autotune_gemm": ({}, {}, {"max_autotune_gemm": True}),
    # the block's input (and so its residual stream and gradient) in float32, as
    # train.fp32_residual keeps it; the default (current) is bf16, as under bf16 autocast
    "fp32_residual": ({}, {}, {"fp32_residual": True}),
    # the trainer's kernel options against their defaults (current follows the defaults):
    # post-norm's dropout + drop-path + residual + LayerNorm left to Inductor, the residual's
    # gradient added by a separate kernel instead of in the branches' first matmuls
    # (trainer.norm.residual_linear), the MLP's bias + GELU left to Inductor
    "unfused_norm": ({}, {}, {"fused_norm": False}),
    "no_residual_addmm": ({}, {}, {"residual_addmm": False}),
    "unfused_mlp": ({}, {}, {"fused_mlp": False}),
    "inductor_dropout": ({"dropout": inductor_dropout}, {}, {}),
    "no_residual_dropout": ({"dropout": no_dropout_fn}, {}, {}),
    "no_rope": ({"apply_rotary": no_rotary}, {}, {}),
    "no_dropout": ({}, {"dropout": 0.0, "drop_path": 0.0}, {}),
}


@contextlib.contextmanager
def patched(patches: dict[str, Callable[..., Any]]) -> Iterator[None]:
    import trainer.model as model

    def owner(name: str) -> tuple[Any, str]:  # "fn" or "Class.method" of trainer.model
        *path, attr = name.split(".")
        obj: Any = model
        for part in path:
            obj = getattr(obj, part)
        return obj, attr

    saved = {name: getattr(*owner(name)) for name in patches}
    for name, fn in patches.items():
        fn.__wrapped__ = saved[name]  # type: ignore[attr-defined]
        setattr(*owner(name), fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(*owner(name), fn)


def run_variant(name: str, cfg: Any, tokens: int, lengths: list[int], iters: int,
                device: torch.device, backend: str = "inductor") -> dict[str, Any]:
    """Compile a fresh block for variant ``name`` (``a+b`` combines variants), warm it up at
    the first length, then per length: the first call (a new shape: cuDNN plans one) and the
    median of ``iters`` more. Tokens/s over all lengths, from the medians."""
    import dataclasses

    from trainer import attention, gelu
    from trainer import norm as norm_kernels
    from trainer.config import TrainingConfig
    from trainer.model import Block, attention_mask, rotary_angles

    patches: dict[str, Callable[..., Any]] = {}
    overrides: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for part in name.split("+"):
        p, o, i = VARIANTS[part]
        patches, overrides, options = {**patches, **p}, {**overrides, **o}, {**options, **i}
    cudnn = bool(options.pop("cudnn", False))
    sdpa = bool(options.pop("sdpa", False))
    stream = torch.float32 if options.pop("fp32_residual", False) else torch.bfloat16
    defaults = TrainingConfig()
    fused_mlp = bool(options.pop("fused_mlp", defaults.fused_mlp)) and gelu.available(device)
    fused_norm = (bool(options.pop("fused_norm", defaults.fused_norm))
                  and norm_kernels.available(device))
    residual_addmm = bool(options.pop("residual_addmm", defaults.residual_addmm))
    mcfg = dataclasses.replace(cfg, **overrides)
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block(mcfg, layer=mcfg.n_layers - 1, drop_path_p=mcfg.drop_path).to(device).train()
    # as trainer.Run sets them
    block.mlp.fused, block.fused_norm, block.residual_addmm = fused_mlp, fused_norm, residual_addmm
    if backend == "inductor":
        block.compile(dynamic=True, options=options)
    else:
        block.compile(dynamic=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def inputs(length: int) -> tuple[Any, ...]:
        batch = tokens // length
        x = torch.randn(batch, length, mcfg.d_model, generator=gen).to(device, stream)
        grad = torch.randn(batch, length, mcfg.d_model, generator=gen).to(device, stream)
        prefix = torch.randint(length // 4, length * 3 // 4, (batch,), generator=gen).to(device)
        mask = attention_mask(torch.zeros_like(prefix), prefix, length, length)
        hs = mcfg.d_model // mcfg.n_heads
        if not sdpa and attention.available(device, hs):
            mask = prefix.to(torch.int32)  # as DecoderLM.forward does: for the fused kernel
        positions = torch.arange(length, device=device).expand(batch, length)
        angles = rotary_angles(positions, mcfg.d_model // mcfg.n_heads,
                               mcfg.rope_base)[:, :, None]
        return x.requires_grad_(), grad, (angles.cos(), angles.sin()), mask

    def step(x: torch.Tensor, grad: torch.Tensor, rope: Any, mask: torch.Tensor) -> None:
        with amp:
            out = block(x, rope, mask)
        out.backward(grad)

    def timed(args: tuple[Any, ...]) -> float:
        common.synchronize()
        t0 = time.perf_counter()
        step(*args)
        common.synchronize()
        return time.perf_counter() - t0

    saved_cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        with patched(patches):
            first = inputs(lengths[0])
            t0 = time.perf_counter()
            for _ in range(3):
                step(*first)
            common.synchronize()
            warmup_s = time.perf_counter() - t0
            per_length = {}
            for length in lengths:
                args = first if length == lengths[0] else inputs(length)
                new_shape = timed(args)
                steady = common.median([timed(args) for _ in range(iters)])
                per_length[length] = {"batch": tokens // length, "ms": round(steady * 1e3, 3),
                                      "first_call_extra_ms": round((new_shape - steady) * 1e3, 1)}
            profile = common.profile_ops(lambda: step(*first), top=12)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(saved_cudnn)
    total_tokens = sum(v["batch"] * n for n, v in per_length.items())
    total_s = sum(v["ms"] for v in per_length.values()) / 1e3
    log.info("%-24s %8.0f tokens/s fwd+bwd (warm-up %.1f s) %s", name, total_tokens / total_s,
             warmup_s, {n: v["ms"] for n, v in per_length.items()})
    return {"tokens_per_s": round(total_tokens / total_s), "warmup_s": round(warmup_s, 1),
            "lengths": per_length, "profile_at_first_length": profile}


def main(argv: list[str] | None = None) -> int:
    p = common.parser("block", __doc__ or "")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=65536, help="tokens per micro-batch")
    p.add_argument("--lengths", default="66,40,100,130",
                   help="sequence lengths, each at --tokens (the Bible's mean is ~66)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend (default inductor, as the trainer; the CPU "
                   "smoke test uses aot_eager: the traced graphs without Inductor's C++ "
                   "compilation; Inductor options of variants then do not apply)")
    args = p.parse_args(argv)
    common.setup_logging()
    from trainer.config import ModelConfig

    # every variant compiled afresh: a cached graph would carry another variant's choices
    # (the SDPA backend is chosen at compile time, and is not part of the cache key)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    gpu = common.on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    cfg = ModelConfig(n_layers=12, d_model=768, n_heads=12, d_ff=3072, dropout=0.1,
                      drop_path=0.1, norm="post", positional="rope", attention_mask="prefix",
                      rope_pairs="half")
    if args.tiny:
        cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=128, dropout=0.1,
                          drop_path=0.1, norm="post", positional="rope",
                          attention_mask="prefix")
        args.tokens, args.lengths, args.iters = 512, "32,24", 2
    names = [v for v in args.variants.split(",") if v]
    lengths = [int(n) for n in args.lengths.split(",") if n]
    unknown = [v for v in names if any(part not in VARIANTS for part in v.split("+"))]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    if "current" not in names:
        names.insert(0, "current")
    report = common.Report("block", args, {
        "model": vars(cfg), "tokens": args.tokens, "lengths": lengths,
        "iters": args.iters, "variants": names, "backend": args.backend,
        "reference": "current (the trainer's block as it is), same run"})
    results: dict[str, dict[str, Any]] = {}
    report["results"] = results
    for name in names:
        results[name] = run_variant(name, cfg, args.tokens, lengths, args.iters, device,
                                    args.backend)
        results[name]["speedup_vs_current"] = round(results[name]["tokens_per_s"]
                                                    / results["current"]["tokens_per_s"], 3)
        report.save()
    report.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
