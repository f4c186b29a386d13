"""``fit``: train one model per a :class:`TrainConfig`, evaluate it, checkpoint it.

``fit`` orchestrates (budgets, evaluation, early stopping, checkpoints, callbacks);
``Run.train_step`` holds the math of one optimiser step. Everything a resumed run needs is
in the checkpoint (model, EMA, optimiser, GradScaler, RNG states, data position, the
:class:`Progress` bookkeeping), so an interrupted and resumed single-process run produces
the same loss curve, bit for bit, as an uninterrupted one.

Files under ``train.out_dir``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one
line per evaluation), checkpoints with their SHA-256 ``manifest.json`` (``storage.checkpoints``)
and ``result.json`` at the end.

Multi-GPU: launched by ``torchrun --nproc-per-node N -m trainer.cli --config ...`` (WORLD_SIZE
> 1) every rank trains on its share of each step's batches under DDP; only rank 0 evaluates,
writes files and calls ``on_eval``. Under DDP, OOM recovery is not attempted (the other ranks
would wait in the all-reduce) and a resumed run restores rank 0's RNG state only.

Test hook: ``AMT_INJECT_OOM=STEP[:TIMES]`` raises a CUDA out-of-memory error in optimiser step
STEP (1-based) on its first TIMES attempts (default 1), also on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from storage.checkpoints import (
    MANIFEST,
    checkpoint_sha256,
    load_checkpoint,
    save_checkpoint,
    verify,
)
from storage.errors import CheckpointError
from storage.files import atomic_write
from trainer import attention, gelu, metrics
from trainer import loss as loss_kernels
from trainer import norm as norm_kernels
from trainer.config import FUSED_COMPILED_MIN_TOKENS, TrainConfig, config_to_dict
from trainer.data import IGNORE_INDEX, Batch, PreparedData, Split, describe_corpus, prepare
from trainer.decode import generate
from trainer.errors import ConfigError, TrainingFailed
from trainer.model import MLP, Block, DecoderLM
from trainer.optim import build_optimizer, set_lr

__all__ = ["Callback", "FitResult", "Progress", "fit", "token_losses"]

log = logging.getLogger(__name__)


class Callback(Protocol):
    """Both methods are optional; either may raise to stop training (``fit`` saves a
    checkpoint, then re-raises; not when ``on_eval``'s exception has ``checkpoint = False``).
    ``on_eval`` runs on rank 0 only, ``on_step`` on every rank."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_step(self, step: int) -> None: ...


@dataclass
class FitResult:
    bleu: float  # final evaluation, EMA weights, sacrebleu 0-100
    val_loss: float
    best_val_loss: float
    best_step: int
    steps: int
    tokens: int  # source + target tokens trained on, padding excluded, all ranks
    tokens_per_s: float  # the same tokens per second of training (evaluation excluded)
    wall_s: float  # wall-clock seconds of the run, evaluations and earlier attempts included
    history: list[dict[str, float]]
    checkpoint: str | None
    checkpoint_sha256: str | None
    stopped_by: str  # "budget", "early_stopping", "time"
    bleu_signature: str = ""
    micro_batch_tokens: int = 0  # below train.tokens_per_batch after an OOM
    test_bleu: float | None = None  # eval.test: the whole test split, EMA weights


@dataclass
class Progress:
    """The loop's bookkeeping; saved in every checkpoint."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # data position: the next batch is batch ``batch`` of epoch ``epoch``
    batch: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0  # elapsed_s without evaluations
    best_val_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one
    micro_split: int = 1  # each batch runs as this many micro-batches (doubled on OOM)
    loss_sum: float = 0.0  # train NLL summed since the last evaluation
    loss_tokens: int = 0
    window_tokens: int = 0  # tokens and training seconds since the last evaluation
    window_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Pending:
    """An optimiser step queued on the device: its stats (summed NLL, grad norm, target
    tokens, tokens) still on the device, the LR it used and its 1-based number."""

    stats: torch.Tensor
    lr: float
    step: int


def fit(cfg: TrainConfig, callbacks: Sequence[Any] = (), *, resume: bool = False) -> FitResult:
    """Train, evaluating every ``train.eval_every`` optimiser steps and at the end.

    Args:
        resume: continue from the newest verified checkpoint in ``train.out_dir`` (a fresh
            start when there is none).

    Raises:
        ConfigError: bad data, or ``out_dir`` already holds checkpoints and ``resume`` is off.
        CheckpointError: ``resume`` is on and no listed checkpoint verifies.
        TrainingFailed: non-finite loss (``"nan_loss"``), out of memory at the smallest
            micro-batch (``"oom"``).
        Exception: whatever a callback raised, after a checkpoint was saved (unless the
            exception's ``checkpoint`` attribute is False).
    """
    out_dir = Path(cfg.train.out_dir)
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # innermost first
    lock = _lock_run_dir(out_dir) if os.environ.get("RANK", "0") == "0" else None
    try:
        _checkpoint_to_resume(out_dir, resume, quiet=True)  # before the data
        owns_group = _init_distributed()
        try:
            result = Run(cfg, list(callbacks)).fit(resume)
            if owns_group:  # sync: rank 0 finishes alone (test split, result.json); a rank
                dist.barrier()  # that tore the group down first once made gloo abort rank 0
            return result
        finally:
            if owns_group:
                dist.destroy_process_group()
    finally:
        if lock is not None:
            os.close(lock)
        for made_dir in made:  # made here and still empty: the run stopped before it began
            try:
                made_dir.rmdir()
            except OSError:
                break


def _lock_run_dir(out_dir: Path) -> int:
    """An exclusive lock on ``out_dir`` (flock on the directory, released when the process
    ends however it ends): a second run into it would interleave checkpoints and metrics."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir={out_dir} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"train.out_dir={out_dir} is in use by another run: wait for it to "
                          "finish or stop it, or choose another out_dir") from None
    return fd


def _new_run(out_dir: Path) -> str:
    return (f"start a new run elsewhere (amt-train --out-dir; under promote --run, move {out_dir} "
            "away)")


_LOGGED: set[tuple[str, str]] = set()  # BLEU tokenisations already logged by this process


def decode_ratio(ratio: float, train: Split) -> float:
    """``train.eval_max_new_ratio``, raised to what 99 % of the training pairs need
    (``target + <eos> <= ratio * source + 10`` tokens): targets run 3x their source in
    tokens in some pairs (English -> Bengali), and a cap below that cuts a perfect
    translation short. 0 (no ratio cap) stays 0."""
    if ratio <= 0 or len(train) == 0:
        return ratio
    src = np.maximum(train.src.length, 1)
    need = (train.tgt.length + 1 - 10) / src
    return max(ratio, round(float(np.quantile(need, 0.99)), 2))


def _data_value(key: str, value: Any) -> Any:
    """A data setting as compared on resume: paths resolved (``~``, relative spellings)."""
    if key.endswith("path") and isinstance(value, str):
        return str(Path(value).expanduser().resolve())
    return value


# data keys that decide the corpus and its vocabulary: a resumed run must keep them
_CORPUS_KEYS = ("source", "bible_src", "bible_tgt", "path", "train_path", "src_field",
                "tgt_field", "vocab_size")


def uses_fused_attention(cfg: TrainConfig) -> bool:
    """Whether ``train.attention`` asks for the fused kernels (where they can run: see
    ``attention.available``); "auto": not for compiled training at micro-batches under
    ``FUSED_COMPILED_MIN_TOKENS`` (host-bound there, see the config's comment)."""
    if cfg.train.attention == "auto":
        return not cfg.train.compile or cfg.train.tokens_per_batch >= FUSED_COMPILED_MIN_TOKENS
    return cfg.train.attention == "fused"


def _checkpoint_to_resume(out_dir: Path, resume: bool, quiet: bool = False) -> Path | None:
    """The checkpoint ``fit`` continues from: None for a fresh start.

    Raises ConfigError when ``out_dir`` holds checkpoints and ``resume`` is off, and
    CheckpointError when it holds checkpoints of which none verifies."""
    listed = verify(out_dir) if out_dir.exists() else []
    unlisted = sorted(out_dir.glob("ckpt_*.pt")) if out_dir.is_dir() and not listed else []
    if unlisted:  # a start from scratch would delete them with the run's files
        raise CheckpointError(
            f"{out_dir} holds checkpoint files ({unlisted[-1].name} the newest of "
            f"{len(unlisted)}) but no {MANIFEST} listing them (deleted?): they cannot be "
            "verified, so they are neither resumed nor overwritten — restore the manifest, "
            "or move them away or choose another out_dir")
    if listed and not resume:
        if not any(c.ok for c in listed):  # --resume would fail: say so now
            raise CheckpointError(
                f"train.out_dir={out_dir} holds checkpoints, none of which verifies (the "
                f"newest, {listed[-1].path.name}, {listed[-1].problem}): move the directory "
                "away (or delete it) to start again, or choose another out_dir")
        raise ConfigError(f"train.out_dir={out_dir} already holds checkpoints; "
                          "resume it (--resume) or choose another out_dir")
    if not listed:
        if resume and not quiet:
            log.warning("no checkpoint in %s: starting from scratch", out_dir)
        return None
    good = [c for c in listed if c.ok]
    if not good:  # the error says why; no warning per checkpoint before it
        raise CheckpointError(f"no checkpoint in {out_dir} verifies (the newest, "
                              f"{listed[-1].path.name}, {listed[-1].problem}): move the "
                              "directory away (or delete it) to start again")
    for skipped in listed[listed.index(good[-1]) + 1:]:
        if not quiet:
            log.warning("skipping checkpoint %s: it %s", skipped.path, skipped.problem)
    return good[-1].path


def token_losses(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy (as ``F.cross_entropy``) and summed plain NLL over
    positions whose target is not -100 (logits (..., V), targets (...)); the NLL makes train
    and val losses comparable.

    (Compiled, this is 3 kernels and ~3 ms a 64k-token micro-batch on an H200. Written as
    ``logsumexp(z) - z[target]`` with the target's logit as a masked sum, Inductor made the
    backward one pointwise kernel 2.2x slower than these: BENCHMARKS.md P1, session 9.)"""
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., V)
    keep = targets != IGNORE_INDEX
    nll = -logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (...)
    smoothed = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return (smoothed * keep).sum(), (nll * keep).sum()


# ---------------------------------------------------------------------------------------------


def _init_distributed() -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1; True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _precision(requested: str, device: torch.device) -> str:
    if requested == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)")
    return requested


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state: Any = np.random.get_state()  # the legacy tuple
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py: list[Any] = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n: list[Any] = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_device(tokens: torch.Tensor, prefix_lens: torch.Tensor, targets: torch.Tensor,
               device: torch.device, unpad: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor | None]:
    """(tokens, prefix_lens, select, selected targets, packed) on ``device``: ``select``
    indexes the flattened positions that have a target, found on the CPU (no device sync), so
    the LM head and softmax run only there (on the report's shape: +6 % tokens/s, -18 % peak
    memory). With ``unpad``, ``packed`` lists the real tokens' flattened positions (a row's
    source, <sep>, target and <eos>) and ``select`` indexes those (DecoderLM.forward); else
    None. The indices come from NumPy and everything goes over in one copy: this runs on the
    host once per micro-batch, and torch's CPU operators and one copy per tensor took ~10 ms
    of it there (H200 host, 64k-token batches), as long as a tenth of the GPU's step."""
    t = targets.numpy()
    is_target = t != IGNORE_INDEX
    has_target = is_target.ravel()
    parts = [tokens.numpy().ravel(), prefix_lens.numpy()]
    packed = None
    if unpad:
        lengths = parts[1] + is_target.sum(1)  # <eos> is the last target
        packed = np.flatnonzero(np.arange(t.shape[1]) < lengths[:, None])
        has_target = has_target[packed]
    select = np.flatnonzero(has_target)
    parts += [select, t.ravel()[select if packed is None else packed[select]]]
    if packed is not None:
        parts.append(packed)
    sizes = [len(p) for p in parts]
    moved = _upload(torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False)),
                    device).split(sizes)
    return (moved[0].view(tokens.shape), moved[1], moved[2], moved[3],
            moved[4] if packed is not None else None)


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without waiting: to a GPU through page-locked memory, since only
    then is a non-blocking copy truly asynchronous."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def _split_rows(batch: Batch, parts: int
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tokens, prefix_lens, targets) of ``batch`` cut into up to ``parts`` row chunks."""
    if parts == 1:
        return [(batch.tokens, batch.prefix_lens, batch.targets)]
    rows = torch.arange(batch.tokens.size(0)).tensor_split(parts)
    return [(batch.tokens[r], batch.prefix_lens[r], batch.targets[r]) for r in rows if len(r)]


def _real_tokens(batch: Batch) -> int:
    """Source, <sep>, target and <eos> tokens of a batch: padding excluded."""
    return int(batch.prefix_lens.sum()) + batch.n_target_tokens  # CPU tensor: no device sync


def _oom_injection() -> tuple[int, int]:
    spec = os.environ.get("AMT_INJECT_OOM", "")
    if not spec:
        return 0, 0
    step, _, times = spec.partition(":")
    return int(step), int(times or 1)


class Run:
    """One training run: data, model, EMA, optimiser and progress for ``cfg``, on this
    process's device (and rank). ``fit`` is ``Run(cfg, callbacks).fit(resume)``; benchmarks
    drive the parts one at a time:

    - ``train_step(batches)``: one optimiser step, waited for: (NLL sum, target tokens,
      tokens, LR); ``launch_step`` + ``resolve`` the same in two halves, so the host can
      prepare the next step while the device runs this one;
    - ``evaluate()``: val loss and BLEU-4 (``ndd``) of the EMA weights on the eval subset;
    - ``translate(model, sources)``: detokenised greedy/beam translations.

    The progress counter (``progress.step``) is advanced by ``fit``, not by ``train_step``.
    """

    def __init__(self, cfg: TrainConfig, callbacks: list[Any]) -> None:
        self.cfg = cfg
        self.callbacks = callbacks
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            # cuDNN's attention (which SDPA may pick for a masked attention on Hopper) builds an
            # execution plan for every new shape: with length-bucketed batches nearly every
            # training step and every decoding step has a new one, and an H200 trial spent its
            # first ~150 steps and first evaluation mostly planning (2026-11-28 e2e log)
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.out_dir = Path(cfg.train.out_dir)
        precision = _precision(cfg.train.precision, self.device)
        self.precision = precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        _seed_everything(cfg.train.seed)

        self.data: PreparedData = prepare(cfg.data)
        if len(self.data.val) == 0:
            raise ConfigError(f"the validation split of {describe_corpus(cfg.data)} is empty: "
                              "raise data.val_fraction or give data.val_path")
        self.eval_pairs = self.data.val[: cfg.train.eval_subset]
        self.max_new_ratio = decode_ratio(cfg.train.eval_max_new_ratio, self.data.train)
        if self.rank == 0 and self.max_new_ratio > cfg.train.eval_max_new_ratio > 0:
            log.info("decoding: a translation may run to %.2f x its source + 10 tokens, not "
                     "%.2f: 99 %% of this corpus's training targets need that",
                     self.max_new_ratio, cfg.train.eval_max_new_ratio)
        self.bleu_tokenize = metrics.resolve_tokenize(
            cfg.eval.bleu_tokenize, (ex.tgt_text for ex in self.data.val))
        if self.rank == 0 and (cfg.eval.bleu_tokenize, self.bleu_tokenize) not in _LOGGED:
            _LOGGED.add((cfg.eval.bleu_tokenize, self.bleu_tokenize))  # once per worker
            log.info("BLEU-4 tokenisation: %s%s", self.bleu_tokenize,
                     " (auto, from the validation references)"
                     if cfg.eval.bleu_tokenize == "auto" else "")
        with self.device:  # initialised where it trains: on a GPU, a 16-layer model is
            # ready in ~0.1 s instead of ~2 s of CPU init and copy between two trials (P6)
            self.model = DecoderLM(cfg.model, self.data.vocab_size, self.data.pad_id)
        self.model.fused_attention = uses_fused_attention(cfg) and attention.available(
            self.device, cfg.model.d_model // cfg.model.n_heads)
        self.model.bf16_residual = not cfg.train.fp32_residual
        self.unpad = cfg.train.unpad and self.model.fused_attention
        for module in self.model.modules():
            if isinstance(module, MLP):
                module.fused = cfg.train.fused_mlp and gelu.available(self.device)
            if isinstance(module, Block):
                module.fused_norm = cfg.train.fused_norm and norm_kernels.available(self.device)
                module.residual_addmm = cfg.train.residual_addmm
        self.ema = None
        if cfg.train.ema_decay > 0:
            self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = build_optimizer(self.model, cfg.optim,
                                         fused=cfg.optim.fused and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.progress = Progress()
        self.saved_step = -1
        self.saved_path: Path | None = None
        self.pending: _Pending | None = None  # the launched step not yet waited for
        self.lr = 0.0  # the LR of the last step waited for
        self.bleu_signature = ""
        if self.world > 1:  # same initial weights everywhere (DDP checks), own dropout masks
            torch.manual_seed(cfg.train.seed + self.rank)
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else None
        self.train_model: torch.nn.Module = self.ddp or self.model
        self.losses = token_losses
        if cfg.train.fused_loss and loss_kernels.available(self.device):
            self.losses = loss_kernels.cross_entropy_sums
        if cfg.train.compile:
            # regional compilation: the blocks share one graph, so compiling costs one block,
            # not the whole stack (a 12-layer model: 190 s -> 24 s on an H200); with dynamic
            # shapes from the start, since length-bucketed batches change (B, T) every step
            options: dict[str, Any] = {"cpp_wrapper": self.device.type == "cuda"
                       and cfg.train.compile_wrapper == "cpp",
                       "coordinate_descent_tuning": cfg.train.compile_tuning}
            for block in self.model.blocks:
                block.compile(dynamic=True, options=options)
            self.losses = torch.compile(self.losses, dynamic=True, options=options)

    # -- orchestration ------------------------------------------------------------------------

    def fit(self, resume: bool) -> FitResult:
        cfg = self.cfg
        self._start(resume)
        p = self.progress  # after _start: a resumed run replaces it
        finished = self._finished_result() if resume else None
        if finished is not None:
            log.info("%s finished already (%s, step %d): nothing to train; BLEU-4 %.2f as in "
                     "%s (move the directory away to train it again)", self.out_dir,
                     finished.stopped_by, p.step, finished.bleu, self.out_dir / "result.json")
            return finished
        started = time.perf_counter() - p.elapsed_s
        batches = self._train_batches()
        bar = tqdm(total=cfg.train.max_steps, initial=p.step, unit="step", dynamic_ncols=True,
                   disable=self.rank != 0 or not sys.stderr.isatty()
                   or os.environ.get("AMT_PROGRESS", "1") == "0")
        stopped_by = self._stop_reason()
        patience = cfg.train.early_stopping_patience
        if stopped_by is None and patience and p.bad_evals >= patience:
            stopped_by = "early_stopping"  # resumed after it stopped early: nothing to train
        while stopped_by is None:
            t0 = time.perf_counter()
            step_batches = [next(batches) for _ in range(cfg.train.grad_accum)]
            launched = self.launch_step(step_batches)
            p.step += 1
            self._account(bar)  # the previous step, while the GPU runs this one
            self.pending = launched
            if cfg.train.max_tokens:  # a token budget needs this step's count now
                self._account(bar)
            p.elapsed_s = time.perf_counter() - started
            stopped_by = self._stop_reason()
            checkpoint_due = (cfg.train.checkpoint_every
                              and p.step % cfg.train.checkpoint_every == 0)
            if stopped_by or checkpoint_due or p.step % cfg.train.eval_every == 0:
                self._account(bar)  # evaluations and checkpoints see it all
            dt = time.perf_counter() - t0
            p.window_s += dt
            p.train_s += dt
            p.elapsed_s = time.perf_counter() - started
            bar.update()
            if p.step % cfg.train.eval_every == 0 or stopped_by:
                # checkpoints too when checkpoint_every=0
                if self._evaluate_and_report(self.lr, started):
                    stopped_by = "early_stopping"
            if checkpoint_due:
                self._save()
            self._call("on_step", p.step)
        bar.close()
        if not p.history or p.history[-1]["step"] != p.step:  # a resumed, finished run
            self._evaluate_and_report(0.0, started)
        return self._finish(stopped_by or "budget")

    def _account(self, bar: Any = None) -> None:
        """Wait for the pending step (if any) and add it to the progress."""
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        loss_sum, loss_tokens, tokens, lr = self.resolve(step)
        p = self.progress
        p.tokens += tokens
        p.loss_sum += loss_sum
        p.loss_tokens += loss_tokens
        p.window_tokens += tokens
        self.lr = lr
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / max(loss_tokens, 1):.3f}", lr=f"{lr:.2e}")

    def _start(self, resume: bool) -> None:
        ckpt = _checkpoint_to_resume(self.out_dir, resume)
        if ckpt is not None:
            self._load(ckpt)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
            _write(self.out_dir / "config.yaml", text)
            # metrics.jsonl always matches the history we continue from
            lines = "".join(json.dumps(m) + "\n" for m in self.progress.history)
            _write(self.out_dir / "metrics.jsonl", lines)
        counts = self.model.param_counts()
        log.info("model: %s parameters (%s non-embedding); %s on %s x%d, precision %s",
                 f"{counts['total']:,}", f"{counts['non_embedding']:,}", self.cfg.name,
                 self.device, self.world, self.precision)

    def _finished_result(self) -> FitResult | None:
        """The run's ``result.json`` when the resumed checkpoint is where the run ended (its
        budget or early stopping): resuming it would train on past its end or evaluate the
        test split again. None when there is something left to do."""
        cfg, p = self.cfg.train, self.progress
        ended = (p.step >= cfg.max_steps or (cfg.max_tokens and p.tokens >= cfg.max_tokens)
                 or (cfg.early_stopping_patience and p.bad_evals >= cfg.early_stopping_patience))
        if not ended or not p.history or p.history[-1]["step"] != p.step:
            return None
        try:
            raw = json.loads((self.out_dir / "result.json").read_text(encoding="utf-8"))
            result = FitResult(**{f.name: raw[f.name] for f in fields(FitResult)
                                  if f.name in raw})
        except (OSError, ValueError, TypeError):
            return None  # none or unreadable: finish again
        if result.steps != p.step or (self.cfg.eval.test and result.test_bleu is None
                                      and len(self.data.test)):
            return None  # another run's, or the test split is wanted now
        return result

    def _stop_reason(self) -> str | None:
        cfg, p = self.cfg.train, self.progress
        if p.step >= cfg.max_steps or (cfg.max_tokens and p.tokens >= cfg.max_tokens):
            return "budget"
        over_time = cfg.max_time_s is not None and p.elapsed_s >= cfg.max_time_s
        if self.world > 1 and cfg.max_time_s is not None:  # sync: ranks must agree to stop
            if p.step % 10:  # every 10th step: the agreement costs a host sync
                return None
            flag = torch.tensor(float(over_time), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            over_time = bool(flag.item())
        return "time" if over_time else None

    def _train_batches(self) -> Iterator[Batch]:
        """This rank's batches, endlessly, from the saved data position on. Each group of
        ``world`` consecutive batches gives one to every rank; a short last group is dropped."""
        p, cfg = self.progress, self.cfg
        while True:
            group: list[Batch] = []
            produced = False
            index = p.batch
            for batch in self.data.batches(self.data.train, cfg.train.tokens_per_batch,
                                           shuffle=True, seed=cfg.train.seed, epoch=p.epoch,
                                           start_batch=p.batch):
                group.append(batch)
                index += 1
                if len(group) == self.world:
                    produced = True
                    p.batch = index
                    yield group[self.rank]
                    group = []
            if not produced and p.batch == 0:
                raise ConfigError(f"the training split has fewer batches than the {self.world} "
                                  "ranks (data.path / data.max_train_pairs)")
            p.epoch, p.batch = p.epoch + 1, 0

    def _evaluate_and_report(self, lr: float, started: float) -> bool:
        """Evaluate (rank 0), record, checkpoint when due, call ``on_eval``; True: stop early."""
        cfg, p = self.cfg.train, self.progress
        m: dict[str, Any] | None = None
        if self.rank == 0:
            t0 = time.perf_counter()
            scores = self.evaluate()
            m = {"step": p.step, "epoch": p.epoch, "tokens": p.tokens,
                 "train_loss": p.loss_sum / max(p.loss_tokens, 1), **scores, "lr": lr,
                 "tokens_per_s": p.window_tokens / max(p.window_s, 1e-9),
                 "eval_s": round(time.perf_counter() - t0, 3),
                 "elapsed_s": time.perf_counter() - started}
            log.info("step %d: train loss %.4f, val loss %.4f, BLEU %.2f, %.0f tok/s (eval %.1fs)",
                     p.step, m["train_loss"], m["val_loss"], m["bleu"], m["tokens_per_s"],
                     m["eval_s"])
            try:
                with open(self.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(m) + "\n")
            except OSError as e:  # a full disk: name the file (a torn line is cut on resume)
                e.filename = e.filename or str(self.out_dir / "metrics.jsonl")
                raise
        if self.world > 1:  # sync: every rank keeps the same bookkeeping
            box = [m]
            dist.broadcast_object_list(box, src=0)
            m = box[0]
        assert m is not None
        p.history.append(m)
        p.loss_sum, p.loss_tokens, p.window_tokens, p.window_s = 0.0, 0, 0, 0.0
        if m["val_loss"] < p.best_val_loss:
            p.best_val_loss, p.best_step, p.bad_evals = m["val_loss"], p.step, 0
        else:
            p.bad_evals += 1
        p.elapsed_s = time.perf_counter() - started
        if cfg.checkpoint_every == 0:
            self._save()
        error: BaseException | None = None
        if self.rank == 0:
            try:
                for cb in self.callbacks:
                    if hasattr(cb, "on_eval"):
                        cb.on_eval(p.step, dict(m))
            except BaseException as e:
                error = e
        failed = error is not None
        if self.world > 1:  # sync: rank 0 tells the others whether a callback stopped it
            flag = torch.tensor(int(failed), device=self.device)
            dist.broadcast(flag, src=0)
            failed = bool(flag.item())
        if error is not None:
            if getattr(error, "checkpoint", True):  # a callback may stop a run for good
                self._save()
            raise error
        if failed:
            raise TrainingFailed("a callback stopped the run on rank 0", reason="stopped")
        return bool(cfg.early_stopping_patience) and p.bad_evals >= cfg.early_stopping_patience

    def _call(self, hook: str, step: int) -> None:
        for cb in self.callbacks:
            if hasattr(cb, hook):
                try:
                    getattr(cb, hook)(step)
                except BaseException:
                    self._save()
                    raise

    def _finish(self, stopped_by: str) -> FitResult:
        p = self.progress
        path = self._save()
        last = p.history[-1]
        result = FitResult(
            bleu=last["bleu"], val_loss=last["val_loss"], best_val_loss=p.best_val_loss,
            best_step=p.best_step, steps=p.step, tokens=p.tokens,
            tokens_per_s=p.tokens / max(p.train_s, 1e-9), wall_s=p.elapsed_s,
            history=list(p.history), checkpoint=str(path) if path else None,
            checkpoint_sha256=checkpoint_sha256(path) if path else None, stopped_by=stopped_by,
            bleu_signature=self.bleu_signature,
            micro_batch_tokens=self.cfg.train.tokens_per_batch // p.micro_split,
        )
        if self.rank == 0 and self.cfg.eval.test and len(self.data.test):
            model = self.ema if self.ema is not None else self.model.eval()
            with self._autocast():
                hypotheses = self.translate(model, [ex.src_ids for ex in self.data.test])
            references = [ex.tgt_text for ex in self.data.test]
            result.test_bleu = metrics.bleu(hypotheses, references, self.bleu_tokenize)[0]
            log.info("test split: BLEU-4 %.2f on %d pairs", result.test_bleu, len(references))
        elif self.rank == 0 and self.cfg.eval.test:
            log.warning("eval.test is on but the test split is empty (data.test_fraction 0, or "
                        "too small a corpus): no test BLEU-4")
        if self.rank == 0:
            extra = {"device": str(self.device), "world_size": self.world,
                     "precision": self.precision, "params": self.model.param_counts()}
            text = json.dumps({**asdict(result), **extra}, indent=2)
            _write(self.out_dir / "result.json", text + "\n")
            log.info("done (%s): BLEU %.2f, val loss %.4f after %d steps", stopped_by,
                     result.bleu, result.val_loss, p.step)
        return result

    # -- the math -----------------------------------------------------------------------------

    def train_step(self, batches: list[Batch]) -> tuple[float, int, int, float]:
        """One optimiser step over ``batches`` (the gradient-accumulation micro-batches),
        waited for: ``resolve(launch_step(batches))``."""
        return self.resolve(self.launch_step(batches))

    def launch_step(self, batches: list[Batch]) -> _Pending:
        """Queue one optimiser step over ``batches`` on the device without waiting for it.

        On CUDA OOM the step is redone with every batch cut into twice as many row chunks
        (same tokens per step); below ``train.min_micro_batch_tokens`` it raises
        ``TrainingFailed("oom")``.
        """
        oom_step, oom_times = _oom_injection()
        attempts = 0
        while True:
            try:
                if self.progress.step + 1 == oom_step and attempts < oom_times:
                    raise torch.cuda.OutOfMemoryError("injected by AMT_INJECT_OOM")
                return self._step(batches)
            except torch.cuda.OutOfMemoryError as e:
                attempts += 1
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                split = self.progress.micro_split * 2
                micro_tokens = self.cfg.train.tokens_per_batch // split
                if self.world > 1 or micro_tokens < self.cfg.train.min_micro_batch_tokens:
                    raise TrainingFailed(
                        f"out of memory at step {self.progress.step + 1} with micro-batches "
                        f"of {self.cfg.train.tokens_per_batch // self.progress.micro_split} "
                        "tokens (lower train.tokens_per_batch or model size)", reason="oom",
                    ) from e
                log.warning("CUDA out of memory: micro-batches of %d tokens from now on",
                            micro_tokens)
                self.progress.micro_split = split

    def _step(self, batches: list[Batch]) -> _Pending:
        cfg, p = self.cfg, self.progress
        n_target = sum(b.n_target_tokens for b in batches)
        micro = [c for b in batches for c in _split_rows(b, p.micro_split)]
        nll_sum = torch.zeros((), device=self.device)
        for i, chunk in enumerate(micro):
            tokens, prefix_lens, select, targets, packed = _to_device(*chunk, self.device,
                                                                      self.unpad)
            last = i == len(micro) - 1
            no_sync = (self.ddp.no_sync() if self.ddp is not None and not last
                       else contextlib.nullcontext())
            with no_sync:
                with self._autocast():
                    logits = self.train_model(tokens, prefix_lens, select, packed)  # (S, V)
                loss, nll = self.losses(logits, targets, cfg.optim.label_smoothing)
                self.scaler.scale(loss / n_target).backward()
            nll_sum += nll.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.optim.grad_clip or math.inf)
        tokens_here = sum(_real_tokens(b) for b in batches)
        # the host's counts go over in one non-blocking copy: torch.tensor(x, device=cuda)
        # would wait for every queued micro-batch (a stream sync) and leave the GPU idle while
        # the host launches the optimiser and the next step
        counts = _upload(torch.tensor([float(n_target), float(tokens_here)]), self.device)
        stats = torch.cat([torch.stack([nll_sum, grad_norm.float().to(self.device)]), counts])
        if self.world > 1:  # the grad norm is already the same everywhere; sum the rest
            stats[1].div_(self.world)  # in place: no host tensor, no sync
            dist.all_reduce(stats)
        lr = set_lr(self.optimizer, p.step, cfg.optim, cfg.train.max_steps)
        self.scaler.step(self.optimizer)  # fp16 with a non-fused optimiser syncs here
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        return _Pending(stats, lr, p.step + 1)

    def resolve(self, pending: _Pending) -> tuple[float, int, int, float]:
        """Wait for a launched step and check it: (summed train NLL, target tokens, tokens,
        LR) over all ranks; a non-finite loss (or gradient, without fp16 loss scaling) raises
        ``TrainingFailed("nan_loss")``. ``fit`` calls it one step late, while the GPU runs
        the next step, so the step itself never waits for the host."""
        nll_total, norm, n_target_all, tokens_all = pending.stats.tolist()  # sync
        if not math.isfinite(nll_total) or (not self.scaler.is_enabled()
                                            and not math.isfinite(norm)):
            raise TrainingFailed(f"non-finite loss or gradient at step {pending.step} "
                                 f"(loss {nll_total}, grad norm {norm}); lower optim.lr",
                                 reason="nan_loss")
        return nll_total, int(n_target_all), int(tokens_all), pending.lr

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # warm-up as in TF's ExponentialMovingAverage(num_updates): short runs are not
        # dominated by the random initial weights
        step = self.progress.step + 1
        decay = min(self.cfg.train.ema_decay, (1 + step) / (10 + step))
        ema_params: list[torch.Tensor] = list(self.ema.parameters())
        params: list[torch.Tensor] = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Val loss (plain NLL per target token) and BLEU-4 on the first ``train.eval_subset``
        validation pairs, with the EMA weights (the raw weights when EMA is off)."""
        model = self.ema if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        autocast = self._autocast()
        nll_sum = torch.zeros((), device=self.device)
        n_target = 0
        for batch in self.data.batches(self.eval_pairs, self.cfg.train.tokens_per_batch,
                                       shuffle=False, seed=0, epoch=0):
            tokens, prefix_lens, select, targets, _ = _to_device(
                batch.tokens, batch.prefix_lens, batch.targets, self.device)
            with autocast:
                logits = model(tokens, prefix_lens, select)
            nll_sum += token_losses(logits, targets, 0.0)[1]
            n_target += batch.n_target_tokens
        with autocast:
            hypotheses = self.translate(model, [ex.src_ids for ex in self.eval_pairs])
        references = [ex.tgt_text for ex in self.eval_pairs]
        bleu, self.bleu_signature = metrics.bleu(hypotheses, references, self.bleu_tokenize)
        out = {"val_loss": float(nll_sum) / max(n_target, 1), "bleu": bleu}  # sync
        if self.cfg.eval.ndd:
            out["ndd"] = metrics.ndd(hypotheses, references, self.bleu_tokenize)
        model.train(was_training)
        return out

    def translate(self, model: DecoderLM, sources: list[list[int]]) -> list[str]:
        """Detokenised translations, decoded in batches of similar source length."""
        cfg = self.cfg.train
        rows = cfg.eval_decode_rows
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: list[str] = [""] * len(sources)
        for start in range(0, len(order), rows):
            chunk = order[start : start + rows]
            ids = generate(model, [sources[i] for i in chunk], self.data.sep_id,
                           self.data.eos_id, self.data.pad_id, cfg.eval_max_new_tokens,
                           beam_size=cfg.beam_size, max_new_ratio=self.max_new_ratio)
            for i, hyp in zip(chunk, ids, strict=True):
                out[i] = self.data.decode(hyp)
        return out

    # -- checkpoints --------------------------------------------------------------------------

    def _save(self) -> Path | None:
        """Checkpoint the current step on rank 0 (once per step); returns its path."""
        self._account()  # a checkpoint holds the progress of every step it has
        if self.rank != 0:
            return None
        if self.saved_step == self.progress.step:
            return self.saved_path
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "progress": asdict(self.progress),
            "config": config_to_dict(self.cfg),
            "tokenizer_key": self.data.tokenizer_key,  # the token ids' meaning
        }
        self.saved_path = save_checkpoint(self.out_dir, self.progress.step, state,
                                          keep=self.cfg.train.keep_checkpoints)
        self.saved_step = self.progress.step
        return self.saved_path

    def load_weights(self, path: Path) -> dict[str, Any]:
        """Load the model (and EMA) weights of checkpoint ``path`` after checking that its model
        section is this run's; returns the whole checkpoint state."""
        state = load_checkpoint(path)
        if not isinstance(state.get("config"), dict) or "model" not in state["config"]:
            raise CheckpointError(f"checkpoint {path} is not an amt-train checkpoint (no config "
                                  "in it) — resume from another run directory")
        saved_key = state.get("tokenizer_key")
        if saved_key is not None and saved_key != self.data.tokenizer_key:
            raise ConfigError(
                f"the checkpoint {path} was trained with another tokenizer (another corpus or "
                "data settings, or the corpus changed since): its token ids mean other words "
                "here — resume with the data section it was saved with, or "
                + _new_run(self.out_dir))
        saved_data = state["config"].get("data", {})
        data_now = config_to_dict(self.cfg.data)
        for k in () if saved_key is not None else _CORPUS_KEYS:  # older checkpoints: by config
            if k in saved_data and _data_value(k, saved_data[k]) != _data_value(k, data_now[k]):
                raise ConfigError(
                    f"data.{k} is {data_now[k]!r} but the checkpoint {path} being resumed was "
                    f"trained with {saved_data[k]!r} (another corpus or vocabulary); resume with "
                    f"--set data.{k}={saved_data[k]} or " + _new_run(self.out_dir))
        vocab = state["model"].get("wte.weight")
        if vocab is not None and vocab.shape[0] != self.data.vocab_size:
            raise ConfigError(
                f"the checkpoint {path} has a vocabulary of {vocab.shape[0]} tokens, this run's "
                f"corpus gives {self.data.vocab_size}: the corpus changed since it was saved — "
                + _new_run(self.out_dir))
        ours = config_to_dict(self.cfg.model)
        saved_model = state["config"]["model"]
        if "rope_pairs" not in saved_model:  # saved before the key: RoPE was interleaved
            saved_model = {**saved_model, "rope_pairs": "interleaved"
                           if saved_model.get("positional") == "rope" else ours["rope_pairs"]}
        differ = [k for k in sorted(set(saved_model) | set(ours))
                  if saved_model.get(k) != ours.get(k)]
        if differ:
            k = differ[0]
            raise ConfigError(
                f"model.{k} is {ours.get(k)!r} but the checkpoint {path} being resumed has "
                f"{saved_model.get(k)!r}" + (f" (and {len(differ) - 1} more model keys)"
                                             if len(differ) > 1 else "")
                + f"; resume with --set model.{k}={saved_model.get(k)} or start a new run")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        return state

    def _load(self, path: Path) -> None:
        state = self.load_weights(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. optim.layer_lr_decay 1.0 makes one group, not L + 2
            raise ConfigError(
                f"the optimiser state in {path} does not fit this run's optim settings ({e}); "
                "resume with the optim section the checkpoint was saved with, or start a new "
                "run") from None
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        if self.rank == 0:
            _set_rng_state(state["rng"])
        else:  # only rank 0's generator state is saved: fresh dropout masks elsewhere
            torch.manual_seed(self.cfg.train.seed + self.rank + 7919 * self.progress.step)
        self.saved_step, self.saved_path = self.progress.step, path
        log.info("resumed from %s at step %d", path, self.progress.step)
        saved = state.get("config") or {}
        ours = config_to_dict(self.cfg)
        changed = [f"{section}.{k}" for section in ("optim", "train")
                   for k in sorted(set(saved.get(section) or {}) | set(ours[section]))
                   if section in saved and (saved[section] or {}).get(k) != ours[section].get(k)
                   and k not in ("out_dir", "max_time_s")]
        if changed and self.rank == 0:  # (a longer max_steps on purpose, say: not refused)
            log.warning("resuming with settings the checkpoint was not trained with: %s; the "
                        "schedule follows the new values from step %d",
                        ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else ""),
                        self.progress.step)


def _write(path: Path, text: str) -> None:
    """Write a run file whole or not at all (a full disk leaves no half-written file; the
    OSError names the file)."""
    atomic_write(path, lambda f: f.write(text.encode()))
