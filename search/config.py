"""Search configuration: ``configs/search.yaml`` -> frozen dataclasses.

Same conventions as :mod:`trainer.config`: unknown keys, wrong types and impossible values
raise :class:`~trainer.errors.ConfigError` naming the key path (``space.optim.lr.low``).

A search config names a full-run training recipe (``base_config``, a TrainConfig YAML) and
fixed ``overrides`` that apply to every trial *and* to the promoted full run. Trials are
additionally cut down by ``truncation`` (step budget, training-pair subset, eval cadence,
warm-up as a fraction of the budget). Each ``space`` entry is named by the TrainConfig key it
sets (``optim.lr``); when ``model.d_model`` is searched, ``model.n_heads = d_model /
derive.head_dim`` and ``model.d_ff = derive.ffn_ratio * d_model`` follow it (unless they are
searched themselves), so 768 gives the report's 12 heads and FFN 3072.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from trainer.config import (
    TrainConfig,
    apply_overrides,
    build_dataclass,
    coerce_value,
    config_from_dict,
    flatten_overrides,
    read_yaml,
)
from trainer.errors import ConfigError

__all__ = [
    "DeriveConfig",
    "ParamSpec",
    "PrunerConfig",
    "SamplerConfig",
    "SearchConfig",
    "TruncationConfig",
    "full_run_dict",
    "load_search_config",
    "search_config_from_dict",
    "search_config_to_dict",
    "trial_train_config",
]

# TrainConfig keys the truncation budget owns: a trial's are set from `truncation`, never searched.
TRUNCATION_KEYS = (
    "train.max_steps",
    "train.max_tokens",
    "train.eval_every",
    "train.eval_subset",
    "data.max_train_pairs",
    "train.out_dir",
)
# TrainConfig keys that choose the corpus, its splits or how BLEU-4 is computed: every trial and
# the promoted run share them (set them in base_config or overrides), or trials' BLEU-4 would
# not be comparable.
TASK_KEYS = (
    "data.source",
    "data.bible_src",
    "data.bible_tgt",
    "data.path",
    "data.train_path",
    "data.val_path",
    "data.test_path",
    "data.src_field",
    "data.tgt_field",
    "data.val_fraction",
    "data.test_fraction",
)


def _task_key(key: str) -> bool:
    return key in TASK_KEYS or key.startswith("eval.")


_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """TPE (multivariate, with ``constant_liar`` so parallel workers spread out) or random.

    Each worker seeds its sampler with ``seed + worker index`` so parallel workers do not draw
    the same start-up points.
    """

    type: Literal["tpe", "random"] = "tpe"
    seed: int | None = 1234
    multivariate: bool = True
    constant_liar: bool = True
    n_startup_trials: int = 10  # TPE: random trials before the model takes over

    def __post_init__(self) -> None:
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ConfigError(f"sampler.seed must be in [0, 2**32) or null, got {self.seed}")
        if self.n_startup_trials < 0:
            raise ConfigError(
                f"sampler.n_startup_trials must be >= 0, got {self.n_startup_trials}"
            )


@dataclass(frozen=True, kw_only=True)
class PrunerConfig:
    """Resources are counted in evaluations (the trial's k-th eval reports at step k).

    ``hyperband`` / ``successive_halving``: ``min_resource`` (0: a third of the truncation
    budget's evals, rounded down, at least 1), ``max_resource`` (null: every eval of the
    budget), ``reduction_factor``. ``median``: ``n_startup_trials``, ``n_warmup_evals``.
    ``none`` never prunes.

    The defaults (first rung at a third of the budget, keep the best quarter) come from the
    learning curves of P5's small task (BENCHMARKS.md): BLEU-4 at a sixth of a trial's steps
    barely ranks configurations (Spearman 0.22 against the final BLEU-4 over 140 trials; high
    learning rates lead early and finish worst), at a third it does (0.80; 0.85 at half).
    With six evals this Hyperband has one bracket (rungs at evals 2 and 8): it prunes three
    trials in four at eval 2, against the trials before them.
    """

    type: Literal["hyperband", "median", "successive_halving", "none"] = "hyperband"
    min_resource: int = 0  # 0: auto, truncation.n_evals // 3 (at least 1)
    max_resource: int | None = None
    reduction_factor: int = 4
    n_startup_trials: int = 5
    n_warmup_evals: int = 1

    def __post_init__(self) -> None:
        if self.min_resource < 0:
            raise ConfigError(
                f"pruner.min_resource must be >= 1 (or 0: a third of the evals), "
                f"got {self.min_resource}"
            )
        if self.max_resource is not None and self.max_resource < max(self.min_resource, 1):
            raise ConfigError(
                f"pruner.max_resource={self.max_resource} is below "
                f"pruner.min_resource={self.min_resource}"
            )
        if self.reduction_factor < 2:
            raise ConfigError(f"pruner.reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.n_startup_trials < 0 or self.n_warmup_evals < 0:
            raise ConfigError("pruner.n_startup_trials and pruner.n_warmup_evals must be >= 0")


MAX_TRIALS = 1_000_000
MAX_TIMEOUT_S = 366 * 86400


@dataclass(frozen=True, kw_only=True)
class TruncationConfig:
    """The short budget every trial trains under (the promoted full run drops it).

    The LR schedule is compressed to the budget: ``warmup`` is a fraction of ``max_steps`` and
    the cosine decays to the end of ``max_steps``. ``max_tokens`` may stop a trial earlier.
    ``overrides`` are further TrainConfig keys for trials only (e.g. a shorter EMA horizon).
    """

    max_steps: int
    max_tokens: int | None = None
    max_train_pairs: int | None = None
    eval_every: int
    eval_subset: int
    warmup: float = 0.05
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every", "eval_subset"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"truncation.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_tokens", "max_train_pairs"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"truncation.{name} must be > 0, got {v}")
        if self.eval_every > self.max_steps:
            raise ConfigError(
                f"truncation.eval_every={self.eval_every} is larger than "
                f"truncation.max_steps={self.max_steps} (a trial would never be evaluated)"
            )
        if not 0 <= self.warmup < 1:
            raise ConfigError(
                f"truncation.warmup must be a fraction of max_steps in [0, 1), got {self.warmup}"
            )
        for key in self.overrides:
            if key in TRUNCATION_KEYS:
                raise ConfigError(
                    f"truncation.overrides.{key}: set it with truncation's own keys instead"
                )
        if "optim.warmup" in self.overrides:
            raise ConfigError("truncation.overrides.optim.warmup: set truncation.warmup instead "
                              "(a fraction of max_steps, as the trials' schedule is compressed)")

    @property
    def n_evals(self) -> int:
        return math.ceil(self.max_steps / self.eval_every)


@dataclass(frozen=True, kw_only=True)
class DeriveConfig:
    """How ``model.n_heads`` and ``model.d_ff`` follow a searched ``model.d_model``."""

    head_dim: int = 64
    ffn_ratio: int = 4

    def __post_init__(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(
                f"derive.head_dim must be a positive even number, got {self.head_dim}"
            )
        if self.ffn_ratio <= 0:
            raise ConfigError(f"derive.ffn_ratio must be > 0, got {self.ffn_ratio}")


@dataclass(frozen=True, kw_only=True)
class ParamSpec:
    """One searched TrainConfig key: ``int`` / ``float`` (low, high, step or log) or
    ``categorical`` (choices)."""

    name: str  # the TrainConfig key path, e.g. "optim.lr"; also the Optuna parameter name
    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        assert self.low is not None and self.high is not None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return math.isclose(k, round(k), abs_tol=1e-9)
        return True

    def draw(self, rng: Any) -> Any:
        """A random value of this parameter (``random.Random``), on its step or log scale."""
        if self.type == "categorical":
            return rng.choice(self.choices)
        assert self.low is not None and self.high is not None
        if self.step is not None:
            k = rng.randint(0, int(round((self.high - self.low) / self.step)))
            value = self.low + k * self.step
        elif self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        value = min(max(value, self.low), self.high)
        return int(round(value)) if self.type == "int" else value

    def extremes(self) -> tuple[Any, Any]:
        if self.type == "categorical":
            return self.choices[0], self.choices[-1]
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return int(self.low), int(self.high)
        return self.low, self.high


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    name: str  # the study name
    direction: Literal["maximize"] = "maximize"  # the objective is BLEU-4 (sacrebleu, 0-100)
    base_config: str = "train.yaml"  # the full-run recipe, relative to the search YAML
    base_train: dict[str, Any] = field(default_factory=dict)  # its contents, read by the loader
    overrides: dict[str, Any] = field(default_factory=dict)  # trials and the promoted run
    truncation: TruncationConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    derive: DeriveConfig = field(default_factory=DeriveConfig)
    space: tuple[ParamSpec, ...] = ()
    enqueue: tuple[dict[str, Any], ...] = ()  # warm starts, run first, in this order
    n_trials: int | None = None  # finished trials over the whole study (see search.worker)
    timeout_s: float | None = None  # no new trial starts this long after the study's first one
    heartbeat_interval_s: int = 60
    grace_period_s: int = 180  # a RUNNING trial without a heartbeat this long is stale

    def __post_init__(self) -> None:
        if not _STUDY_NAME.fullmatch(self.name):
            raise ConfigError(
                f"name {self.name!r} must be 1-100 ASCII letters, digits, '.', '_' or '-', "
                "starting with a letter or digit (it names the study and its run directory)"
            )
        if self.n_trials is None and self.timeout_s is None:
            raise ConfigError("set n_trials, timeout_s or both (otherwise the study never ends)")
        if self.n_trials is not None and not 0 < self.n_trials <= MAX_TRIALS:
            raise ConfigError(f"n_trials must be 1-{MAX_TRIALS:,}, got {self.n_trials:,} (for "
                              "a study without a trial budget leave it out and set timeout_s)")
        if self.timeout_s is not None and not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ConfigError(f"timeout_s must be > 0 and at most {MAX_TIMEOUT_S:,} s (a "
                              f"year), got {self.timeout_s}")
        if not 1 <= self.heartbeat_interval_s <= 3600:
            raise ConfigError(
                f"heartbeat_interval_s must be 1-3600, got {self.heartbeat_interval_s}"
            )
        if self.grace_period_s > 7 * 86400:
            raise ConfigError(f"grace_period_s must be at most 7 days (604800), got "
                              f"{self.grace_period_s}")
        if self.grace_period_s < self.heartbeat_interval_s + 5:
            raise ConfigError(
                f"grace_period_s={self.grace_period_s} must be at least heartbeat_interval_s + 5 "
                f"= {self.heartbeat_interval_s + 5} (a worker riding out a storage hiccup must "
                "not look dead)"
            )
        if self.n_trials is not None and len(self.enqueue) > self.n_trials:
            raise ConfigError(
                f"enqueue lists {len(self.enqueue)} trials but n_trials is {self.n_trials}"
            )
        if (
            self.pruner.max_resource is not None
            and self.pruner.max_resource > self.truncation.n_evals
        ):
            raise ConfigError(
                f"pruner.max_resource={self.pruner.max_resource} exceeds the "
                f"{self.truncation.n_evals} evals a trial makes "
                "(truncation.max_steps / truncation.eval_every)"
            )
        if self.pruner.min_resource > self.truncation.n_evals:
            raise ConfigError(
                f"pruner.min_resource={self.pruner.min_resource} exceeds the "
                f"{self.truncation.n_evals} evals a trial makes"
            )

    def param(self, name: str) -> ParamSpec:
        for p in self.space:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def pruner_max_resource(self) -> int:
        return self.pruner.max_resource or self.truncation.n_evals


# ---------------------------------------------------------------------------------------------
# loading


def load_search_config(path: str | Path) -> SearchConfig:
    """Read a search YAML and the ``base_config`` it names (relative to the YAML's folder).

    Raises:
        ConfigError: either file is missing or is not valid YAML, or a key or value is bad;
            the message names the file and the key path.
    """
    p = Path(path)
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(raw).__name__}")
    if "base_train" in raw:
        raise ConfigError(f"{p}: unknown key 'base_train' (it is filled in from base_config)")
    base = raw.get("base_config", "train.yaml")
    if not isinstance(base, str):
        raise ConfigError(f"{p}: base_config must be a path, got {base!r}")
    base_path = Path(base) if Path(base).is_absolute() else p.parent / base
    try:
        base_raw = read_yaml(base_path)
    except ConfigError as e:
        where = "" if Path(base).is_absolute() else f" (relative to {p.parent.resolve()}/)"
        raise ConfigError(f"{p}: base_config{where}: {e}") from None
    if not isinstance(base_raw, dict):
        raise ConfigError(f"{base_path}: the top level must be a mapping")
    # relative corpus paths mean the directory create-study runs in (as for amt-train); stored
    # absolute, so that workers started anywhere on the host find the same files
    if isinstance(base_raw.get("data"), dict):
        base_raw = {**base_raw, "data": _absolute_paths(base_raw["data"], "",
                                                        base_path.parent.absolute())}
    here = p.parent.absolute()
    if isinstance(raw.get("overrides"), dict):
        raw = {**raw, "overrides": _absolute_paths(flatten_overrides(raw["overrides"]), "data.",
                                                   here)}
    trunc = raw.get("truncation")
    if isinstance(trunc, dict) and isinstance(trunc.get("overrides"), dict):
        raw = {**raw, "truncation": {**trunc, "overrides": _absolute_paths(
            flatten_overrides(trunc["overrides"]), "data.", here)}}
    try:
        return search_config_from_dict({**raw, "base_train": base_raw})
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


_PATH_KEYS = ("path", "train_path", "val_path", "test_path", "cache_dir")


def _absolute_paths(section: dict[str, Any], prefix: str,
                    config_dir: Path | None = None) -> dict[str, Any]:
    """``section`` with its relative corpus paths (``prefix + key``) made absolute (against
    the directory the command runs in). A file found relative to ``config_dir`` only is
    refused with that said: the user meant it relative to the config."""
    out = dict(section)
    for key in _PATH_KEYS:
        value = out.get(prefix + key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            here = Path(value).absolute()
            if (config_dir is not None and key != "cache_dir" and not here.exists()
                    and (config_dir / value).exists()):
                raise ConfigError(
                    f"data.{key}: {value} is not found relative to {Path.cwd()} (where corpus "
                    f"paths are read from) but is relative to the config's folder {config_dir}: "
                    "run from there, or write the path from here or absolute")
            out[prefix + key] = str(here)
    return out


def search_config_from_dict(raw: Any, *, stored: bool = False) -> SearchConfig:
    """Build and fully validate a :class:`SearchConfig` from a mapping (YAML or stored JSON).

    Besides each key's own checks, every searched key must be a scalar TrainConfig key, and
    the base recipe, each parameter's low and high end, and each enqueued trial must all give
    a valid TrainConfig.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    known = [f.name for f in fields(SearchConfig)]
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key '{key}' (known: {', '.join(sorted(known))})")
    for key in ("name", "truncation"):
        if key not in raw:
            raise ConfigError(f"{key} is required")
    if isinstance(raw.get("overrides"), dict):  # a section as a value changes its keys only
        raw["overrides"] = flatten_overrides(raw["overrides"])
    trunc = raw.get("truncation")
    if isinstance(trunc, dict) and isinstance(trunc.get("overrides"), dict):
        raw["truncation"] = {**trunc, "overrides": flatten_overrides(trunc["overrides"])}
    space_raw = raw.pop("space", None)
    enqueue_raw = raw.pop("enqueue", None)
    sections = build_dataclass(SearchConfig, raw, "")  # space and enqueue are lists: parsed below
    space = _parse_space(space_raw, stored)
    enqueue = _parse_enqueue(enqueue_raw, space)
    cfg = dataclasses.replace(sections, space=space, enqueue=enqueue)
    for key in cfg.truncation.overrides if not stored else ():
        if _task_key(key):
            raise ConfigError(
                f"truncation.overrides.{key}: it chooses the corpus or how BLEU-4 is scored, "
                "which the trials and the promoted run must share; set it in base_config or "
                "overrides"
            )
    _validate_against_train_config(cfg)
    return cfg


def search_config_to_dict(cfg: SearchConfig) -> dict[str, Any]:
    """The YAML-shaped, JSON-ready form; ``search_config_from_dict`` reads it back."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "space":
            out["space"] = {p.name: _param_to_dict(p) for p in v}
        elif f.name == "enqueue":
            out["enqueue"] = [dict(e) for e in v]
        elif is_dataclass(v):
            out[f.name] = {g.name: getattr(v, g.name) for g in fields(v)}
        else:
            out[f.name] = v
    return out


def _param_to_dict(p: ParamSpec) -> dict[str, Any]:
    if p.type == "categorical":
        return {"type": p.type, "choices": list(p.choices)}
    d: dict[str, Any] = {"type": p.type, "low": p.low, "high": p.high}
    if p.step is not None:
        d["step"] = p.step
    if p.log:
        d["log"] = True
    return d


# ---------------------------------------------------------------------------------------------
# the search space


def _parse_space(raw: Any, stored: bool = False) -> tuple[ParamSpec, ...]:
    if not raw:
        raise ConfigError("space is empty: name at least one TrainConfig key to search")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"space must be a mapping of TrainConfig keys to ranges, got {type(raw).__name__}"
        )
    return tuple(_parse_param(str(name), spec, stored) for name, spec in raw.items())


_PARAM_KEYS = {"type", "low", "high", "step", "log", "choices"}


def _parse_param(name: str, raw: Any, stored: bool = False) -> ParamSpec:
    path = f"space.{name}"
    field_type = _train_field_type(name, path)
    if name in TRUNCATION_KEYS:
        raise ConfigError(f"{path}: set by the truncation budget, it cannot be searched")
    if _task_key(name) and not stored:
        raise ConfigError(f"{path}: it chooses the corpus or how BLEU-4 is scored, which every "
                          "trial must share; set it in base_config or overrides")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping (type, low, high ...), got {raw!r}")
    for key in raw:
        if key not in _PARAM_KEYS:
            raise ConfigError(
                f"unknown key '{path}.{key}' (known: {', '.join(sorted(_PARAM_KEYS))})"
            )
    kind = raw.get("type")
    if kind not in ("int", "float", "categorical"):
        raise ConfigError(
            f"{path}.type must be one of 'int', 'float', 'categorical', got {kind!r}"
        )
    if kind == "categorical":
        for key in ("low", "high", "step", "log"):
            if key in raw:
                raise ConfigError(f"{path}.{key}: a categorical parameter takes only choices")
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{path}.choices must be a non-empty list, got {choices!r}")
        coerced = tuple(
            coerce_value(c, field_type, f"{path}.choices[{i}]") for i, c in enumerate(choices)
        )
        if len(set(map(repr, coerced))) != len(coerced):
            raise ConfigError(f"{path}.choices has duplicates: {choices!r}")
        return ParamSpec(name=name, type="categorical", choices=coerced)

    if "choices" in raw:
        raise ConfigError(f"{path}.choices: only a categorical parameter takes choices")
    if kind == "float" and field_type is not float:
        raise ConfigError(
            f"{path}: {name} is not a float in TrainConfig; use type int or categorical"
        )
    if kind == "int" and field_type not in (int, float):
        raise ConfigError(f"{path}: {name} is not a number in TrainConfig")
    number = int if kind == "int" else float
    for key in ("low", "high"):
        if key not in raw:
            raise ConfigError(f"{path}.{key} is required for a {kind} parameter")
    low = coerce_value(raw["low"], number, f"{path}.low")
    high = coerce_value(raw["high"], number, f"{path}.high")
    step = None
    if raw.get("step") is not None:
        step = coerce_value(raw["step"], number, f"{path}.step")
    log = coerce_value(raw.get("log", False), bool, f"{path}.log")
    if low > high:
        raise ConfigError(f"{path}: low ({low}) > high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{path}: a log-scale range needs low > 0, got low={low}")
    if step is not None and step <= 0:
        raise ConfigError(f"{path}.step must be > 0, got {step}")
    if log and step is not None and not (kind == "int" and step == 1):
        raise ConfigError(f"{path}: step and log cannot be combined")
    if step is not None and not log and not stored:  # (studies made before the check load)
        k = (high - low) / step
        if abs(k - round(k)) > 1e-9 * max(1.0, abs(k)):
            raise ConfigError(f"{path}: step {step} does not divide high - low = "
                              f"{high - low:g} (Optuna would quietly lower high)")
    if kind == "int" and step is None:
        step = 1
    return ParamSpec(name=name, type=kind, low=low, high=high, step=step, log=log)


def _train_field_type(dotted: str, path: str) -> Any:
    """The annotation of TrainConfig's ``dotted`` key; ConfigError unless it is a scalar."""
    cls: Any = TrainConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "TrainConfig"
            raise ConfigError(
                f"{path}: '{dotted}' is not a TrainConfig key "
                f"(keys of {where}: {', '.join(sorted(hints))})"
            )
        tp = hints[part]
        if i < len(parts) - 1:
            if not is_dataclass(tp):
                raise ConfigError(f"{path}: '{'.'.join(parts[: i + 1])}' is not a section")
            cls = tp
        else:
            if is_dataclass(tp) or typing.get_origin(tp) is dict:
                raise ConfigError(f"{path}: '{dotted}' is a section, name one of its keys")
            # `int | None` is searched like int
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
            return args[0] if is_union and len(args) == 1 else tp
    raise AssertionError("unreachable")


def _parse_enqueue(raw: Any, space: tuple[ParamSpec, ...]) -> tuple[dict[str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(
            f"enqueue must be a list of parameter mappings, got {type(raw).__name__}"
        )
    by_name = {p.name: p for p in space}
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not item:
            raise ConfigError(
                f"enqueue[{i}] must be a non-empty mapping of searched keys to values"
            )
        params: dict[str, Any] = {}
        for key, value in item.items():
            path = f"enqueue[{i}].{key}"
            if key not in by_name:
                raise ConfigError(
                    f"{path}: not a searched parameter (space has: {', '.join(by_name)})"
                )
            spec = by_name[key]
            if spec.type == "categorical":
                v = coerce_value(value, _train_field_type(key, path), path)
            else:
                v = coerce_value(value, int if spec.type == "int" else float, path)
            if not spec.contains(v):
                raise ConfigError(f"{path}={value!r} is outside space.{key} ({_describe(spec)})")
            params[key] = v
        if len(params) == len(by_name) and params in out:  # every parameter fixed, twice
            raise ConfigError(f"enqueue[{i}] repeats enqueue[{out.index(params)}]: training is "
                              "deterministic, so it would train the same model again; remove "
                              "one")
        out.append(params)
    return tuple(out)


def _describe(p: ParamSpec) -> str:
    if p.type == "categorical":
        return "choices " + ", ".join(map(repr, p.choices))
    step = f" step {p.step}" if p.step is not None else ""
    return f"{p.low}..{p.high}{step}{' log' if p.log else ''}"


def _validate_against_train_config(cfg: SearchConfig) -> None:
    names = {p.name for p in cfg.space}
    for key in cfg.overrides:
        if key in names:
            raise ConfigError(f"overrides.{key} is also searched in space.{key}; keep one")
    for key in cfg.truncation.overrides:
        if key in names:
            raise ConfigError(f"truncation.overrides.{key} is also searched in space.{key}")
    warm = cfg.param("optim.warmup") if "optim.warmup" in names else None
    if warm is not None and max((c for c in warm.choices if isinstance(c, (int, float))),
                                default=warm.high or 0) >= 1:
        raise ConfigError(
            "space.optim.warmup: trials compress the schedule to their budget, so warm-up is "
            "searched as a fraction of max_steps (high < 1)"
        )
    if "model.d_model" in names and "model.n_heads" not in names:
        p = cfg.param("model.d_model")
        h = cfg.derive.head_dim
        if p.type == "categorical":
            bad = [c for c in p.choices if c % h]
            if bad:
                raise ConfigError(
                    f"space.model.d_model: choice {bad[0]} is not a multiple of "
                    f"derive.head_dim={h} (n_heads = d_model / head_dim)"
                )
        elif int(p.low or 0) % h or int(p.step or 1) % h:
            raise ConfigError(
                f"space.model.d_model: low and step must be multiples of derive.head_dim={h} "
                "(n_heads = d_model / head_dim)"
            )
    try:
        full_run_dict(cfg, {})
        trial_train_config(cfg, {}, out_dir="trial")
    except ConfigError as e:
        raise ConfigError(f"base_config + overrides: {e}") from None
    for p in cfg.space:  # every choice of a categorical, the two ends of a range
        points = ([(f"choices[{i}]", c) for i, c in enumerate(p.choices)]
                  if p.type == "categorical"
                  else list(zip(("low", "high"), p.extremes(), strict=True)))
        for end, value in points:
            try:
                trial_train_config(cfg, {p.name: value}, out_dir="trial")
            except ConfigError as e:
                raise ConfigError(f"space.{p.name}.{end}={value!r}: {e}") from None
    for i, params in enumerate(cfg.enqueue):
        try:
            trial_train_config(cfg, params, out_dir="trial")
        except ConfigError as e:
            raise ConfigError(f"enqueue[{i}]: {e}") from None


def check_combinations(cfg: SearchConfig, n: int = 256) -> tuple[int, str | None]:
    """Draw ``n`` random points of the space (a fixed seed) and build each one's trial config:
    each value was checked alone, not together (``max_src_tokens`` + ``max_tgt_tokens`` over
    ``max_len``). Returns (how many were invalid, the first one's problem)."""
    import random

    rng = random.Random(0)
    bad, first = 0, None
    for _ in range(n if cfg.space else 0):
        params = {p.name: p.draw(rng) for p in cfg.space}
        try:
            trial_train_config(cfg, params, out_dir="trial")
        except ConfigError as e:
            bad += 1
            if first is None:
                shown = ", ".join(f"{k}={_short_value(v)}" for k, v in params.items())
                first = f"{shown}: {e}"
    return bad, first


def _short_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else repr(v)


# ---------------------------------------------------------------------------------------------
# from trial parameters to a training config


def full_run_dict(cfg: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """The full-run TrainConfig mapping: base recipe + overrides + ``params`` + derived keys.

    No truncation: this is what ``amt-search promote`` writes.
    """
    values = dict(cfg.overrides)
    values.update(params)
    if "model.d_model" in params:
        d_model = int(params["model.d_model"])
        values.setdefault("model.n_heads", d_model // cfg.derive.head_dim)
        values.setdefault("model.d_ff", cfg.derive.ffn_ratio * d_model)
    raw = apply_overrides(cfg.base_train, values)
    config_from_dict(raw)  # validate
    return raw


def trial_train_config(
    cfg: SearchConfig, params: dict[str, Any], *, out_dir: str | Path, name: str | None = None
) -> TrainConfig:
    """The TrainConfig one trial trains with: the full run cut to the truncation budget."""
    t = cfg.truncation
    budget: dict[str, Any] = {
        "name": name or cfg.name,
        "train.max_steps": t.max_steps,
        "train.max_tokens": t.max_tokens,
        "train.eval_every": t.eval_every,
        "train.eval_subset": t.eval_subset,
        "train.out_dir": str(out_dir),
    }
    if t.max_train_pairs is not None:
        budget["data.max_train_pairs"] = t.max_train_pairs
    if "optim.warmup" not in params:
        budget["optim.warmup"] = t.warmup
    budget.update(t.overrides)
    return config_from_dict(apply_overrides(full_run_dict(cfg, params), budget))
