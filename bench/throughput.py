"""P1: training throughput of the report's decoder against HF GPTNeoX, in the same run.

*Ours* is one optimiser step of the trainer's own code (``trainer.Run.train_step``):
Report 03's recipe from ``configs/train.yaml`` (12L/768/3072/12h, RoPE, post-norm, dropout
0.1, drop-path 0.1, prefix-LM mask, label smoothing 0.1, gradient accumulation, bf16 autocast,
fused AdamW with layer-wise LR decay, gradient clipping, EMA update, one host sync), eager and
with ``train.compile``. *The reference* is HF ``GPTNeoXForCausalLM`` of the same shape (RoPE on
every head dimension, GELU FFN, ``use_parallel_residual=False``, tied embeddings, dropout 0.1,
SDPA attention, causal mask) in a plain PyTorch step with the same batches, bf16 autocast,
label-smoothed cross-entropy, fused AdamW, clipping; eager and ``torch.compile``'d.

Batches are real token-budget batches of the corpus (``--data-dir``: the exported Bible;
``--tiny``: the synthetic task), the same ones for every variant. Every optimiser step sees
``--step-tokens`` tokens (131072 = 16k x 8, the report's step), so a 64k micro-batch
accumulates 2. Timing: warm-up steps (compilation included) are timed separately and
excluded; one step is timed alone between two ``torch.cuda.synchronize()``
(``step_s_synchronized``; it sizes the rest to the budget), then the timed steps run back to
back as ``fit`` runs them (ours: the host waits for each step's loss one step late) between
two synchronisations.

Model FLOPs per micro-batch of shape (B, T) holding ``n`` real (non-padding) tokens::

    flops = n * (6 * (N_nonembed + V * d) + 12 * L * T * d)

6 per parameter and token for forward + backward, with the tied LM head's matmul (V x d) as a
parameter (the input lookup costs nothing); 12·L·T·d is attention's QK^T and AV over the
padded length T. MFU = flops / seconds / 989e12 (dense bf16 of an H100/H200 SXM).
``mfu_6n_nonembed`` leaves the LM head out (6·N_nonembed + 12·L·T·d), as PaLM writes it;
``mfu_head_on_targets`` counts the head only at positions with a target (the target tokens
and <eos>, ~53 % of the Bible's), the only ones where the trainer runs it: the FLOPs ours
actually does (the head on every position is 5.9 % of the headline count there).
Tokens per second count real tokens, as the trainer's ``tokens_per_s`` does.

Dynamo compiles with dynamic shapes from the first call
(``torch._dynamo.config.assume_static_by_default = False``) for both models: real batches
change shape every step, so without it the first steps recompile two or three times.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from bench import common
from trainer.config import parse_override
from trainer.errors import ConfigError

log = logging.getLogger("bench.throughput")

TARGETS = {"vs_hf_eager": 2.0, "vs_hf_compiled": 1.3, "mfu": 0.40}


@dataclass(frozen=True)
class Variant:
    model: str  # "ours" or "hf"
    compiled: bool
    micro_tokens: int
    mask: str = "prefix"  # ours only: the recipe's prefix-LM mask, or plain causal
    attention: str = "fused"  # ours only: train.attention (the fused kernel or SDPA)
    overrides: tuple[tuple[str, Any], ...] = ()  # ours only: config keys set (--also)

    @property
    def name(self) -> str:
        mode = "compiled" if self.compiled else "eager"
        extra = "_causal" if self.model == "ours" and self.mask == "causal" else ""
        extra += "_sdpa" if self.model == "ours" and self.attention == "sdpa" else ""
        also = "".join(f"+{k}={v}" for k, v in self.overrides)
        return f"{self.model}{extra}_{mode}_{size_label(self.micro_tokens)}{also}"


def plan(sizes: list[int], compile_sizes: list[int], with_hf: bool, causal: bool,
         sdpa: bool = False, also: list[dict[str, Any]] | None = None) -> list[Variant]:
    """Variants in the order they run: what the targets need first, so a tight budget drops
    the extras (larger micro-batches, compiled extras, the causal-mask diagnostic) first."""
    models = ["ours", "hf"] if with_hf else ["ours"]
    first, rest = sizes[0], sizes[1:]
    order = [Variant(m, False, first) for m in models]
    if first in compile_sizes:
        order += [Variant(m, True, first) for m in models]
        order += [Variant("ours", True, first, overrides=tuple(o.items())) for o in also or []]
    for size in sorted(rest, reverse=True):
        order += [Variant(m, False, size) for m in models]
        if size in compile_sizes:
            order += [Variant(m, True, size) for m in models]
    if causal:  # what the prefix-LM mask costs, in the mode that matters (compiled on a GPU)
        order.append(Variant("ours", first in compile_sizes, first, mask="causal"))
    if sdpa:  # what trainer.attention's kernel gains: the same step on SDPA, largest first
        order += [Variant("ours", size in compile_sizes, size, attention="sdpa")
                  for size in sorted(sizes, reverse=True)]
    return order


def size_label(tokens: int) -> str:
    """16384 -> ``16k``; sizes that are not a multiple of 1024 stay as they are."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


# ---------------------------------------------------------------------------------------------
# batches and FLOPs


def step_batches(data: Any, micro_tokens: int, accum: int, n_steps: int, seed: int
                 ) -> list[list[Any]]:
    """``n_steps`` lists of ``accum`` consecutive training batches (epochs 0, 1, ... in order)."""
    flat: list[Any] = []
    epoch = 0
    while len(flat) < n_steps * accum:
        flat += list(data.batches(data.train, micro_tokens, shuffle=True, seed=seed, epoch=epoch))
        epoch += 1
    return [flat[i * accum:(i + 1) * accum] for i in range(n_steps)]


def real_tokens(batch: Any) -> int:
    """Source, <sep>, target and <eos> tokens: the trainer's count (padding excluded)."""
    return int(batch.prefix_lens.sum()) + int(batch.n_target_tokens)


def model_flops(batch: Any, shape: dict[str, int], with_head: bool = True,
                head_on_targets: bool = False) -> float:
    """Forward + backward FLOPs of one micro-batch (the module docstring's formula); with
    ``head_on_targets``, the LM head's only at the positions with a target, where the trainer
    runs it (ours; HF runs it everywhere)."""
    n = real_tokens(batch)
    T = batch.tokens.size(1)
    head = 6.0 * shape["vocab"] * shape["d_model"]
    flops = n * (6.0 * shape["non_embedding"] + 12.0 * shape["n_layers"] * T * shape["d_model"])
    if with_head:
        flops += head * (int(batch.n_target_tokens) if head_on_targets else n)
    return flops


# ---------------------------------------------------------------------------------------------
# one measurement


def measure(step: Callable[[list[Any]], None], warmup: list[list[Any]], timed: list[list[Any]],
            shape: dict[str, int], deadline: common.Deadline,
            flush: Callable[[], None] = lambda: None, profile: int = 0) -> dict[str, Any]:
    """Run the warm-up steps, time one step alone (between two synchronisations), then as many
    of the rest as the deadline allows back to back, as a training loop runs them: one
    synchronisation before and one after, ``flush`` (the host's wait for a lagging step)
    inside the timed span. ``profile`` > 0: two more steps under torch.profiler
    (``common.profile_ops``: device busy fraction, the top ``profile`` kernels)."""
    def span(steps: list[list[Any]]) -> float:  # seconds from idle device to idle device
        common.synchronize()
        t0 = time.perf_counter()
        for batches in steps:
            step(batches)
        flush()
        common.synchronize()
        return time.perf_counter() - t0

    graphs0 = _graphs()
    warmup_s = span(warmup)
    graphs1 = _graphs()
    single_s = span(timed[:1])
    fits = int(max(0.0, deadline.left() - 5.0) / max(single_s, 1e-9) / 1.5)
    run = timed[1:1 + max(1, fits)]
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        # the host's garbage-collection pauses in the timed steps (``gc_in_timed_steps``: a
        # full collection after compilation takes tens of ms, a stall a host-bound step shows)
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(on_gc)
    try:
        total = span(run)
    finally:
        gc.callbacks.remove(on_gc)
    tokens = padded = 0
    flops = flops_nonembed = flops_targets = 0.0
    for batches in run:
        tokens += sum(real_tokens(b) for b in batches)
        padded += sum(int(b.n_tokens) for b in batches)
        flops += sum(model_flops(b, shape) for b in batches)
        flops_nonembed += sum(model_flops(b, shape, with_head=False) for b in batches)
        flops_targets += sum(model_flops(b, shape, head_on_targets=True) for b in batches)
    out: dict[str, Any] = {
        "warmup_steps": len(warmup),
        "warmup_s": round(warmup_s, 3),
        "graphs_compiled_in_warmup": graphs1 - graphs0,
        "graphs_compiled_in_timed_steps": _graphs() - graphs1,  # > 0: a recompile was timed
        "graph_breaks": sum(counters["graph_break"].values()),
        "timed_steps": len(run),
        "step_s_mean": round(total / len(run), 5),
        "step_s_synchronized": round(single_s, 5),  # one step alone, host waiting for it
        "gc_in_timed_steps": {"collections": len(pauses),
                              "gen2": sum(1 for g, _ in pauses if g == 2),
                              "ms": round(1e3 * sum(t for _, t in pauses), 2)},
        "tokens": tokens,
        "padding_fraction": round(1 - tokens / padded, 4) if padded else None,
        "tokens_per_s": round(tokens / total, 1),
        "model_tflops_per_s": float(f"{flops / total / 1e12:.4g}"),
    }
    if common.on_gpu():
        out["mfu"] = round(flops / total / common.H100_H200_BF16_DENSE_FLOPS, 4)
        out["mfu_6n_nonembed"] = round(
            flops_nonembed / total / common.H100_H200_BF16_DENSE_FLOPS, 4)
        out["mfu_head_on_targets"] = round(
            flops_targets / total / common.H100_H200_BF16_DENSE_FLOPS, 4)
    if profile:
        def two_steps() -> None:
            for batches in run[:2]:
                step(batches)
            flush()
        out["profile"] = common.profile_ops(two_steps, top=profile)
    return out


def _graphs() -> int:
    """Graphs Dynamo has compiled so far in this process."""
    return int(counters["stats"]["unique_graphs"])


def run_ours(cfg: Any, variant: Variant, warmup: list[list[Any]], timed: list[list[Any]],
             shape: dict[str, int], deadline: common.Deadline, profile: int = 0
             ) -> dict[str, Any]:
    """The trainer's step, exactly as ``fit`` calls it (the step counter advances as in fit)."""
    run = common.trainer_run(cfg)

    pending: list[Any] = []

    def flush() -> None:  # what fit does one step late: wait for the step, check its loss
        while pending:
            nll, _, _, _ = run.resolve(pending.pop())
            if not math.isfinite(nll):
                raise RuntimeError("non-finite loss")

    def step(batches: list[Any]) -> None:
        launched = run.launch_step(batches)
        run.progress.step += 1
        flush()
        pending.append(launched)

    result = measure(step, warmup, timed, shape, deadline, flush, profile)
    result["micro_split"] = run.progress.micro_split  # > 1: the trainer hit OOM and split
    return result


def build_hf(cfg: Any, vocab: int, device: torch.device) -> torch.nn.Module:
    """HF GPTNeoX with our model's shape (same parameter count when tied)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = cfg.model
    hf_cfg = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, intermediate_size=m.d_ff, hidden_act="gelu",
        attention_dropout=m.dropout, hidden_dropout=m.dropout, max_position_embeddings=m.max_len,
        tie_word_embeddings=m.tie_embeddings, use_parallel_residual=False, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_base,
                         "partial_rotary_factor": 1.0},
    )
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = GPTNeoXForCausalLM(hf_cfg)
    return model.train()


def run_hf(cfg: Any, variant: Variant, vocab: int, amp_dtype: torch.dtype | None,
           warmup: list[list[Any]], timed: list[list[Any]], shape: dict[str, int],
           deadline: common.Deadline, profile: int = 0) -> dict[str, Any]:
    """A plain PyTorch training step around HF GPTNeoX (see the module docstring)."""
    device = torch.device("cuda" if common.on_gpu() else "cpu")
    model = build_hf(cfg, vocab, device)
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda" or None)
    forward = torch.compile(model) if variant.compiled else model
    params = list(model.parameters())

    def step(batches: list[Any]) -> None:
        n_target = sum(b.n_target_tokens for b in batches)
        for b in batches:
            tokens = b.tokens.to(device, non_blocking=True)
            targets = b.targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                logits = forward(input_ids=tokens).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=-100, label_smoothing=o.label_smoothing,
                                   reduction="sum")
            (loss / n_target).backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, warmup, timed, shape, deadline, profile=profile)


# ---------------------------------------------------------------------------------------------


def comparisons(results: dict[str, dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Ratios of tokens/s at each micro-batch size; ``ours_best`` is the faster of eager and
    compiled (``train.compile`` is a config switch). With ``--profile`` also ``..._device_time``:
    the reference's device seconds over ours in the two profiled steps (the same batches):
    the kernels' ratio, blind to how fast the host kept up."""
    def tps(name: str) -> float | None:
        r = results.get(name)
        return r.get("tokens_per_s") if r and "error" not in r else None

    def busy(name: str) -> float | None:  # device seconds of the two profiled steps
        r = results.get(name)
        return (r.get("profile") or {}).get("device_busy_s") if r else None

    out: dict[str, Any] = {}
    for size in sizes:
        k = size_label(size)
        ours = {m: tps(f"ours_{m}_{k}") for m in ("eager", "compiled")}
        hf = {m: tps(f"hf_{m}_{k}") for m in ("eager", "compiled")}
        best = max((v for v in ours.values() if v), default=None)
        row: dict[str, Any] = {"ours_best_tokens_per_s": best}
        also = {n[len("ours_compiled_"):]: r["tokens_per_s"] for n, r in results.items()
                if n.startswith(f"ours_compiled_{k}+") and "tokens_per_s" in r}
        for n, v in also.items():  # the variant against the default, same run
            if ours["compiled"]:
                row[f"ours_compiled_{n}_vs_ours_compiled"] = round(v / ours["compiled"], 3)
        for ours_mode, ours_v in (*ours.items(), ("best", best),
                                  *((f"compiled_{n}", v) for n, v in also.items())):
            for hf_mode, hf_v in hf.items():
                if ours_v and hf_v:
                    row[f"ours_{ours_mode}_vs_hf_{hf_mode}"] = round(ours_v / hf_v, 3)
        for ours_mode in ("eager", "compiled"):  # the profiled steps are the same batches
            for hf_mode in ("eager", "compiled"):
                a, b = (busy(f"{side}_{mode}_{k}") for side, mode in
                        (("ours", ours_mode), ("hf", hf_mode)))
                if a and b:
                    row[f"ours_{ours_mode}_vs_hf_{hf_mode}_device_time"] = round(b / a, 3)
        for m in ("eager", "compiled"):
            causal = tps(f"ours_causal_{m}_{k}")
            ours_m = ours[m]
            if ours_m and causal:
                row["prefix_mask_cost"] = round(1 - ours_m / causal, 3)
                row["prefix_mask_cost_mode"] = m
            sdpa = tps(f"ours_sdpa_{m}_{k}")
            if ours_m and sdpa:
                row[f"fused_attention_vs_sdpa_{m}"] = round(ours_m / sdpa, 3)
        if len(row) > 1 or best:
            out[k] = row
    return out


def verdict(comp: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Targets at the report's 16k micro-batch (the first size); ``any_size_vs_hf_*``: each
    side's fastest over all sizes."""
    if not comp:
        return {}
    first = next(iter(comp.values()))
    best_mfu = max((r.get("mfu", 0.0) for n, r in results.items() if n.startswith("ours_")
                    and "error" not in r and "skipped" not in r), default=None)
    out: dict[str, Any] = {"targets": TARGETS}
    if "ours_best_vs_hf_eager" in first:
        out["vs_hf_eager"] = first["ours_best_vs_hf_eager"]
        out["vs_hf_eager_met"] = first["ours_best_vs_hf_eager"] >= TARGETS["vs_hf_eager"]
    if "ours_best_vs_hf_compiled" in first:
        out["vs_hf_compiled"] = first["ours_best_vs_hf_compiled"]
        out["vs_hf_compiled_met"] = (first["ours_best_vs_hf_compiled"]
                                     >= TARGETS["vs_hf_compiled"])
    # each side at its best over every micro-batch size measured (a micro-batch size is a
    # memory choice: the optimiser step is the same 131k tokens)
    def best(prefix: str) -> float | None:
        return max((r["tokens_per_s"] for n, r in results.items() if n.startswith(prefix)
                    and "tokens_per_s" in r), default=None)
    ours_any = max((x for x in (best("ours_eager"), best("ours_compiled")) if x), default=None)
    for mode in ("eager", "compiled"):
        hf = best(f"hf_{mode}")
        if ours_any and hf:
            out[f"any_size_vs_hf_{mode}"] = round(ours_any / hf, 3)
    if common.on_gpu() and best_mfu is not None:
        out["mfu_best"] = best_mfu
        out["mfu_met"] = best_mfu >= TARGETS["mfu"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = common.parser("throughput", __doc__.split("\n")[0])
    p.add_argument("--sizes", default=None,
                   help="micro-batch sizes in tokens, comma-separated (default 16384,32768,65536;"
                   " --tiny: 512,1024)")
    p.add_argument("--compile-sizes", default=None,
                   help="sizes that also run compiled (default: all on GPU, none with --tiny)")
    p.add_argument("--step-tokens", type=int, default=None,
                   help="tokens per optimiser step (default 131072; --tiny 1024)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 3)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF reference")
    p.add_argument("--no-causal", action="store_true", help="skip the causal-mask diagnostic")
    p.add_argument("--sdpa", action="store_true",
                   help="also run ours with train.attention: sdpa at each size, last (what "
                   "the fused attention kernel gains, same run)")
    p.add_argument("--also", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run ours compiled at the first compiled size with these config "
                   "keys set (e.g. train.compile_tuning=true); repeatable, one variant each; "
                   "not counted in ours_best or the verdict")
    p.add_argument("--profile", action="store_true",
                   help="profile two steps of each variant (torch.profiler): the device's busy "
                   "fraction and the top kernels, in the JSON")
    p.add_argument("--profile-top", type=int, default=20,
                   help="kernels and host operators listed per profiled variant (default 20)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="wall-clock budget: variants that would not fit are skipped (default 240)")
    args = p.parse_args(argv)
    common.setup_logging()
    deadline = common.Deadline(args.budget_s)
    gpu = common.on_gpu()
    sizes = _ints(args.sizes) or ([512, 1024] if args.tiny else [16384, 32768, 65536])
    default_compile = [] if args.tiny or not gpu else sizes
    compile_sizes = (_ints(args.compile_sizes) if args.compile_sizes is not None
                     else default_compile)
    step_tokens = args.step_tokens or (1024 if args.tiny else 131072)
    n_timed = args.steps or (3 if args.tiny else 10)
    # compiled: a loss recompile seen at step 4; eager: 6 steps (48 micro-batches at 16k) too,
    # so the fused attention kernels' Triton compiles (one per block shape) are all warm-up
    warm_eager, warm_compiled = (1, 2) if args.tiny else (6, 6)

    with_hf, hf_missing = not args.no_hf, None
    if with_hf and common.package_version("transformers") is None:
        with_hf, hf_missing = False, "transformers is not installed (pip install transformers)"
    torch._dynamo.config.assume_static_by_default = False
    torch.backends.cuda.enable_cudnn_sdp(False)  # as the trainer does, for both models

    wd = common.work_dir(args, "throughput")
    base_cfg, corpus = common.recipe(args, wd, {"train.compile": False})
    profile = args.profile_top if args.profile else 0
    try:
        also = [dict(parse_override(kv) for kv in a.split(",")) for a in args.also]
    except ConfigError as e:
        p.error(f"--also: {e}")
    variants = plan(sizes, compile_sizes, with_hf, not args.no_causal, args.sdpa, also)
    config = {
        "corpus": corpus, "batches": "real token-budget batches of the training split "
        "(length-bucketed, shuffled, seed 1234), the same for every variant",
        "model": asdict(base_cfg.model), "optim": asdict(base_cfg.optim),
        "ema_decay": base_cfg.train.ema_decay, "step_tokens": step_tokens,
        "micro_batch_tokens": sizes, "compiled_sizes": compile_sizes,
        "timed_steps": n_timed, "warmup_steps": {"eager": warm_eager, "compiled": warm_compiled},
        "timing": "timed steps back to back between two torch.cuda.synchronize(); "
                  "warm-up excluded",
        "flops_formula": "n_real*(6*(N_nonembed+V*d) + 12*L*T*d); MFU against 989e12",
        "dynamo": "assume_static_by_default=False (dynamic shapes from the first compile)",
        "reference": "HF GPTNeoXForCausalLM, same shape, sdpa, causal, plain step",
        "variants": [v.name for v in variants],
    }
    report = common.Report("throughput", args, config)
    if hf_missing:
        report["reference_skipped"] = hf_missing

    from trainer.data import prepare
    data = prepare(base_cfg.data)
    vocab = data.vocab_size
    results: dict[str, dict[str, Any]] = {}
    report["results"] = results
    shape: dict[str, int] = {}
    for v in variants:
        accum = max(1, step_tokens // v.micro_tokens)
        need = _estimate_s(v, gpu, results)
        if deadline.left() < need:
            results[v.name] = {"skipped": f"budget: {deadline.left():.0f} s left, ~{need:.0f} s"
                                          " needed"}
            log.info("%s: skipped (budget)", v.name)
            report.save()
            continue
        cfg = common.apply(base_cfg, {"train.tokens_per_batch": v.micro_tokens,
                                      "train.grad_accum": accum, "train.compile": v.compiled,
                                      "model.attention_mask": v.mask,
                                      "train.attention": v.attention,
                                      **dict(v.overrides)})
        steps = step_batches(data, v.micro_tokens, accum, warm_compiled + n_timed,
                             base_cfg.train.seed)
        warmup = steps[:warm_compiled if v.compiled else warm_eager]
        timed = steps[warm_compiled:]
        if not shape:
            shape = _shape(cfg, vocab)
            report["model_params"] = {"non_embedding": shape["non_embedding"],
                                      "embedding": shape["vocab"] * shape["d_model"]}
        log.info("%s: %d-token micro-batches x %d per step ...", v.name, v.micro_tokens, accum)
        _reset_memory()
        try:
            if v.model == "ours":
                r = run_ours(cfg, v, warmup, timed, shape, deadline, profile)
            else:
                amp = torch.bfloat16 if gpu and torch.cuda.is_bf16_supported() else None
                r = run_hf(cfg, v, vocab, amp, warmup, timed, shape, deadline, profile)
        except Exception as e:  # OOM, a compiler error: record it, measure the next variant
            log.exception("%s failed", v.name)
            r = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
        r["grad_accum"] = accum
        if gpu:
            r["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        results[v.name] = r
        log.info("%s: %s tok/s%s", v.name, r.get("tokens_per_s"),
                 f", MFU {r['mfu']:.1%}" if "mfu" in r else "")
        report["comparison"] = comparisons(results, sizes)
        report["verdict"] = verdict(report["comparison"], results)
        report.save()
    report.finish("ok" if all("skipped" not in r for r in results.values()) else "partial")
    return 0


def _shape(cfg: Any, vocab: int) -> dict[str, int]:
    from trainer.model import DecoderLM

    with torch.device("meta"):
        counts = DecoderLM(cfg.model, vocab, 0).param_counts()
    return {"non_embedding": counts["non_embedding"], "vocab": vocab,
            "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers}


def _estimate_s(v: Variant, gpu: bool, done: dict[str, dict[str, Any]]) -> float:
    """Seconds a variant needs at least: compilation dominates on a GPU."""
    if not gpu:
        return 5.0
    if not v.compiled:
        return 20.0
    compiled_before = any(n.startswith(v.model) and "_compiled_" in n and "tokens_per_s" in r
                          for n, r in done.items())
    if compiled_before:  # a repeat may hit Inductor's FX graph cache
        return 60.0
    # first compilations measured on an H200 (2026-11-28): HF's whole model 150-165 s; ours
    # (one block, C++ wrapper) ~100 s
    return 180.0 if v.model == "hf" else 120.0


def _reset_memory() -> None:
    gc.collect()
    torch._dynamo.reset()
    counters.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


if __name__ == "__main__":
    raise SystemExit(main())
