"""`amt-search dashboard`: loopback by default, and what a person sees in a real browser.

The browser test makes a study on the real PostgreSQL ($TEST_DB_URL, default 127.0.0.1:5432;
a fresh database, dropped afterwards) with complete and pruned trials whose intermediate values
are BLEU-4 numbers, starts `amt-search dashboard` on it, and reads the pages in Debian's
headless Chromium through Playwright. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest

from search import cli, deploy

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
ADMIN_URL = os.environ.get("TEST_DB_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EVAL_EVERY = 500
# trial number -> (layers, hidden, peak LR), BLEU-4 after each eval; the short curves are pruned
TRIALS: dict[int, tuple[tuple[int, int, float], list[float]]] = {
    0: ((12, 768, 2e-4), [11.21, 19.84, 24.37, 27.93]),
    1: ((16, 768, 1e-4), [9.87, 16.42]),
    2: ((12, 512, 3e-4), [12.05, 20.66, 25.18, 28.41]),
    3: ((6, 512, 5e-4), [7.13]),
}
FULL_EVALS = 4


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::", "dashboard.example.com"])
def test_refuses_non_loopback_without_allow_public(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["dashboard", "--host", host, "--storage", "postgresql://u:p@db/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("amt-search: error: refusing to serve optuna-dashboard")
    assert "--allow-public" in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert deploy.is_loopback(host)


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the test server; dropped afterwards."""
    name = f"amt_dash_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(ADMIN_URL, connect_timeout=10)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
        yield f"{base}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def make_study(url: str, name: str) -> int:
    """The study with TRIALS: complete ones tell their last BLEU-4, the others are pruned."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    for (layers, hidden, lr), bleu in TRIALS.values():
        study.enqueue_trial({"model.n_layers": layers, "model.d_model": hidden, "optim.lr": lr})
        trial = study.ask()
        trial.suggest_int("model.n_layers", 6, 16)
        trial.suggest_categorical("model.d_model", [512, 768])
        trial.suggest_float("optim.lr", 5e-5, 1e-3, log=True)
        for i, value in enumerate(bleu):
            trial.report(value, (i + 1) * EVAL_EVERY)
        if len(bleu) == FULL_EVALS:
            study.tell(trial, bleu[-1])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return study._storage.get_study_id_from_name(name)


@pytest.fixture
def dashboard(fresh_database: str) -> Iterator[tuple[str, str, int]]:
    """(base URL, study name, study id) of `amt-search dashboard` on a study with TRIALS."""
    study_name = f"amt-dash-{uuid.uuid4().hex[:6]}"
    study_id = make_study(fresh_database, study_name)
    command = [sys.executable, "-m", "search.cli", "dashboard"]
    command += ["--storage", fresh_database, "--port", "0"]
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
    try:
        url = _wait_for_url(proc, lines)
        yield url.removesuffix("/dashboard"), study_name, study_id
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


def _wait_for_url(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> str:
    seen = []
    while True:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            pytest.fail(f"amt-search dashboard printed no URL in 60 s: {''.join(seen)}")
        seen.append(line)
        if line.strip().startswith("http://127.0.0.1:"):
            return line.strip()
        if proc.poll() is not None and lines.empty():
            pytest.fail(f"amt-search dashboard exited {proc.returncode}: {''.join(seen)}")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_dashboard_in_headless_chromium(dashboard: tuple[str, str, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, study_name, study_id = dashboard
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)

            page.goto(f"{base}/dashboard")
            expect(page.get_by_text(study_name)).to_be_visible()

            page.goto(f"{base}/dashboard/studies/{study_id}")
            expect(page.get_by_text(f"{study_name} (id={study_id})")).to_be_visible()
            expect(page.get_by_text("Intermediate values", exact=True)).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "dashboard-study.png"), full_page=True)

            page.goto(f"{base}/dashboard/studies/{study_id}/trials")
            expect(page.get_by_text(f"{len(TRIALS)} Trials")).to_be_visible()
            for number, ((layers, hidden, _), bleu) in TRIALS.items():
                page.get_by_text(f"Trial {number}", exact=True).click()
                detail = page.locator("main, body").last
                expect(detail).to_contain_text(f"Trial {number} (trial_id=")
                state = "Complete" if len(bleu) == FULL_EVALS else "Pruned"
                expect(detail).to_contain_text(state)
                for i, value in enumerate(bleu):  # the intermediate BLEU-4 values, step by step
                    expect(detail).to_contain_text(f"{(i + 1) * EVAL_EVERY} {value}")
                expect(detail).to_contain_text(f"model.n_layers {layers}")
                expect(detail).to_contain_text(f"model.d_model {hidden}")
            page.get_by_text("Trial 1", exact=True).click()  # a pruned trial, for the picture
            expect(page.locator("body")).to_contain_text("Trial 1 (trial_id=")
            page.screenshot(path=str(ARTIFACTS / "dashboard-trials.png"), full_page=True)
        finally:
            browser.close()
