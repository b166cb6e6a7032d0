"""Self-hosting files: each is checked by the tool that will read it where one runs here
(docker-compose v1, caddy, systemd-analyze, turnserver's own config check lives in test_turn.py),
and by the properties the design requires (hardening, probes, no secret in the repository)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import load_config
from broker.config_check import check_config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
CADDYFILE = DEPLOY / "Caddyfile"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "systemd" / "broker.service"
TURN_CONF = DEPLOY / "coturn" / "turnserver.conf"
ENTRYPOINT = DEPLOY / "coturn" / "entrypoint.sh"
DOCS = REPO / "docs" / "deploy.md"
JANUS = DEPLOY / "janus"
JANUS_ENTRYPOINT = JANUS / "entrypoint.sh"


# --------------------------------------------------------------------------- docker-compose


#: Stand-ins for the three values Janus and the broker share (each a different one, to tell them apart).
JANUS_DUMMIES = {
    "api_secret": "dummy-janus-api-secret-" + "a" * 16,
    "admin_secret": "dummy-janus-admin-secret-" + "b" * 16,
    "room_admin_key": "dummy-janus-room-admin-key-" + "c" * 16,
}


def _required_compose_vars() -> list[str]:
    """Every ${VAR:?message} in the compose file: compose must refuse to run without each."""
    return sorted(set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text())))


@pytest.fixture
def compose_env(tmp_path: Path) -> dict[str, str]:
    """A minimal environment with dummy values (and dummy secret files) for every required variable."""
    server_secret, turn_secret = tmp_path / "server.secret", tmp_path / "turn.secret"
    server_secret.write_text("dummy-server-secret\n")
    turn_secret.write_text("dummy-turn-secret\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    dummies = {
        "BROKER_DOMAIN": "video.example.org",
        "ACME_EMAIL": "admin@example.org",
        "REDIS_PASSWORD": "0123abcd",
        "SERVER_SECRET_FILE": str(server_secret),
        "TURN_SECRET_FILE": str(turn_secret),
        "JANUS_API_SECRET": JANUS_DUMMIES["api_secret"],
        "JANUS_ADMIN_SECRET": JANUS_DUMMIES["admin_secret"],
        "JANUS_ROOM_ADMIN_KEY": JANUS_DUMMIES["room_admin_key"],
        "JANUS_PUBLIC_IP": "203.0.113.7",
    }
    assert set(_required_compose_vars()) == set(dummies), "update the dummies to the compose file's required values"
    env.update(dummies)
    return env


def _compose(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("docker-compose"), "docker-compose (Debian package docker-compose) is required"
    empty_env_file = tmp_path / "empty.env"  # a developer's deploy/.env must not fill in the gaps
    empty_env_file.write_text("")
    command = ["docker-compose", "--env-file", str(empty_env_file), "-f", str(COMPOSE), *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def test_compose_file_validates_with_required_values(compose_env: dict[str, str], tmp_path: Path) -> None:
    result = _compose(compose_env, tmp_path, "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "missing",
    [
        "BROKER_DOMAIN",
        "ACME_EMAIL",
        "REDIS_PASSWORD",
        "SERVER_SECRET_FILE",
        "TURN_SECRET_FILE",
        "JANUS_API_SECRET",
        "JANUS_ADMIN_SECRET",
        "JANUS_ROOM_ADMIN_KEY",
        "JANUS_PUBLIC_IP",
    ],
)
def test_compose_refuses_to_run_without_a_required_value(
    missing: str, compose_env: dict[str, str], tmp_path: Path
) -> None:
    del compose_env[missing]
    result = _compose(compose_env, tmp_path, "config", "-q")
    assert result.returncode != 0
    assert missing in result.stderr


@pytest.fixture
def compose_config(compose_env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """The compose file as docker-compose resolves it (anchors merged, values interpolated)."""
    result = _compose(compose_env, tmp_path, "config")
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def test_compose_runs_two_hardened_brokers_on_redis(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert {"broker1", "broker2", "redis", "coturn", "caddy"} <= set(services)
    for name in ("broker1", "broker2"):
        broker = services[name]
        env = broker["environment"]
        assert env["BROKER_REDIS_URL"].startswith("redis://") and "@redis:6379" in env["BROKER_REDIS_URL"]
        assert env["BROKER_PUBLIC_URL"] == "https://video.example.org"
        assert env["BROKER_SECRET_FILE"].startswith("/run/secrets/")
        assert env["BROKER_TURN_SECRET_FILE"].startswith("/run/secrets/")
        assert env["BROKER_TRUST_PROXY"] == "true"
        assert broker["read_only"] is True
        assert any(str(entry).startswith("/tmp") for entry in broker["tmpfs"])
        assert broker["cap_drop"] == ["ALL"]
        assert "ports" not in broker, "brokers are reached through Caddy only"
    for service in services.values():
        assert service.get("read_only") is True
        assert "no-new-privileges:true" in service.get("security_opt", [])


def test_compose_session_redis_persists_on_its_own_volume_and_is_private(compose_config: dict[str, Any]) -> None:
    """Scheduled and live sessions outlive a restart of Redis: an append-only file, fsynced every
    second, on a volume (tests/store/test_redis_outage.py restarts a Redis run with these options)."""
    redis = compose_config["services"]["redis"]
    command = " ".join(redis["entrypoint"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command and "--dir /data" in command
    assert any(
        str(v).startswith("session-redis:/data") or (isinstance(v, dict) and v.get("source") == "session-redis")
        for v in redis["volumes"]
    )
    assert not any(str(entry).startswith("/data") for entry in redis.get("tmpfs", []))
    assert "requirepass" in command
    assert "ports" not in redis
    assert redis["networks"] == {"back": None} or list(redis["networks"]) == ["back"]
    assert compose_config["networks"]["back"].get("internal") is True


def test_compose_secrets_come_from_files_outside_the_repository(compose_config: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    for name, spec in raw["secrets"].items():
        assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", spec["file"]), name
    coturn = compose_config["services"]["coturn"]
    assert any(entry["source"] == "turn_secret" for entry in coturn["secrets"])
    assert any("turnserver.conf" in str(volume) for volume in coturn["volumes"])


# --------------------------------------------------------------------------- Caddy


def test_caddyfile_proxies_to_both_brokers_with_health_checks() -> None:
    text = CADDYFILE.read_text()
    assert "{$BROKER_DOMAIN}" in text
    assert re.search(r"reverse_proxy\s+broker1:8080\s+broker2:8080", text)
    assert re.search(r"lb_policy\s+\S+", text)
    assert not re.search(r"^\s*log\b", text, re.MULTILINE), "no access log: it would record client addresses"


def _seconds(text: str) -> float:
    """A Caddy duration such as ``2s`` or ``1500ms``."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", text)
    assert match, text
    return float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)


def test_caddy_health_checks_readiness_and_drops_a_hung_broker_before_its_peers_give_up() -> None:
    """The load balancer asks /readyz (answering, store reachable, not shutting down), not /healthz, and takes a
    broker that stops answering out of rotation (interval + timeout) before its peers, after 5 s of silence,
    reconnect through it (broker/client/broker_client.py SILENCE_LIMIT_S, web/js/protocol.js)."""
    from broker.client.broker_client import SILENCE_LIMIT_S

    text = CADDYFILE.read_text()
    assert re.search(r"^\s*health_uri\s+/readyz\s*$", text, re.MULTILINE)
    interval = re.search(r"^\s*health_interval\s+(\S+)\s*$", text, re.MULTILINE)
    timeout = re.search(r"^\s*health_timeout\s+(\S+)\s*$", text, re.MULTILINE)
    assert interval and timeout
    assert _seconds(timeout.group(1)) > 1.0, "/readyz gives its store 1 s: a slow store must not read as a dead broker"
    assert _seconds(interval.group(1)) + _seconds(timeout.group(1)) < SILENCE_LIMIT_S
    page_limit = re.search(r"const SILENCE_LIMIT_MS = (\d+);", (REPO / "web/js/protocol.js").read_text())
    assert page_limit and int(page_limit.group(1)) == SILENCE_LIMIT_S * 1000


def test_kubernetes_readiness_drops_a_hung_broker_before_its_peers_give_up(k8s_objects: list[dict[str, Any]]) -> None:
    from broker.client.broker_client import SILENCE_LIMIT_S

    (container,) = _object(k8s_objects, "Deployment", "broker")["spec"]["template"]["spec"]["containers"]
    probe = container["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"
    worst = probe["periodSeconds"] * probe.get("failureThreshold", 3) + probe["timeoutSeconds"]
    assert worst < SILENCE_LIMIT_S, "a hung broker must leave the Service before its peers reconnect"
    assert probe["timeoutSeconds"] > 1, "/readyz gives its store 1 s"


async def test_caddy_as_shipped_sends_no_request_to_a_broker_that_is_not_ready(tmp_path: Path) -> None:
    """Real Caddy with deploy/Caddyfile's proxy block in front of two real brokers: A loses its store (its
    /healthz still answers 200, its /readyz 503). Within one health check Caddy sends everything to B."""
    import aiohttp

    from tests.balanced_brokers import Caddy
    from tests.redis_server import RedisServer, free_port
    from tests.store.test_redis_cluster import BrokerProcess

    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = RedisServer(free_port(), redis_dir)
    redis.start()
    env = {**_clean_env(), "BROKER_LOG_LEVEL": "warning", "PYTHONPATH": str(REPO)}
    brokers = []
    for name, extra in (("a", {"BROKER_REDIS_URL": redis.url}), ("b", {})):
        data_dir = tmp_path / f"data-{name}"
        data_dir.mkdir(mode=0o700)
        brokers.append(BrokerProcess(name, free_port(), data_dir, {**env, **extra}))
    caddy = Caddy(free_port(), tmp_path)
    try:
        for broker in brokers:
            broker.start()
        for broker in brokers:
            await broker.wait_ready()
        caddy.start([b.port for b in brokers])
        redis.stop()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(brokers[0].url + "/healthz") as alive, http.get(brokers[0].url + "/readyz") as ready:
                assert (alive.status, ready.status) == (200, 503)
            await asyncio.sleep(4)  # one health check (interval + timeout, 3.5 s) has seen A unready
            statuses = []
            for _ in range(20):
                async with http.get(caddy.url + "/readyz") as response:
                    statuses.append(response.status)
        assert statuses == [200] * 20, "Caddy sent requests to the broker that is not ready"
    finally:
        caddy.stop()
        for broker in brokers:
            broker.stop()
        redis.stop()


def test_caddyfile_is_valid_for_caddy(tmp_path: Path) -> None:
    assert shutil.which("caddy"), "caddy (Debian package caddy) is required to validate the Caddyfile"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "XDG_DATA_HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path),
        "BROKER_DOMAIN": "video.example.org",
        "ACME_EMAIL": "admin@example.org",
    }
    command = ["caddy", "validate", "--config", str(CADDYFILE), "--adapter", "caddyfile"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


# --------------------------------------------------------------------------- Kubernetes


def _k8s_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


def _manifest_files() -> list[Path]:
    return sorted(
        p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
    )


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    """Every object the kustomization applies."""
    return [doc for name in _kustomization()["resources"] for doc in _k8s_documents(K8S / name)]


def _generator(name: str) -> dict[str, Any]:
    (found,) = [g for g in _kustomization()["configMapGenerator"] if g["name"] == name]
    return dict(found)


def _object(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}"
    return found[0]


def _pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}:
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def test_every_kubernetes_yaml_parses_and_has_kind_and_api_version() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert files
    for path in files:
        documents = _k8s_documents(path)
        assert documents, path
        for doc in documents:
            assert doc.get("apiVersion") and doc.get("kind"), path


def test_kustomization_lists_exactly_the_manifests_that_exist() -> None:
    kustomization = _kustomization()
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert all((K8S / name).is_file() for name in listed)
    assert sorted(listed) == sorted(p.name for p in _manifest_files())
    assert "secret.example.yaml" not in listed
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        for entry in generator.get("files", []):
            assert (K8S / entry.split("=")[-1]).is_file(), entry


def test_kustomize_coturn_copies_match_deploy_coturn() -> None:
    for name in ("turnserver.conf", "entrypoint.sh"):
        assert (K8S / "coturn" / name).read_bytes() == (DEPLOY / "coturn" / name).read_bytes(), name


def test_broker_deployment_replicas_probes_resources_security(k8s_objects: list[dict[str, Any]]) -> None:
    deployment = _object(k8s_objects, "Deployment", "broker")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {item["name"]: item for item in container["env"]}
    assert "BROKER_REDIS_URL" in env
    literals = dict(x.split("=", 1) for x in _generator("broker-config")["literals"])
    assert literals["BROKER_TRUST_PROXY"] == "true"

    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "broker-secrets"


def test_every_pod_has_resources_and_a_locked_down_security_context(k8s_objects: list[dict[str, Any]]) -> None:
    pods = dict(_pod_specs(k8s_objects))
    assert {"broker", "redis", "coturn"} <= set(pods)
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"] + pod.get("initContainers", []):
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), (name, part)
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name


def test_pdb_hpa_service_and_ingress_point_at_the_broker(k8s_objects: list[dict[str, Any]]) -> None:
    labels = _object(k8s_objects, "Deployment", "broker")["spec"]["template"]["metadata"]["labels"]
    pdb = _object(k8s_objects, "PodDisruptionBudget", "broker")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _object(k8s_objects, "HorizontalPodAutoscaler", "broker")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "broker"}
    assert hpa["spec"]["minReplicas"] >= 2
    service = _object(k8s_objects, "Service", "broker")
    assert service["spec"]["selector"].items() <= labels.items()
    ingress = _object(k8s_objects, "Ingress", "broker")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    backends = [
        path["backend"]["service"]["name"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]
    ]
    assert set(backends) == {"broker", "janus-api"}, "the broker, and Janus's API at /janus (test_janus_route.py)"


def test_session_redis_on_kubernetes_persists_on_a_claimed_volume(k8s_objects: list[dict[str, Any]]) -> None:
    """The same persistence as in compose: AOF fsynced every second, on a volume claim of its own."""
    stateful = _object(k8s_objects, "StatefulSet", "redis")
    pod = stateful["spec"]["template"]["spec"]
    command = " ".join(pod["containers"][0]["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command and "--dir /data" in command
    claim = stateful["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/data"] == claim
    assert all(volume["name"] != claim for volume in pod["volumes"])  # not an emptyDir in its place


def test_accounts_redis_persists_and_only_brokers_reach_it(k8s_objects: list[dict[str, Any]]) -> None:
    """Accounts are durable: their Redis keeps an append-only file on a claimed volume."""
    stateful = _object(k8s_objects, "StatefulSet", "redis-accounts")
    command = " ".join(stateful["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "--appendonly yes" in command and "--dir /data" in command
    assert stateful["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "accounts"
    policy = _object(k8s_objects, "NetworkPolicy", "redis-accounts-from-broker-only")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "redis-accounts"}
    container = _object(k8s_objects, "Deployment", "broker")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["BROKER_ACCOUNTS_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis-accounts:6379/0"


def test_compose_accounts_redis_persists_on_its_own_volume(compose_config: dict[str, Any]) -> None:
    redis = compose_config["services"]["redis-accounts"]
    command = " ".join(redis["entrypoint"])
    assert "--appendonly yes" in command and "--dir /data" in command
    assert any(
        str(v).startswith("accounts-redis:") or (isinstance(v, dict) and v.get("source") == "accounts-redis")
        for v in redis["volumes"]
    )
    assert "ports" not in redis and list(redis["networks"]) == ["back"]
    env = compose_config["services"]["broker1"]["environment"]
    assert "@redis-accounts:6379" in env["BROKER_ACCOUNTS_REDIS_URL"]


def test_coturn_on_kubernetes_uses_the_production_config(k8s_objects: list[dict[str, Any]]) -> None:
    pod = dict(_pod_specs(k8s_objects))["coturn"]
    assert pod["hostNetwork"] is True
    assert pod["containers"][0]["command"] == ["sh", "/etc/coturn/entrypoint.sh"]
    assert "coturn/turnserver.conf" in _generator("coturn-files")["files"]


def test_secrets_are_referenced_but_not_committed(k8s_objects: list[dict[str, Any]]) -> None:
    assert not [o for o in k8s_objects if o["kind"] == "Secret"], "real Secrets are created out of band"
    referenced = set()
    for _, pod in _pod_specs(k8s_objects):
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                referenced.add(volume["secret"]["secretName"])
        for container in pod["containers"]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(ref["name"])
    examples = {doc["metadata"]["name"]: doc for doc in _k8s_documents(K8S / "secret.example.yaml")}
    assert referenced == set(examples)
    for doc in examples.values():
        assert all(value.startswith("REPLACE_WITH_") for value in doc["stringData"].values())
        assert "data" not in doc


# --------------------------------------------------------------------------- no secret in the repository

_SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])"),
    re.compile(r"^\s*static-auth-secret\s*=", re.MULTILINE),
    re.compile(r"^\s*cli-password\s*=", re.MULTILINE),
    re.compile(r"requirepass\s+[^\s'\"%$]"),
    re.compile(r"redis://[^:\s]*:(?![$]\{|[$]\()[^@\s]+@"),
    re.compile(r"(?i)^[ \t]*[A-Z_]*(PASSWORD|SECRET)[ \t]*=[ \t]*[^\s$/#]", re.MULTILINE),
]


def _deployment_texts() -> Iterator[tuple[Path, str]]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            yield path, path.read_text()
    yield DOCS, DOCS.read_text()


def test_no_secret_value_is_committed() -> None:
    for path, text in _deployment_texts():
        for pattern in _SECRET_PATTERNS:
            match = pattern.search(text)
            assert match is None, (
                f"{path.relative_to(REPO)}: looks like a secret: {match.group(0)[:40] if match else ''}"
            )


def test_the_secret_patterns_catch_what_they_are_for() -> None:
    leaked = [
        "static-auth-secret=hunter2",
        "requirepass hunter2",
        "BROKER_REDIS_URL: redis://:hunter2@redis:6379/0",
        "REDIS_PASSWORD=hunter2",
        "key: " + "ab" * 16,
    ]
    for text in leaked:
        assert any(p.search(text) for p in _SECRET_PATTERNS), text
    safe = ["redis://:${REDIS_PASSWORD:?x}@redis:6379/0", "redis://:$(REDIS_PASSWORD)@redis:6379/0", "REDIS_PASSWORD="]
    for text in safe:
        assert not any(p.search(text) for p in _SECRET_PATTERNS), text


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    rows = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def test_dockerfile_runs_unprivileged_with_a_python_healthcheck() -> None:
    rows = _dockerfile_instructions()
    froms = [rest for keyword, rest in rows if keyword == "FROM"]
    assert froms and all(rest.startswith("python:3.11-slim") for rest in froms)
    users = [rest for keyword, rest in rows if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    final_stage = rows[max(i for i, (k, _) in enumerate(rows) if k == "FROM") :]
    assert any(k == "USER" for k, _ in final_stage)
    healthcheck = " ".join(rest for keyword, rest in rows if keyword == "HEALTHCHECK")
    assert "/healthz" in healthcheck and '"python"' in healthcheck and "curl" not in healthcheck
    assert ("EXPOSE", "8080") in rows
    assert ("CMD", '["broker", "serve", "--host", "0.0.0.0"]') in rows
    copied = " ".join(rest for keyword, rest in rows if keyword == "COPY")
    for source in ("pyproject.toml", "README.md", "broker/", "web/"):
        assert source in copied


def _healthcheck_command() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    (rest,) = [rest for keyword, rest in _dockerfile_instructions() if keyword == "HEALTHCHECK"]
    command = json.loads(rest[rest.index("CMD") + 3 :].strip())
    assert isinstance(command, list) and all(isinstance(part, str) for part in command)
    return command


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(extra)
    return env


def test_dockerfile_healthcheck_command_against_a_real_broker(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data")]
    broker = subprocess.Popen(command, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    healthcheck = _healthcheck_command()
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run(healthcheck, env=_clean_env(BROKER_PORT=str(port)), timeout=10, check=False)
            if probe.returncode == 0:
                break
            assert broker.poll() is None, "the broker exited"
            assert time.monotonic() < deadline, "the broker never became healthy"
            time.sleep(0.2)
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    after = subprocess.run(
        healthcheck, env=_clean_env(BROKER_PORT=str(port)), capture_output=True, timeout=10, check=False
    )
    assert after.returncode != 0


# --------------------------------------------------------------------------- the broker accepts each deployment's settings


def _secret_files(tmp_path: Path) -> tuple[Path, Path]:
    server, turn = tmp_path / "server.secret", tmp_path / "turn.secret"
    for path in (server, turn):
        path.write_text(os.urandom(32).hex() + "\n")
        path.chmod(0o600)
    return server, turn


def _check_broker_settings(env: dict[str, str], tmp_path: Path) -> None:
    """Point container paths at local stand-ins, then ask the broker's own config check."""
    server, turn = _secret_files(tmp_path)
    env = dict(env)
    env["BROKER_DATA_DIR"] = str(tmp_path / "data")
    if "BROKER_SECRET_FILE" in env:
        env["BROKER_SECRET_FILE"] = str(server)
    if "BROKER_TURN_SECRET_FILE" in env:
        env["BROKER_TURN_SECRET_FILE"] = str(turn)
    config = load_config(env)
    assert check_config(config) == []
    assert config.trust_proxy is True
    assert config.base_url.startswith("https://")


def test_broker_accepts_the_compose_settings(compose_config: dict[str, Any], tmp_path: Path) -> None:
    env = {k: str(v) for k, v in compose_config["services"]["broker1"]["environment"].items()}
    _check_broker_settings(env, tmp_path)


def test_broker_accepts_the_kubernetes_settings(k8s_objects: list[dict[str, Any]], tmp_path: Path) -> None:
    env = dict(x.split("=", 1) for x in _generator("broker-config")["literals"])
    container = _object(k8s_objects, "Deployment", "broker")["spec"]["template"]["spec"]["containers"][0]
    values = {"REDIS_PASSWORD": "0123abcd"}
    for item in container["env"]:
        value = item.get("value")
        if value is not None:
            values[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], value)
        elif item["name"].startswith("BROKER_"):  # from broker-secrets: a stand-in value
            values[item["name"]] = "dummy-" + item["valueFrom"]["secretKeyRef"]["key"]
    env.update({k: v for k, v in values.items() if k.startswith("BROKER_")})
    assert env["BROKER_REDIS_URL"] == "redis://:0123abcd@redis:6379/0"
    _check_broker_settings(env, tmp_path)


def test_broker_accepts_the_systemd_settings(tmp_path: Path) -> None:
    env = dict(entry.split("=", 1) for entry in _unit_keys()["Environment"])
    env["BROKER_PUBLIC_URL"] = "https://video.example.org"  # from broker.env, which the admin writes
    _check_broker_settings(env, tmp_path)


# --------------------------------------------------------------------------- the admin socket

ADMIN_SOCKET = "/run/broker/admin/admin.sock"


def test_the_admin_socket_has_a_directory_of_its_own_in_every_deployment(
    compose_config: dict[str, Any], k8s_objects: list[dict[str, Any]]
) -> None:
    """Never in a shared /tmp (issue 25, finding 12): the socket's directory is one the broker makes
    itself (0700), inside a mount or directory of its own; the broker refuses a shared one."""
    rows = _dockerfile_instructions()
    assert f"BROKER_ADMIN_SOCKET_PATH={ADMIN_SOCKET}" in " ".join(rest for keyword, rest in rows if keyword == "ENV")
    installs = " ".join(rest for keyword, rest in rows if keyword == "RUN")
    assert re.search(r"install -d -o broker -g broker -m 0700 [^&]*/run/broker(\s|$)", installs)
    for name in ("broker1", "broker2"):
        service = compose_config["services"][name]
        assert service["environment"]["BROKER_ADMIN_SOCKET_PATH"] == ADMIN_SOCKET
        mounts = dict(str(entry).split(":", 1) for entry in service["tmpfs"])
        options = dict(option.split("=", 1) for option in mounts["/run/broker"].split(","))
        assert options["mode"] == "0700" and options["uid"] == options["gid"] == "10001"
    literals = dict(x.split("=", 1) for x in _generator("broker-config")["literals"])
    assert literals["BROKER_ADMIN_SOCKET_PATH"] == ADMIN_SOCKET
    pod = _object(k8s_objects, "Deployment", "broker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volume = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/run/broker"]
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[volume]
    # systemd: the default, DATA_DIR/run/admin.sock, inside the 0700 state directory (and a private /tmp anyway).
    keys = _unit_keys()
    env = dict(entry.split("=", 1) for entry in keys["Environment"])
    assert "BROKER_ADMIN_SOCKET_PATH" not in env and keys["StateDirectoryMode"] == ["0700"]
    assert load_config(env).admin_socket == Path(env["BROKER_DATA_DIR"]) / "run" / "admin.sock"
    for text in (DOCKERFILE.read_text(), COMPOSE.read_text(), (K8S / "kustomization.yaml").read_text()):
        assert "/tmp/broker-admin" not in text


# --------------------------------------------------------------------------- systemd


def _unit_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_systemd_unit_is_hardened() -> None:
    keys = _unit_keys()
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "DynamicUser": "yes",
        "StateDirectory": "teletherapy-broker",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
    }
    for key, value in expected.items():
        assert keys.get(key) == [value], key
    assert set(keys["RestrictAddressFamilies"][0].split()) <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    assert keys["CapabilityBoundingSet"] == [""]
    assert "BROKER_HOST=127.0.0.1" in keys["Environment"], "behind a reverse proxy: loopback only"
    assert "BROKER_TRUST_PROXY=true" in keys["Environment"]
    assert keys["ExecStart"][0].endswith("broker serve")


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a binary that exists here (verify checks it exists)."""
    unit = tmp_path / "teletherapy-broker.service"
    text = UNIT.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    unit.write_text(text.replace(exec_start, "ExecStart=/bin/true serve"))
    return unit


def test_systemd_unit_verifies_and_scores_well(verifiable_unit: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze (Debian package systemd) is required"
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(verifiable_unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(verifiable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert score, security.stdout[-500:] + security.stderr
    assert float(score.group(1)) <= 2.0, "systemd rates this unit's exposure higher than 2.0"


# --------------------------------------------------------------------------- coturn


def _turn_lines() -> list[tuple[str, str]]:
    rows = []
    for line in TURN_CONF.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            rows.append((key.strip(), value.strip()))
    return rows


def _denied_ranges() -> list[tuple[int, int, int]]:
    """(IP version, first, last) of every denied-peer-ip range, as integers."""
    ranges: list[tuple[int, int, int]] = []
    for key, value in _turn_lines():
        if key == "denied-peer-ip":
            low, _, high = value.partition("-")
            first, last = ipaddress.ip_address(low), ipaddress.ip_address(high or low)
            assert first.version == last.version and int(first) <= int(last), value
            ranges.append((first.version, int(first), int(last)))
    return ranges


def _network_denied(network: str) -> bool:
    """True when one denied-peer-ip range covers the whole network."""
    net = ipaddress.ip_network(network)
    first, last = int(net[0]), int(net[-1])
    return any(version == net.version and low <= first and last <= high for version, low, high in _denied_ranges())


@pytest.mark.parametrize(
    "network",
    [
        "127.0.0.0/8",  # loopback
        "10.0.0.0/8",  # RFC 1918
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",  # link-local
        "169.254.169.254/32",  # cloud metadata
        "100.64.0.0/10",  # CGNAT
        "0.0.0.0/8",
        "::1/128",  # IPv6 loopback
        "::ffff:0:0/96",  # IPv4-mapped
        "fc00::/7",  # unique local
        "fd00:ec2::254/128",  # cloud metadata over IPv6
        "fe80::/10",  # link-local
        "64:ff9b::/96",  # NAT64
    ],
)
def test_coturn_denies_peers_in(network: str) -> None:
    assert _network_denied(network), network


def test_coturn_still_relays_to_public_addresses() -> None:
    for public in ("8.8.8.8/32", "2a00:1450::1/128", "203.0.114.1/32"):
        assert not _network_denied(public), public


def test_coturn_production_options() -> None:
    keys = {key for key, _ in _turn_lines()}
    for option in (
        "use-auth-secret",
        "no-cli",
        "fingerprint",
        "realm",
        "no-tcp-relay",
        "no-multicast-peers",
        "stale-nonce",
    ):
        assert option in keys, option
    for forbidden in ("allow-loopback-peers", "static-auth-secret", "lt-cred-mech", "no-auth", "user", "cli-password"):
        assert forbidden not in keys, forbidden


def test_coturn_entrypoint_syntax_and_refusal_without_a_secret(tmp_path: Path) -> None:
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, check=False).returncode == 0
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TURN_CONFIG": str(TURN_CONF),
        "TURN_RUNTIME_DIR": str(tmp_path),
        "TURN_SECRET_FILE": str(tmp_path / "absent"),
        "TURN_REALM": "turn.example.org",
    }
    result = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 64
    assert "missing or empty" in result.stderr
    assert not (tmp_path / "turnserver.conf").exists()
    env["TURN_REALM"] = "bad realm; rm -rf /"
    result = subprocess.run(["sh", str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 64
    assert "TURN_REALM must be a host name" in result.stderr


# --------------------------------------------------------------------------- docs


def test_docs_and_env_example_name_every_required_compose_value() -> None:
    docs, example = DOCS.read_text(), (DEPLOY / "env.example").read_text()
    for name in _required_compose_vars():
        assert name in docs, name
        assert re.search(rf"^{name}=", example, re.MULTILINE), name
    assert "benchmarks/results.md" in docs


def test_every_kubernetes_manifest_validates_against_the_api_schemas() -> None:
    """kubernetes-validate (PyPI, bundled schemas, offline): strict, so a misspelt field fails too."""
    import glob

    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    checked = 0
    for path in sorted(glob.glob(str(Path(__file__).resolve().parent.parent / "deploy/k8s/*.yaml"))):
        if path.endswith("kustomization.yaml"):
            continue  # kustomize's own file, not a Kubernetes object
        for document in yaml.safe_load_all(Path(path).read_text()):
            if document:
                kubernetes_validate.validate(document, version, strict=True)
                checked += 1
    assert checked >= 12
    broken = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


# --------------------------------------------------------------------------- metrics (issue 35, item 2)

METRICS_PORT = 9464


def test_compose_brokers_serve_metrics_on_an_internal_network_only(compose_config: dict[str, Any]) -> None:
    """Prometheus reaches the brokers' metrics on an internal network; nothing publishes or proxies them."""
    services = compose_config["services"]
    for name in ("broker1", "broker2"):
        broker = services[name]
        assert broker["environment"]["BROKER_METRICS_ADDRESS"] == f"0.0.0.0:{METRICS_PORT}"
        assert "metrics" in broker["networks"]
        assert "ports" not in broker
    assert compose_config["networks"]["metrics"].get("internal") is True
    for name, service in services.items():
        if name not in ("broker1", "broker2", "prometheus"):
            assert "metrics" not in service.get("networks", {}), f"{name} must not reach the metrics port"
    assert str(METRICS_PORT) not in CADDYFILE.read_text()
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert all(str(p).startswith("127.0.0.1:") or (isinstance(p, dict) and p.get("host_ip") == "127.0.0.1")
               for p in prometheus["ports"])  # fmt: skip
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert sorted(job["static_configs"][0]["targets"]) == [f"broker1:{METRICS_PORT}", f"broker2:{METRICS_PORT}"]


def test_kubernetes_brokers_are_scraped_inside_the_cluster_only(k8s_objects: list[dict[str, Any]]) -> None:
    literals = dict(x.split("=", 1) for x in _generator("broker-config")["literals"])
    assert literals["BROKER_METRICS_ADDRESS"] == f"0.0.0.0:{METRICS_PORT}"
    template = _object(k8s_objects, "Deployment", "broker")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert ports == {"http": 8080, "metrics": METRICS_PORT}
    service = _object(k8s_objects, "Service", "broker")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"], "the Service carries no metrics"
    policy = _object(k8s_objects, "NetworkPolicy", "broker-metrics-from-monitoring-only")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    rules = policy["spec"]["ingress"]
    open_rules = [r for r in rules if "from" not in r]
    assert [p["port"] for r in open_rules for p in r["ports"]] == [8080], "only the signaling port is open to all"
    (scrape_rule,) = [r for r in rules if any(p["port"] == METRICS_PORT for p in r["ports"])]
    assert [list(peer) for peer in scrape_rule["from"]] == [["namespaceSelector"]]


# --------------------------------------------------------------------------- Janus (issue 22, point 6)

JANUS_API_PORT, JANUS_ADMIN_PORT = 8088, 7088
#: The only plugin and transport the broker needs (tests/janus_server.py loads the same two).
JANUS_KEEP = {"libjanus_videoroom.so", "libjanus_http.so"}
#: Where Debian's package puts Janus's modules (amd64, as on the test machines).
JANUS_MODULES = Path("/usr/lib/x86_64-linux-gnu/janus")


def _jcfg(path: Path) -> dict[str, dict[str, str]]:
    """A Janus .jcfg file read as text: ``group: { key = value }`` blocks, comments dropped, quotes removed."""
    groups: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if opened := re.fullmatch(r"(\w+)\s*:\s*\{", line):
            assert current is None, f"{path.name}: nested group {line}"
            current = groups.setdefault(opened.group(1), {})
        elif line == "}":
            assert current is not None, f"{path.name}: unbalanced }}"
            current = None
        else:
            setting = re.fullmatch(r"(\w+)\s*=\s*(.+)", line)
            assert setting and current is not None, f"{path.name}: unexpected line {line!r}"
            current[setting.group(1)] = setting.group(2).strip().strip('"')
    assert current is None, f"{path.name}: a group is not closed"
    return groups


def _rtp_range() -> tuple[int, int]:
    low, _, high = _jcfg(JANUS / "janus.jcfg")["media"]["rtp_port_range"].partition("-")
    return int(low), int(high)


#: What one practice's Janus must hold at once (issue 22): sessions of the largest size through Janus.
JANUS_CONCURRENT_LARGEST_SESSIONS, JANUS_LARGEST_SESSION = 8, 16


def _janus_ports_per_session(people: int) -> int:
    """Janus takes one port per peer connection; each participant publishes on one and receives every
    other participant on one, a multistream subscription (web/js/janus_room.js): 2 x N."""
    return 2 * people


def test_janus_rtp_range_is_one_range_everywhere_and_holds_eight_sessions_of_sixteen(
    compose_config: dict[str, Any], k8s_objects: list[dict[str, Any]]
) -> None:
    """janus.jcfg's rtp_port_range is the range the image exposes, compose publishes and the Kubernetes
    NetworkPolicy opens, every text that names it says the same, and it holds 8 sessions of 16."""
    low, high = _rtp_range()
    assert 1024 < low < high <= 65535
    needed = JANUS_CONCURRENT_LARGEST_SESSIONS * _janus_ports_per_session(JANUS_LARGEST_SESSION)
    assert needed == 256
    assert high - low + 1 >= needed, f"{high - low + 1} ports; {needed} hold 8 sessions of 16"
    exposed = [rest for keyword, rest in _janus_dockerfile() if keyword == "EXPOSE"]
    assert [re.findall(r"(\d+)-(\d+)/udp", rest) for rest in exposed] == [[(str(low), str(high))]]
    raw_ports = yaml.safe_load(COMPOSE.read_text())["services"]["janus"]["ports"]
    assert raw_ports == [f"{low}-{high}:{low}-{high}/udp"]
    published = _published_ports(compose_config["services"]["janus"])
    assert sorted(int(p["published"]) for p in published) == list(range(low, high + 1))
    policy = _object(k8s_objects, "NetworkPolicy", "janus-api-from-broker-only")
    udp = [p for rule in policy["spec"]["ingress"] for p in rule["ports"] if p["protocol"] == "UDP"]
    assert [(p["port"], p["endPort"]) for p in udp] == [(low, high)]
    # Every mention of a range starting where this one does (firewall advice, comments) is this one.
    texts = [DEPLOY / "env.example", COMPOSE, K8S / "janus.yaml", JANUS / "janus.jcfg", JANUS / "Dockerfile",
             DOCS, REPO / "README.md"]  # fmt: skip
    for path in texts:
        for found in re.findall(rf"\b{low}-(\d+)\b", path.read_text()):
            assert int(found) == high, f"{path.name} names {low}-{found}"
    assert f"{low}-{high}/udp" in (DEPLOY / "env.example").read_text() + DOCS.read_text()


def _installed_modules(folder: str) -> set[str]:
    assert JANUS_MODULES.is_dir(), "Debian's janus package is required (apt-get install janus janus-tools)"
    return {p.name for p in (JANUS_MODULES / folder).glob("*.so")}


def test_janus_config_loads_only_the_videoroom_plugin_and_the_http_transport() -> None:
    """Every plugin, transport, logger and event handler Debian's package ships is disabled except the two the
    broker needs; stored-token auth is on; the admin API is enabled; no secret is in the committed files."""
    core = _jcfg(JANUS / "janus.jcfg")
    for folder, group in (("plugins", "plugins"), ("transports", "transports"), ("loggers", "loggers"),
                          ("events", "events")):  # fmt: skip
        disabled = set(core[group]["disable"].split(","))
        assert disabled.isdisjoint(JANUS_KEEP), group
        assert _installed_modules(folder) - JANUS_KEEP <= disabled, f"{group}: a module is left enabled"
    assert _installed_modules("plugins") & JANUS_KEEP == {"libjanus_videoroom.so"}
    assert core["events"]["broadcast"] == "false"
    general = core["general"]
    assert general["token_auth"] == "true"
    assert "token_auth_secret" not in general, "the broker uses stored tokens"
    assert {"plugins_folder", "transports_folder", "configs_folder"}.isdisjoint(general), "the package's defaults"
    http = _jcfg(JANUS / "janus.transport.http.jcfg")
    assert http["general"]["http"] == "true" and int(http["general"]["port"]) == JANUS_API_PORT
    assert http["general"]["https"] == "false" and http["general"]["base_path"] == "/janus"
    assert http["admin"]["admin_http"] == "true" and int(http["admin"]["admin_port"]) == JANUS_ADMIN_PORT
    assert http["admin"]["admin_base_path"] == "/admin"
    videoroom = _jcfg(JANUS / "janus.plugin.videoroom.jcfg")
    assert list(videoroom) == ["general"], "no room is configured: the broker makes one per session"
    secrets_in_files = {"api_secret", "admin_secret", "admin_key", "token_auth_secret"}
    for groups in (core, http, videoroom):
        for settings in groups.values():
            assert secrets_in_files.isdisjoint(settings), "secrets are added at start, never committed"
    low, high = _rtp_range()
    assert 1024 < low < high
    files = {p.name for p in JANUS.glob("*.jcfg")}
    assert files == {"janus.jcfg", "janus.transport.http.jcfg", "janus.plugin.videoroom.jcfg"}


def _janus_dockerfile() -> list[tuple[str, str]]:
    rows = []
    for line in (JANUS / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            rows.append((keyword.upper(), rest.strip()))
    return rows


def test_janus_image_is_debians_package_run_unprivileged() -> None:
    rows = _janus_dockerfile()
    assert [rest for keyword, rest in rows if keyword == "FROM"] == ["debian:bookworm-slim"]
    run = " ".join(rest for keyword, rest in rows if keyword == "RUN")
    assert "apt-get install -y --no-install-recommends janus" in run
    copied = " ".join(rest for keyword, rest in rows if keyword == "COPY")
    for name in ("janus.jcfg", "janus.transport.http.jcfg", "janus.plugin.videoroom.jcfg", "entrypoint.sh"):
        assert name in copied, name
    users = [rest for keyword, rest in rows if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    low, high = _rtp_range()
    assert ("EXPOSE", f"{JANUS_API_PORT} {JANUS_ADMIN_PORT} {low}-{high}/udp") in rows
    assert ("ENTRYPOINT", '["sh", "/usr/local/bin/janus-entrypoint.sh"]') in rows


def _published_ports(service: dict[str, Any]) -> list[dict[str, Any]]:
    """docker-compose's resolved port entries (a range comes out as one entry per port; an entry with a host
    address as ``HOST:PUBLISHED:TARGET/PROTOCOL``)."""
    entries = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            address, _, protocol = port.partition("/")
            *host, published, target = address.split(":")
            port = {"published": published, "target": target, "protocol": protocol or "tcp"}
            port.update({"host_ip": host[0]} if host else {})
        entries.append(dict(port))
    return entries


def test_compose_runs_janus_with_its_api_on_an_internal_network_only(compose_config: dict[str, Any]) -> None:
    """Janus's API and admin API are published nowhere; only its RTP range is, over UDP; the brokers reach the
    API on the internal "janus" network, to whose address Janus binds it."""
    services = compose_config["services"]
    janus = services["janus"]
    low, high = _rtp_range()
    published = _published_ports(janus)
    assert sorted(int(p["published"]) for p in published) == list(range(low, high + 1))
    assert all(p["protocol"] == "udp" and p["published"] == p["target"] for p in published)
    assert all(p.get("host_ip") in (None, "0.0.0.0") for p in published)
    for name, service in services.items():
        for port in _published_ports(service):
            assert int(port["target"]) not in {JANUS_API_PORT, JANUS_ADMIN_PORT}, f"{name} publishes a Janus API"
    assert compose_config["networks"]["janus"].get("internal") is True
    assert set(janus["networks"]) == {"janus", "media"}
    assert janus["networks"]["janus"]["aliases"] == [janus["environment"]["JANUS_API_HOST"]]
    assert compose_config["networks"]["media"].get("internal") is not True
    for name, service in services.items():
        on_janus_network = "janus" in service.get("networks", {})
        # Caddy forwards /janus to Janus's API (tests/test_janus_route.py).
        assert on_janus_network == (name in {"broker1", "broker2", "janus", "caddy"}), name
    assert janus["read_only"] is True and janus["cap_drop"] == ["ALL"]
    assert any(str(entry).startswith("/tmp") for entry in janus["tmpfs"])
    assert janus["environment"]["JANUS_RUNTIME_DIR"] == "/tmp"
    assert janus["build"]["context"].endswith("deploy/janus")
    for name in ("broker1", "broker2"):
        env = services[name]["environment"]
        assert env["BROKER_JANUS_URL"] == f"http://janus:{JANUS_API_PORT}/janus"
        assert env["BROKER_JANUS_ADMIN_URL"] == f"http://janus:{JANUS_ADMIN_PORT}/admin"


def test_compose_janus_secrets_come_from_the_environment_shared_with_the_brokers(
    compose_config: dict[str, Any],
) -> None:
    """No value in the file: each secret is a required ${VAR:?...}, the same variable for Janus and the brokers."""
    raw = yaml.safe_load(COMPOSE.read_text())
    broker_env = raw["x-broker"]["environment"]
    janus_env = raw["services"]["janus"]["environment"]
    pairs = {
        "BROKER_JANUS_API_SECRET": "JANUS_API_SECRET",
        "BROKER_JANUS_ADMIN_SECRET": "JANUS_ADMIN_SECRET",
        "BROKER_JANUS_ROOM_ADMIN_KEY": "JANUS_ROOM_ADMIN_KEY",
    }
    for broker_name, janus_name in pairs.items():
        assert re.fullmatch(rf"\$\{{{janus_name}:\?[^}}]+\}}", broker_env[broker_name]), broker_name
        assert re.fullmatch(rf"\$\{{{janus_name}:\?[^}}]+\}}", janus_env[janus_name]), janus_name
    resolved_janus = compose_config["services"]["janus"]["environment"]
    for name in ("broker1", "broker2"):
        resolved = compose_config["services"][name]["environment"]
        for broker_name, janus_name in pairs.items():
            assert resolved[broker_name] == resolved_janus[janus_name] != ""
    assert resolved_janus["JANUS_API_SECRET"] == JANUS_DUMMIES["api_secret"]


def test_kubernetes_janus_api_only_on_a_cluster_ip_service(k8s_objects: list[dict[str, Any]]) -> None:
    """A janus Deployment on the node's network (Kubernetes has no hostPort ranges, and the RTP range is
    thousands of ports) whose API and admin API bind to the pod's address only, which is the node's
    InternalIP there, never all of the node's addresses; on a ClusterIP Service only (no NodePort, no
    LoadBalancer), reachable from broker pods, and the Janus API alone from the ingress controller
    (tests/test_janus_route.py); media open to all on the RTP range only."""
    deployment = _object(k8s_objects, "Deployment", "janus")
    namespace = deployment["metadata"]["namespace"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod["hostNetwork"] is True, "hostPort takes no range: the RTP range needs the node's network"
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = pod["containers"]
    assert container["image"] == "teletherapy-janus"
    env = {item["name"]: item for item in container["env"]}
    assert env["JANUS_API_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["JANUS_MEDIA_ON_API_ADDRESS"]["value"] == "true", "the node's address is where media arrives"
    ports = container["ports"]
    assert {p["containerPort"]: p.get("protocol", "TCP") for p in ports} == {
        JANUS_API_PORT: "TCP",
        JANUS_ADMIN_PORT: "TCP",
    }
    assert all("hostPort" not in p for p in ports)
    low, high = _rtp_range()
    selecting = [
        o for o in k8s_objects
        if o["kind"] == "Service" and o["spec"].get("selector", {}).items() <= labels.items()
        and o["metadata"].get("namespace") == namespace
    ]  # fmt: skip
    assert [o["metadata"]["name"] for o in selecting] == ["janus"]
    service = selecting[0]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert sorted(p["port"] for p in service["spec"]["ports"]) == sorted([JANUS_ADMIN_PORT, JANUS_API_PORT])
    for ingress in (o for o in k8s_objects if o["kind"] == "Ingress"):
        backends = [p["backend"]["service"]["name"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
        assert "janus" not in backends
    policy = _object(k8s_objects, "NetworkPolicy", "janus-api-from-broker-only")
    assert policy["metadata"]["namespace"] == namespace
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    for rule in policy["spec"]["ingress"]:
        rule_ports = {(p["protocol"], p["port"], p.get("endPort")) for p in rule["ports"]}
        if "from" not in rule:
            assert rule_ports == {("UDP", low, high)}, "only media is open to all"
        else:
            (peer,) = rule["from"]
            if "podSelector" not in peer:
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ingress-nginx"}
                assert rule_ports == {("TCP", JANUS_API_PORT, None)}, "the ingress reaches the Janus API alone"
                continue
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "broker"}
            assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "teletherapy"}
            assert rule_ports == {("TCP", JANUS_API_PORT, None), ("TCP", JANUS_ADMIN_PORT, None)}
    names = {o["metadata"]["name"]: o for o in k8s_objects if o["kind"] == "Namespace"}
    assert names[namespace]["metadata"]["labels"]["pod-security.kubernetes.io/warn"] == "baseline"


def test_kubernetes_broker_reaches_janus_with_the_shared_secrets(k8s_objects: list[dict[str, Any]]) -> None:
    literals = dict(x.split("=", 1) for x in _generator("broker-config")["literals"])
    host = "janus.teletherapy-janus.svc.cluster.local"
    assert literals["BROKER_JANUS_URL"] == f"http://{host}:{JANUS_API_PORT}/janus"
    assert literals["BROKER_JANUS_ADMIN_URL"] == f"http://{host}:{JANUS_ADMIN_PORT}/admin"
    broker = _object(k8s_objects, "Deployment", "broker")["spec"]["template"]["spec"]["containers"][0]
    broker_env = {item["name"]: item for item in broker["env"]}
    janus = _object(k8s_objects, "Deployment", "janus")["spec"]["template"]["spec"]["containers"][0]
    janus_env = {item["name"]: item for item in janus["env"]}
    examples = {doc["metadata"]["name"]: doc for doc in _k8s_documents(K8S / "secret.example.yaml")}
    for broker_name, janus_name in (
        ("BROKER_JANUS_API_SECRET", "JANUS_API_SECRET"),
        ("BROKER_JANUS_ADMIN_SECRET", "JANUS_ADMIN_SECRET"),
        ("BROKER_JANUS_ROOM_ADMIN_KEY", "JANUS_ROOM_ADMIN_KEY"),
    ):
        broker_ref = broker_env[broker_name]["valueFrom"]["secretKeyRef"]
        janus_ref = janus_env[janus_name]["valueFrom"]["secretKeyRef"]
        assert "value" not in broker_env[broker_name] and "value" not in janus_env[janus_name]
        assert broker_ref["name"] == "broker-secrets" and janus_ref["name"] == "janus-secrets"
        # The example says the two keys hold one value.
        assert examples["janus-secrets"]["stringData"][janus_ref["key"]].endswith(broker_ref["key"])
        assert broker_ref["key"] in examples["broker-secrets"]["stringData"]


def _janus_env(tmp_path: Path, source: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "JANUS_CONFIG_DIR": str(source),
        "JANUS_RUNTIME_DIR": str(tmp_path / "run"),
        "JANUS_API_SECRET": JANUS_DUMMIES["api_secret"],
        "JANUS_ADMIN_SECRET": JANUS_DUMMIES["admin_secret"],
        "JANUS_ROOM_ADMIN_KEY": JANUS_DUMMIES["room_admin_key"],
    }
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("JANUS_API_SECRET", "", "JANUS_API_SECRET is missing"),
        ("JANUS_ADMIN_SECRET", "short", "JANUS_ADMIN_SECRET is missing or shorter"),
        ("JANUS_ROOM_ADMIN_KEY", 'x" }\nplugins: { disable = "' + "y" * 40, "JANUS_ROOM_ADMIN_KEY may hold only"),
        ("JANUS_PUBLIC_IP", "203.0.113.7; rm -rf /", "JANUS_PUBLIC_IP must be an IPv4 address"),
        ("JANUS_MEDIA_ON_API_ADDRESS", "yes", "JANUS_MEDIA_ON_API_ADDRESS must be true or false"),
    ],
)
def test_janus_entrypoint_refuses_a_missing_or_unsafe_value(
    name: str, value: str, message: str, tmp_path: Path
) -> None:
    """Bad input changes nothing: no config is written and Janus is not started."""
    assert subprocess.run(["sh", "-n", str(JANUS_ENTRYPOINT)], check=False).returncode == 0
    env = _janus_env(tmp_path, JANUS, **{name: value})
    result = subprocess.run(["sh", str(JANUS_ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 64
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def _janus_post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(json.loads(response.read()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _deploy_janus(tmp_path: Path, **extra: str) -> Iterator[tuple[str, str, dict[str, Any], Path]]:
    """Debian's Janus, started through deploy/janus/entrypoint.sh from deploy/janus/'s files (only the two API
    ports moved to free ones) with JANUS_API_HOST=127.0.0.1 and ``extra``, once it answers ``info``: its
    API and admin API URLs, that answer and its log. Stopped by its PID afterwards."""
    import urllib.request

    assert shutil.which("janus"), "Debian's janus package is required (apt-get install janus janus-tools)"
    source = tmp_path / "source"
    source.mkdir()
    for path in JANUS.glob("*.jcfg"):
        (source / path.name).write_text(path.read_text())
    port, admin_port = _free_port(), _free_port()
    http_conf = source / "janus.transport.http.jcfg"
    moved = re.sub(r"(?m)^(\s*)port = \d+$", rf"\g<1>port = {port}", http_conf.read_text())
    http_conf.write_text(re.sub(r"(?m)^(\s*)admin_port = \d+$", rf"\g<1>admin_port = {admin_port}", moved))
    env = _janus_env(tmp_path, source, JANUS_API_HOST="127.0.0.1", **extra)
    log = tmp_path / "janus.log"
    with log.open("wb") as out:
        janus = subprocess.Popen(["sh", str(JANUS_ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    base, admin = f"http://127.0.0.1:{port}/janus", f"http://127.0.0.1:{admin_port}/admin"
    try:
        deadline = time.monotonic() + 20
        info: dict[str, Any] = {}
        while not info:
            assert janus.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "janus did not answer info"
            try:
                with urllib.request.urlopen(base + "/info", timeout=2) as response:
                    info = dict(json.loads(response.read()))
            except OSError:
                time.sleep(0.05)
        yield base, admin, info, log
    finally:
        janus.terminate()  # the entrypoint exec'd Janus: this PID is Janus's
        try:
            janus.wait(10)
        except subprocess.TimeoutExpired:
            janus.kill()
            janus.wait(10)


def test_janus_starts_from_the_deploy_config_with_only_what_the_broker_needs(tmp_path: Path) -> None:
    """Janus from the deploy files loads the VideoRoom plugin and the HTTP transport and nothing else, binds its
    APIs to the address JANUS_API_HOST names, and enforces the api_secret, the admin_secret and the admin_key
    the entrypoint added from the environment, on a config only its owner can read."""
    with _deploy_janus(tmp_path, JANUS_PUBLIC_IP="203.0.113.7") as (base, admin, info, _):
        assert set(info["plugins"]) == {"janus.plugin.videoroom"}
        assert set(info["transports"]) == {"janus.transport.http"}
        assert info["events"] == {} and info["loggers"] == {}
        assert info["api_secret"] is True and info["auth_token"] is True
        assert info["public-ip"] == "203.0.113.7"
        conf = tmp_path / "run" / "janus-conf"
        assert {p.name: p.stat().st_mode & 0o777 for p in conf.iterdir()} == {
            "janus.jcfg": 0o600,
            "janus.transport.http.jcfg": 0o600,
            "janus.plugin.videoroom.jcfg": 0o600,
        }
        assert _jcfg(conf / "janus.transport.http.jcfg")["admin"]["admin_ip"] == "127.0.0.1"
        # Nothing without the api_secret (or a stored token); everything the broker does with it.
        refused = _janus_post(base, {"janus": "create", "transaction": "t1"})
        assert refused["janus"] == "error" and refused["error"]["code"] == 403
        created = _janus_post(base, {"janus": "create", "transaction": "t2", "apisecret": JANUS_DUMMIES["api_secret"]})
        session = f"{base}/{created['data']['id']}"
        attach = {"janus": "attach", "plugin": "janus.plugin.videoroom", "transaction": "t3"}
        handle = _janus_post(session, {**attach, "apisecret": JANUS_DUMMIES["api_secret"]})["data"]["id"]
        create_room = {"janus": "message", "transaction": "t4", "apisecret": JANUS_DUMMIES["api_secret"]}
        no_key = _janus_post(f"{session}/{handle}", {**create_room, "body": {"request": "create"}})
        assert "error_code" in no_key["plugindata"]["data"], "a room without the VideoRoom admin_key"
        body = {"request": "create", "admin_key": JANUS_DUMMIES["room_admin_key"]}
        made = _janus_post(f"{session}/{handle}", {**create_room, "body": body})
        assert made["plugindata"]["data"]["videoroom"] == "created"
        # The admin API: only with the admin_secret.
        listing = {"janus": "list_sessions", "transaction": "t5"}
        assert _janus_post(admin, listing)["error"]["code"] == 403
        listed = _janus_post(admin, {**listing, "admin_secret": JANUS_DUMMIES["admin_secret"]})
        assert listed["janus"] == "success" and created["data"]["id"] in listed["sessions"]


@pytest.mark.parametrize("media_on_api_address", [None, "false", "true"])
def test_janus_gathers_media_on_the_api_address_only_when_told(
    media_on_api_address: str | None, tmp_path: Path
) -> None:
    """Compose: the API's address is a private network's, never offered to browsers for media (the default).
    Kubernetes (host networking): it is the node's InternalIP, where media arrives too, so ignoring it
    would leave Janus no address to receive media on. Janus's own log says which addresses it ignores
    and which port range it took (janus.jcfg's)."""
    extra = {} if media_on_api_address is None else {"JANUS_MEDIA_ON_API_ADDRESS": media_on_api_address}
    with _deploy_janus(tmp_path, **extra) as (_, _, info, log):
        assert info["api_secret"] is True
        text = log.read_text()
    low, high = _rtp_range()
    assert f"ICE port range: {low}-{high}" in text
    assert "Adding 'vmnet' to the ICE ignore list" in text
    ignored = "Adding '127.0.0.1' to the ICE ignore list" in text
    assert ignored == (media_on_api_address != "true")
