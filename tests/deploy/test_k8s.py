"""The Kubernetes manifests under k8s/: they parse and have the structure the service needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
SECRET = "amt-postgres"
CONFIG_MAP = "amt-search"


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path.name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path.name
    return docs


def kustomization() -> dict[str, Any]:
    (doc,) = documents(K8S / "kustomization.yaml")
    return doc


def applied() -> list[dict[str, Any]]:
    """Every object `kubectl apply -k k8s/` creates."""
    return [doc for name in kustomization()["resources"] for doc in documents(K8S / name)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in applied() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}"
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    (match,) = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    return match


def env_names(c: dict[str, Any]) -> list[str]:
    return [e["name"] for e in c.get("env", [])]


def test_every_manifest_parses_and_kustomization_lists_them() -> None:
    files = {p.name for p in K8S.glob("*.yaml")}
    listed = set(kustomization()["resources"])
    assert listed == files - {"kustomization.yaml", "secret.example.yaml"}
    for name in files:
        documents(K8S / name)
    assert {i["name"] for i in kustomization()["images"]} == {"amt-search"}


@pytest.mark.parametrize("version", ["1.28.0", "latest"])
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Strict OpenAPI-schema validation (unknown fields rejected), when kubernetes-validate is
    installed (PyPI; it bundles the schemas, no cluster needed)."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    desired = kv.latest_version() if version == "latest" else version
    objects = applied() + documents(K8S / "secret.example.yaml")
    for obj in objects:
        kv.validate(obj, desired, strict=True)


def test_postgres_statefulset_with_persistent_volume_claim_and_service() -> None:
    sts = find("StatefulSet", "amt-postgres")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    pg = container(sts, "postgres")
    assert pg["image"].startswith("postgres:16")
    mounts = {m["name"]: m["mountPath"] for m in pg["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/lib/postgresql/data"
    pgdata = {e["name"]: e.get("value") for e in pg["env"]}["PGDATA"]
    assert pgdata.startswith("/var/lib/postgresql/data/")  # a subdirectory of the volume
    assert pg["envFrom"] == [{"secretRef": {"name": SECRET}}]
    assert "pg_isready" in " ".join(pg["readinessProbe"]["exec"]["command"])

    svc = find("Service", "amt-postgres")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [5432]


def test_secret_is_a_documented_placeholder_with_every_key_used() -> None:
    (secret,) = documents(K8S / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET
    assert secret["stringData"]["POSTGRES_PASSWORD"] == "REPLACE-ME"
    assert (
        "kubectl create secret generic amt-postgres" in (K8S / "secret.example.yaml").read_text()
    )
    used = set()
    for obj in applied():
        if obj["kind"] in ("Job", "Deployment", "StatefulSet"):
            spec = pod_spec(obj)
            for c in spec.get("initContainers", []) + spec["containers"]:
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == SECRET
                        used.add(ref["key"])
    assert used == set(secret["stringData"])


def test_study_creator_job() -> None:
    job = find("Job", "amt-study-creator")
    assert pod_spec(job)["restartPolicy"] == "OnFailure"
    (wait,) = pod_spec(job)["initContainers"]
    assert "pg_isready" in " ".join(wait["command"])
    c = container(job, "study-creator")
    assert c["image"].startswith("amt-search")
    assert c["args"][0] == "create-study" and "--skip-if-exists" in c["args"]
    assert "AMT_STORAGE_URL" in env_names(c)


@pytest.mark.parametrize("kind,name", [("Job", "amt-worker"), ("Deployment", "amt-dashboard")])
def test_storage_url_is_built_from_the_secret(kind: str, name: str) -> None:
    c = pod_spec(find(kind, name))["containers"][0]
    names = env_names(c)
    url = next(e["value"] for e in c["env"] if e["name"] == "AMT_STORAGE_URL")
    for var in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert f"$({var})" in url
        assert names.index(var) < names.index("AMT_STORAGE_URL")  # defined before use
    assert "@amt-postgres:5432/" in url


def test_worker_job_one_gpu_per_pod() -> None:
    job = find("Job", "amt-worker")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["parallelism"] == job["spec"]["completions"] >= 1
    spec = pod_spec(job)
    c = container(job, "worker")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"].get("requests", {}).get("nvidia.com/gpu", 1) == 1
    assert c["args"][:2] == ["worker", "--study"]
    assert c["args"][c["args"].index("--gpu") + 1] == "0"
    index = next(e for e in c["env"] if e["name"] == "AMT_WORKER_INDEX")
    assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]
    (wait,) = spec["initContainers"]
    assert "studies" in " ".join(wait["command"])  # waits for the study-creator's study
    assert spec["terminationGracePeriodSeconds"] >= 60
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_dashboard_deployment_and_cluster_ip_service() -> None:
    dep = find("Deployment", "amt-dashboard")
    c = container(dep, "dashboard")
    assert c["args"][0] == "dashboard"
    assert c["readinessProbe"]["httpGet"]["path"] == "/api/meta"
    svc = find("Service", "amt-dashboard")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == dep["spec"]["template"]["metadata"]["labels"]
    # no way in from outside the cluster: no Ingress, NodePort or LoadBalancer anywhere
    for obj in applied():
        assert obj["kind"] != "Ingress"
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
