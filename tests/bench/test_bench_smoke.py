"""Smoke tests of the benchmarks: each runs with ``--tiny`` on CPU and writes its JSON object.

All benchmarks start at once (separate processes, so their global state stays theirs) and each
test waits for its own; the four that need PostgreSQL use ``$TEST_DB_URL`` (default
127.0.0.1:5432) and are skipped when no server answers. The GPU-only parts (MFU, compiled
variants) are off on CPU by the benchmarks themselves; the HF reference runs only when
``transformers`` is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get("TEST_DB_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
NEEDS_DB = {"storage_overhead", "idle", "pruning", "scaling"}
TRITON_ONLY = {"attention", "gelu", "norm"}
ARGS: dict[str, list[str]] = {
    "throughput": ["--budget-s", "120", "--profile"],
    "block": ["--variants", "current", "--backend", "aot_eager"],  # no C++ compile: ~75 s
    "attention": [],  # in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET)
    "gelu": [],  # likewise
    "norm": [],  # likewise
    "real_run": [],
    "ablation": [],
    "real_run_describe": ["--describe"],
    "decode": ["--repeats", "1"],
    "storage_overhead": ["--storage", ADMIN_URL],
    "idle": ["--storage", ADMIN_URL],
    "pruning": ["--storage", ADMIN_URL],
    "scaling": ["--storage", ADMIN_URL, "--trials", "2", "--max-steps", "2"],
}
COMMON_KEYS = {"bench", "status", "env", "config", "bench_wall_s"}
ENV_KEYS = {"date", "hardware", "torch", "cuda", "gpus", "cpu", "cpu_cores", "git"}


def _db_answers() -> bool:
    import sqlalchemy

    from storage.urls import check_url

    engine = sqlalchemy.create_engine(check_url(ADMIN_URL), connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except sqlalchemy.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Start every benchmark; yields name -> (process, output file)."""
    root = tmp_path_factory.mktemp("bench")
    db = _db_answers()
    triton = importlib.util.find_spec("triton") is not None
    env = {**os.environ, "PYTHONPATH": str(REPO), "AMT_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "AMT_HOME": str(root / "home")}
    started: dict[str, Any] = {}
    for name, extra in ARGS.items():
        if (name in NEEDS_DB and not db) or (name in TRITON_ONLY and not triton):
            started[name] = None
            continue
        out = root / f"{name}.json"
        module = name.removesuffix("_describe")
        cmd = [sys.executable, "-m", f"bench.{module}", "--tiny", "--out", str(out), *extra]
        cmd += ["--work-dir", str(root / name)]
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log,
                                text=True)
        started[name] = (proc, out, log, root / f"{name}.log")
    yield started
    for item in started.values():
        if item:
            proc, _, log, _ = item
            if proc.poll() is None:
                proc.kill()
            log.close()


def result(runs: dict[str, Any], name: str) -> dict[str, Any]:
    """Wait for ``name``; check it printed exactly the JSON object it wrote to --out."""
    item = runs[name]
    if item is None:
        pytest.skip("no Triton" if name in TRITON_ONLY
                    else f"no PostgreSQL at TEST_DB_URL / 127.0.0.1:5432 for bench.{name}")
    proc, out, _, log_path = item
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, Path(log_path).read_text()[-3000:]
    printed = json.loads(stdout)
    written = json.loads(Path(out).read_text())
    assert printed == written
    assert COMMON_KEYS <= set(written)
    assert ENV_KEYS <= set(written["env"])
    assert written["status"] in ("ok", "partial")
    return written


def test_throughput(runs: dict[str, Any]) -> None:
    r = result(runs, "throughput")
    for name in ("ours_eager_512", "ours_eager_1k"):
        row = r["results"][name]
        assert row["tokens_per_s"] > 0 and row["timed_steps"] >= 1 and row["micro_split"] == 1
        assert "mfu" not in row  # no peak to compare with on a CPU
        top = row["profile"]["top"]  # two profiled steps: the operators with the most time
        assert top and all(op["ms"] >= 0 and op["count"] > 0 for op in top)
    assert {"512", "1k"} <= set(r["comparison"])
    assert r["model_params"]["non_embedding"] > 0
    if r["env"]["packages"]["transformers"]:
        assert r["results"]["hf_eager_512"]["tokens_per_s"] > 0
        assert "ours_best_vs_hf_eager" in r["comparison"]["512"]
        assert "vs_hf_eager_met" in r["verdict"]
    else:
        assert "transformers" in r["reference_skipped"]


def test_block(runs: dict[str, Any]) -> None:
    r = result(runs, "block")
    current = r["results"]["current"]
    assert current["speedup_vs_current"] == 1.0 and current["tokens_per_s"] > 0
    assert set(current["lengths"]) == {"32", "24"}
    assert current["profile_at_first_length"]["top"]


def test_attention(runs: dict[str, Any]) -> None:
    r = result(runs, "attention")
    short, long = r["results"]["20"], r["results"]["140"]
    assert short["tile_width"] == 32 and short["sdpa"]["fwd_ms"] > 0
    assert len(short["sweep_ms"]["fwd"]) == 2 and short["fused_best"]["fwd_bwd_ms"] > 0
    # the one-kernel backward up to ONE_TILE_MAX_T tokens, dq and dk/dv kernels past it
    assert set(short["sweep_ms"]) == {"fwd", "bwd"}
    assert set(long["sweep_ms"]) == {"fwd", "dq", "dkv"}


def test_gelu(runs: dict[str, Any]) -> None:
    r = result(runs, "gelu")
    assert r["inductor"]["fwd_ms"] > 0 and r["copy_ms"] > 0
    assert len(r["results"]) == 2 and r["best"]["blocks"] in r["results"]
    assert {"floor_ms", "fast_bwd_ms", "libdevice_bwd_ms"} <= set(r["best"])


def test_norm(runs: dict[str, Any]) -> None:
    r = result(runs, "norm")
    assert r["compiled"]["inductor"]["fwd_bwd_ms"] > 0 and r["compiled"]["ours"]["fwd_ms"] > 0
    assert len(r["forward"]) == 2 and len(r["backward"]) == 2
    assert r["best"]["forward"] in r["forward"] and r["best"]["backward"] in r["backward"]
    assert {"fwd_vs_inductor", "fwd_bwd_vs_inductor", "copy_gb_per_s"} <= set(r["comparison"])


def test_real_run(runs: dict[str, Any]) -> None:
    r = result(runs, "real_run")
    res = r["result"]
    assert res["steps"] == 12 and res["tokens_per_s"] > 0 and res["bleu_weights"] == "EMA"
    assert {"val_loss", "bleu", "bleu_signature", "checkpoint"} <= set(res)
    assert [m["step"] for m in r["loss_curve"]] == [4, 8, 12]
    assert r["params"]["six_layer_variant"]["n_layers"] == 6


def test_ablation(runs: dict[str, Any]) -> None:
    r = result(runs, "ablation")
    assert set(r["results"]) == {"rope", "sinusoid", "no_label_smoothing", "six_layers"}
    for row in r["results"].values():
        assert row["steps"] == 8 and row["ndd"] is not None and row["curve"]
    assert r["bleu_vs_rope"]["rope"] == 0
    six, rope = r["results"]["six_layers"], r["results"]["rope"]
    assert six["params_non_embedding"] > rope["params_non_embedding"]  # tiny has 2 layers


def test_real_run_describe_has_report_counts(runs: dict[str, Any]) -> None:
    r = result(runs, "real_run_describe")
    assert "result" not in r and r["describe"]
    assert r["params"]["configured"]["non_embedding"] > 0


def test_decode(runs: dict[str, Any]) -> None:
    r = result(runs, "decode")
    for mode in ("cached", "cached_eager", "uncached"):
        assert r[mode]["eval_s"] > 0 and r[mode]["decode_s"] > 0
    assert r["cached"]["bleu"] == r["cached_eager"]["bleu"] == r["uncached"]["bleu"]
    assert r["comparison"]["identical_hypotheses"] == "16/16"
    assert 0 < r["trial"]["eval_fraction_of_trial"] < 1
    assert {"cache_speedup_met", "eval_fraction_met"} <= set(r["verdict"])


def test_storage_overhead(runs: dict[str, Any]) -> None:
    r = result(runs, "storage_overhead")
    variants = {(c["variant"], c["workers"]) for c in r["concurrency"]}
    assert {("plain", 1), ("ours", 1), ("worker_loop", 1), ("plain", 2), ("ours", 2)} <= variants
    assert all(c["trials"] >= 8 for c in r["concurrency"] if c["variant"] != "worker_loop")
    assert set(r["ratio_ours_vs_plain"]) == {"1", "2"}
    assert {a["study_trials"] for a in r["ask_latency"]} == {20, 60}
    assert all(a["ask_ms"] > 0 for a in r["ask_latency"])
    assert "met" in r["verdict"]


def test_idle(runs: dict[str, Any]) -> None:
    r = result(runs, "idle")
    assert r["trial_states"] == ["COMPLETE"] * 3
    assert [g["trials"] for g in r["gaps"]] == [[0, 1], [1, 2]]
    for g in r["gaps"]:
        parts = g["after_fit_s"] + g["between_trials_s"] + g["before_fit_s"] + g["fit_setup_s"]
        assert g["idle_s"] == pytest.approx(parts, abs=0.01)
    assert r["verdict"]["max_idle_s"] is not None


def test_pruning(runs: dict[str, Any]) -> None:
    r = result(runs, "pruning")
    seed = r["per_seed"][0]
    assert set(seed["trials"]) == {"hyperband", "none"}
    assert all(len(rows) == 3 for rows in seed["trials"].values())
    assert seed["summary"]["best_bleu"] is not None
    assert {"target_ratio", "ratio_cpu_s_to_target", "met"} <= set(r["verdict"])
    assert "oracle" in seed["summary"] and "oracle" in r["pooled"]


def test_pruning_oracle_bound() -> None:
    """The all-knowing pruner stops every trial before the first one reaching the target at
    eval k (k / evals of its compute) and runs that one in full."""
    from bench.pruning import oracle, pooled_oracle

    rows = [{"state": "COMPLETE", "bleu": b, "evals": 6, "cpu_s": c}
            for b, c in [(10.0, 6.0), (20.0, 12.0), (50.0, 6.0), (60.0, 6.0)]]
    o = oracle(rows, 49.5, spent=24.0)
    assert o["cpu_s_at_eval"][2] == 12.0  # 6 * 2/6 + 12 * 2/6 + 6 in full
    assert o["ratio_at_eval"][6] == 1.0 and o["ratio_at_eval"][3] == 0.625
    assert oracle(rows, 70.0, spent=None)["ratio_at_eval"] is None
    seed = {"seed": 1, "summary": {"oracle": o, "none": {"cpu_s_to_target": 24.0}}}
    missed = {"seed": 2, "summary": {"oracle": oracle(rows, 70.0, None),
                                     "none": {"cpu_s_to_target": None}}}
    pooled = pooled_oracle([seed, seed, missed])
    assert pooled["ratio_at_eval"][2] == 0.5 and pooled["seeds"] == [1, 1]


def test_pruning_replay_merge() -> None:
    """The unpruned counterpart keeps the trials that finished, puts each pruned one's
    full-budget re-run in its place, and stops at the first pruned trial not re-run."""
    from bench.pruning import merge_replay, summarise

    def row(n: int, state: str, bleu: float, wall: float) -> dict[str, Any]:
        return {"number": n, "state": state, "bleu": bleu, "evals": 6 if state == "COMPLETE"
                else 1, "cpu_s": wall, "wall_s": wall, "params": {"x": n}, "curve": None}

    hb = [row(0, "COMPLETE", 5.0, 60.0), row(1, "PRUNED", 1.0, 10.0), row(2, "COMPLETE", 9.0,
          60.0), row(3, "PRUNED", 0.5, 10.0), row(4, "PRUNED", 0.2, 10.0)]
    cal = {**row(0, "COMPLETE", 5.0, 50.0)}
    new = [cal, row(1, "COMPLETE", 3.0, 60.0), row(2, "COMPLETE", 9.5, 60.0)]
    new[2]["params"] = {"x": 3}  # trial 3's re-run (replay numbers differ); 4: not re-run
    merged, got = merge_replay(hb, hb[0], new)
    assert got is cal
    assert [(r["number"], r["bleu"], r.get("replayed", False)) for r in merged] == [
        (0, 5.0, False), (1, 3.0, True), (2, 9.0, False), (3, 9.5, True)]
    s = summarise({"hyperband": hb, "none": merged}, 0.5, "wall_s")
    assert s["target_bleu"] == 9.0  # the replay found a better trial than Hyperband kept
    assert s["hyperband"]["wall_s_to_target"] == 130.0 and s["none"]["wall_s_to_target"] == 180.0
    assert merge_replay(hb, hb[0], [])[0] == hb[:1]


def test_pruning_simulate() -> None:
    """The pruner replayed on recorded curves: a trial stopped at eval k costs its set-up plus
    the fit's elapsed seconds at eval k; the others keep their recorded cost."""
    import optuna

    from bench.pruning import simulate

    def row(n: int, curve: list[float]) -> dict[str, Any]:
        return {"number": n, "state": "COMPLETE", "bleu": curve[-1], "evals": 3, "wall_s": 35.0,
                "cpu_s": 35.0, "params": {}, "curve": {"bleu": curve,
                                                        "elapsed_s": [10.0, 20.0, 30.0]}}

    rows = [row(0, [5.0, 6.0, 7.0]), row(1, [4.0, 5.0, 6.0]), row(2, [1.0, 1.0, 1.0])]
    out = simulate(rows, optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
                   "sim")
    assert [r["state"] for r in out] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert [r["wall_s"] for r in out] == [35.0, 15.0, 15.0]  # 5 s set-up + 10 s to eval 1
    assert out[1]["bleu"] == 4.0 and out[1]["evals"] == 1


def test_scaling(runs: dict[str, Any]) -> None:
    r = result(runs, "scaling")
    assert [run["workers"] for run in r["runs"]] == [1, 2]
    for run in r["runs"]:
        assert run["finished"] == 2 and run["trial_steps"] == 4 and run["trial_steps_per_hour"]
    assert "scaling_2" in r["verdict"] and "scaling_2_met" not in r["verdict"]  # CPU: no target


def test_pruning_signal_ranks_the_unpruned_trials() -> None:
    """Spearman's rho of each eval's BLEU-4 (and -val loss) against the final BLEU-4."""
    from bench.pruning import signal, spearman

    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == 0.949  # scipy.stats.spearmanr: 0.9487
    assert spearman([0, 0, 0], [1, 2, 3]) is None
    rows = [{"state": "COMPLETE", "bleu": final,
             "curve": {"step": [10, 20], "bleu": [early, final], "val_loss": [loss, loss]}}
            for final, early, loss in [(5.0, 3.0, 2.0), (9.0, 1.0, 1.5), (7.0, 2.0, 1.8)]]
    s = signal(rows + [{"state": "PRUNED", "bleu": None, "curve": None}])
    assert s["trials"] == 3 and s["step"] == [10, 20]
    assert s["rho_bleu"] == [-1.0, 1.0] and s["rho_val_loss"] == [1.0, 1.0]
