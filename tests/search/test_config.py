"""search.config: YAML -> SearchConfig, every bad input named by its key path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from search.config import (
    full_run_dict,
    load_search_config,
    search_config_from_dict,
    search_config_to_dict,
    trial_train_config,
)
from tests.search.conftest import tiny_search, tiny_train
from trainer.config import config_from_dict
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _raw(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(tiny_search())
    raw["base_train"] = tiny_train(tmp_path)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("|")  # '|' separates levels: keys contain dots
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return raw


_DELETE = object()

BAD = [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"name": _DELETE}, "name is required"),
    ({"name": "has space"}, "name 'has space'"),
    ({"truncation": _DELETE}, "truncation is required"),
    ({"truncation|max_steps": 0}, "truncation.max_steps must be > 0"),
    ({"truncation|eval_every": 80}, "truncation.eval_every=80 is larger than"),
    ({"truncation|warmup": 1.5}, "truncation.warmup must be a fraction"),
    ({"truncation|speed": 1}, "unknown key 'truncation.speed'"),
    ({"truncation|eval_subset": _DELETE}, "truncation.eval_subset is required"),
    ({"truncation|overrides": {"train.max_steps": 5}}, "truncation.overrides.train.max_steps"),
    ({"sampler|type": "grid"}, "sampler.type must be one of"),
    ({"pruner|type": "patient"}, "pruner.type must be one of"),
    ({"pruner|reduction_factor": 1}, "pruner.reduction_factor must be >= 2"),
    ({"pruner|max_resource": 9}, "pruner.max_resource=9 exceeds the 5 evals"),
    ({"pruner|min_resource": -1}, "pruner.min_resource must be >= 1 (or 0: a third"),
    ({"pruner|min_resource": 3, "pruner|max_resource": 2},
     "pruner.max_resource=2 is below pruner.min_resource=3"),
    ({"n_trials": _DELETE}, "set n_trials, timeout_s or both"),
    ({"n_trials": 2}, "enqueue lists 3 trials but n_trials is 2"),
    ({"n_trials": 1e30}, "n_trials must be 1-1,000,000, got 1,000,000,000,000,000,019,884,"),
    ({"timeout_s": 1e9}, "timeout_s must be > 0 and at most 31,622,400 s"),
    ({"grace_period_s": 3}, "grace_period_s=3 must be at least"),
    ({"space": {}}, "space is empty"),
    ({"space|optim.lr|low": 0.5}, "space.optim.lr: low (0.5) > high (0.03)"),
    ({"space|optim.lr|low": 0.0}, "space.optim.lr: a log-scale range needs low > 0"),
    ({"space|optim.lr|type": "bool"}, "space.optim.lr.type must be one of"),
    ({"space|optim.lr|high": _DELETE}, "space.optim.lr.high is required"),
    ({"space|optim.lr|choices": [1]}, "space.optim.lr.choices: only a categorical"),
    ({"space|optim.lr|step": 0.01}, "space.optim.lr: step and log cannot be combined"),
    ({"space|optim.lr|scale": "log"}, "unknown key 'space.optim.lr.scale'"),
    ({"space|model.d_model|choices": []}, "space.model.d_model.choices must be a non-empty"),
    ({"space|model.d_model|choices": [32, "big"]}, "space.model.d_model.choices[1] must be"),
    ({"space": {"model.n_heads": {"type": "categorical", "choices": [2, 3, 4]}},
      "enqueue": _DELETE},  # every choice is checked, not only the two ends
     "space.model.n_heads.choices[1]=3: model.d_model=32 is not divisible by model.n_heads=3"),
    ({"space|model.d_model|choices": [32, 64, 40]},
     "choice 40 is not a multiple of derive.head_dim"),
    ({"space|model.d_model|low": 32}, "space.model.d_model.low: a categorical parameter"),
    ({"space|optim.lrate": {"type": "float", "low": 1, "high": 2}},
     "space.optim.lrate: 'optim.lrate' is not a TrainConfig key (keys of optim:"),
    ({"space|modle.n_layers": {"type": "int", "low": 1, "high": 2}},
     "'modle.n_layers' is not a TrainConfig key (keys of TrainConfig:"),
    ({"space|model": {"type": "int", "low": 1, "high": 2}}, "'model' is a section"),
    ({"space|train.max_steps": {"type": "int", "low": 1, "high": 2}},
     "space.train.max_steps: set by the truncation budget"),
    ({"space|eval.bleu_tokenize": {"type": "categorical", "choices": ["char", "13a"]}},
     "space.eval.bleu_tokenize: it chooses the corpus or how BLEU-4 is scored"),
    ({"space|data.bible_tgt": {"type": "categorical", "choices": ["5", "c"]}},
     "space.data.bible_tgt: it chooses the corpus"),
    ({"truncation|overrides": {"data.val_fraction": 0.1}},
     "truncation.overrides.data.val_fraction: it chooses the corpus or how BLEU-4 is scored, "
     "which the trials and the promoted run must share"),
    ({"truncation|overrides": {"eval.bleu_tokenize": "char"}},
     "truncation.overrides.eval.bleu_tokenize: it chooses"),
    ({"space|model.n_layers|type": "float"}, "model.n_layers is not a float in TrainConfig"),
    ({"space|optim.label_smoothing": {"type": "float", "low": 0.0, "high": 1.0}},
     "space.optim.label_smoothing.high=1.0: optim.label_smoothing must be in [0, 1)"),
    ({"space|optim.warmup": {"type": "float", "low": 0.0, "high": 500.0}},
     "space.optim.warmup: trials compress the schedule"),
    ({"space|model.norm": {"type": "categorical", "choices": ["pre", "mid"]}},
     "space.model.norm.choices[1] must be one of"),
    ({"enqueue": [{"optim.learning_rate": 1e-3}]},
     "enqueue[0].optim.learning_rate: not a searched"),
    ({"enqueue": [{"optim.lr": 0.5}]}, "enqueue[0].optim.lr=0.5 is outside space.optim.lr"),
    ({"enqueue": [{"model.d_model": 48}]}, "enqueue[0].model.d_model=48 is outside"),
    ({"enqueue": [{}]}, "enqueue[0] must be a non-empty mapping"),
    ({"enqueue": [{"model.n_layers": 1, "model.d_model": 32, "optim.lr": 0.01},
                  {"model.n_layers": 2, "model.d_model": 32, "optim.lr": 0.01},
                  {"model.n_layers": 1, "optim.lr": 0.01, "model.d_model": 32}]},
     "enqueue[2] repeats enqueue[0]: training is deterministic"),
    ({"overrides": {"optim.lr": 1e-3}}, "overrides.optim.lr is also searched"),
    ({"overrides": {"optim": {"lr": 1e-3}}}, "overrides.optim.lr is also searched"),
    ({"overrides": {"model": None}}, "cannot override 'model' with None: it is a section"),
    ({"overrides": {"model.norm": "pre", "model": {"norm": "post"}}},
     "'model.norm' is set twice in the overrides"),
    ({"overrides": {"model.colour": 1}}, "base_config + overrides: unknown key 'model.colour'"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_config_names_the_key(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        search_config_from_dict(_raw(tmp_path, **changes))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_files_report_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nspace: [\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: line \d+"):
        load_search_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_search_config(tmp_path / "missing.yaml")
    raw = tiny_search()
    raw["base_config"] = "nope.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"base_config \(relative to .*/\): config file not "
                       r"found: .*nope.yaml"):
        load_search_config(bad)


@pytest.mark.parametrize("name", ["search.yaml", "quickstart.yaml"])
def test_shipped_configs_load_and_round_trip(name: str) -> None:
    cfg = load_search_config(REPO / "configs" / name)
    again = search_config_from_dict(json.loads(json.dumps(search_config_to_dict(cfg))))
    assert again == cfg
    assert len(cfg.enqueue) == 3 and cfg.pruner.type == "hyperband" and cfg.sampler.constant_liar
    searched = {p.name for p in cfg.space}
    assert {"model.n_layers", "model.d_model", "optim.lr", "optim.warmup", "model.drop_path",
            "optim.label_smoothing", "model.dropout", "optim.layer_lr_decay",
            "optim.weight_decay"} <= searched


def test_an_override_given_as_a_section_keeps_the_sections_other_keys(tmp_path: Path) -> None:
    cfg = search_config_from_dict(_raw(tmp_path, overrides={"model": {"dropout": 0.2},
                                                            "optim": {}}))  # {}: no change
    assert cfg.overrides == {"model.dropout": 0.2}
    t = trial_train_config(cfg, {"model.n_layers": 1}, out_dir="/tmp/x")
    assert (t.model.dropout, t.model.norm, t.model.max_len) == (0.2, "pre", 32)  # base kept


def test_report_trials_and_derived_shape() -> None:
    cfg = load_search_config(REPO / "configs" / "search.yaml")
    shapes = [(e["model.n_layers"], e["model.d_model"], e["optim.lr"]) for e in cfg.enqueue]
    assert shapes == [(12, 768, 2e-4), (16, 768, 1e-4), (12, 512, 3e-4)]
    t = trial_train_config(cfg, dict(cfg.enqueue[2]), out_dir="/tmp/x")
    assert (t.model.n_heads, t.model.d_ff) == (8, 2048)  # d_model / 64, 4 * d_model
    # truncation: the budget, the compressed schedule; the rest is the report's recipe
    assert (t.train.max_steps, t.train.eval_every, t.optim.warmup) == (480, 80, 0.1)
    assert t.train.out_dir == "/tmp/x" and t.train.grad_accum == 1 and t.optim.beta2 == 0.95
    full = config_from_dict(full_run_dict(cfg, dict(cfg.enqueue[2])))
    assert full.train.grad_accum == 8  # the promoted run keeps the recipe's step


def test_default_pruner_starts_pruning_at_a_third_of_the_budget(tmp_path: Path) -> None:
    """min_resource 0 (the default): the first rung at n_evals // 3 (at least 1, at most
    max_resource), reduction factor 4; an explicit min_resource is kept."""
    import optuna

    from search.config import PrunerConfig
    from search.study import make_pruner, pruner_min_resource

    assert (PrunerConfig().min_resource, PrunerConfig().reduction_factor) == (0, 4)
    shipped = load_search_config(REPO / "configs" / "search.yaml")  # 6 evals
    assert shipped.pruner == PrunerConfig()  # the YAML states the service's defaults
    pruner = make_pruner(shipped)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (2, 6, 4)

    def cfg(**changes: Any) -> Any:
        raw = _raw(tmp_path, **{"pruner": {"type": "hyperband"}})
        for key, value in changes.items():
            raw[key.split("|")[0]][key.split("|")[1]] = value
        return search_config_from_dict(raw)

    assert pruner_min_resource(cfg()) == 1  # 40 steps, an eval every 8: 5 evals
    assert pruner_min_resource(cfg(**{"truncation|eval_every": 4})) == 3  # 10 evals
    assert pruner_min_resource(cfg(**{"truncation|eval_every": 40})) == 1  # one eval
    assert pruner_min_resource(cfg(**{"truncation|eval_every": 4,
                                      "pruner|max_resource": 2})) == 2
    assert pruner_min_resource(cfg(**{"truncation|eval_every": 4,
                                      "pruner|min_resource": 1})) == 1
    sha = make_pruner(cfg(**{"truncation|eval_every": 4, "pruner|type": "successive_halving"}))
    assert sha._min_resource == 3


def test_warmup_beyond_a_trial_is_refused_as_a_choice_or_an_override(tmp_path: Path) -> None:
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(tiny_train(tmp_path)))
    raw = tiny_search()
    raw["space"]["optim.warmup"] = {"type": "categorical", "choices": [0.05, 100]}
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"space.optim.warmup: .*\(high < 1\)"):
        load_search_config(bad)
    raw = tiny_search()
    raw["truncation"]["overrides"] = {"optim.warmup": 500}
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"truncation.overrides.optim.warmup: set "
                       r"truncation.warmup instead"):
        load_search_config(bad)


def test_a_corpus_path_meant_relative_to_the_config_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corpus paths are read from the directory the command runs in (base_config is relative
    to the config): a path that only resolves against the config's folder is named so."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (tmp_path / "data").mkdir()
    train = tiny_train(tmp_path / "data")
    (configs / "train.yaml").write_text(yaml.safe_dump(train))
    search = {**tiny_search(), "overrides": {"data.path": "../data/corpus.tsv"}}
    (configs / "search.yaml").write_text(yaml.safe_dump(search))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_search_config("configs/search.yaml")
    assert ("data.path: ../data/corpus.tsv is not found relative to " in str(e.value)
            and "but is relative to the config's folder" in str(e.value))
    monkeypatch.chdir(configs)  # from the config's folder it is right
    path = Path(load_search_config("search.yaml").overrides["data.path"])
    assert path.resolve() == tmp_path / "data" / "corpus.tsv"
