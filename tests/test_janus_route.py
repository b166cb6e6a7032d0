"""The deployments route /janus to Janus's API, so group sessions above the mesh size use Janus.

Browsers reach Janus's API at ``BROKER_JANUS_PUBLIC_URL`` with their own short-lived token
(docs/protocol.md, ``media_janus``). In compose, Caddy forwards /janus to the janus service; on
Kubernetes, the broker's Ingress sends /janus to Janus's Service. Neither forwards the admin API,
and neither answers /janus/info (which Janus answers without a token). The compose proxy is checked
for real: Caddy with deploy/Caddyfile in front of a real broker and a real Janus.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.config import Config
from tests.balanced_brokers import Caddy
from tests.conftest import RunningBroker
from tests.janus_server import JanusServer, janus_server  # noqa: F401  (the fixture)
from tests.redis_server import free_port
from tests.test_deploy import COMPOSE, K8S, _generator, _k8s_documents


def _compose_broker_env() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["x-broker"]["environment"])


def _k8s(name: str) -> list[dict[str, Any]]:
    return _k8s_documents(K8S / name)


def _broker_literals() -> dict[str, str]:
    return dict(item.split("=", 1) for item in _generator("broker-config")["literals"])


def test_deployments_use_the_default_mesh_size_and_tell_browsers_where_janus_is() -> None:
    assert Config().mesh_max_participants == 4
    compose = _compose_broker_env()
    assert "BROKER_MESH_MAX_PARTICIPANTS" not in compose, "compose keeps sessions above 4 off Janus"
    assert compose["BROKER_JANUS_PUBLIC_URL"] == "https://${BROKER_DOMAIN}/janus"
    literals = _broker_literals()
    assert "BROKER_MESH_MAX_PARTICIPANTS" not in literals, "Kubernetes keeps sessions above 4 off Janus"
    public = literals["BROKER_PUBLIC_URL"].rstrip("/")
    assert literals["BROKER_JANUS_PUBLIC_URL"] == public + "/janus", "Janus's API on the pages' own origin"


def test_kubernetes_ingress_routes_the_janus_api_alone_to_janus() -> None:
    objects = _k8s("ingress.yaml")
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    (rule,) = ingress["spec"]["rules"]
    routes = {(p["path"], p["pathType"]): p["backend"]["service"] for p in rule["http"]["paths"]}
    assert routes[("/janus", "Prefix")] == {"name": "janus-api", "port": {"number": 8088}}
    assert routes[("/janus/info", "Exact")]["name"] == "broker", "/janus/info must not reach Janus"
    assert routes[("/", "Prefix")]["name"] == "broker"
    assert not any("admin" in path for path, _ in routes), "Janus's admin API is never routed"
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "janus-api"]
    assert service["metadata"]["namespace"] == ingress["metadata"]["namespace"]
    assert service["spec"]["type"] == "ExternalName"
    assert service["spec"]["externalName"] == "janus.teletherapy-janus.svc.cluster.local"
    assert [p["port"] for p in service["spec"]["ports"]] == [8088]
    (policy,) = [o for o in _k8s("janus.yaml") if o["kind"] == "NetworkPolicy"]
    from_ingress = [
        r for r in policy["spec"]["ingress"]
        if any(f.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name") == "ingress-nginx"
               for f in r.get("from", []))
    ]  # fmt: skip
    assert [[(p["protocol"], p["port"]) for p in r["ports"]] for r in from_ingress] == [[("TCP", 8088)]]


@pytest.mark.asyncio(loop_scope="session")
async def test_caddy_as_shipped_forwards_janus_api_with_a_token_and_nothing_else(
    broker: RunningBroker,
    janus_server: JanusServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    token = secrets.token_hex(16)
    caddy = Caddy(free_port(), tmp_path)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        added = {
            "janus": "add_token",
            "token": token,
            "plugins": ["janus.plugin.videoroom"],
            "transaction": secrets.token_hex(6),
            "admin_secret": janus_server.admin_secret,
        }
        async with http.post(janus_server.admin_url, json=added) as response:
            assert (await response.json())["janus"] == "success"
        caddy.start([broker.config.port], janus_port=janus_server.port)
        try:
            create = {"janus": "create", "transaction": secrets.token_hex(6)}
            async with http.post(caddy.url + "/janus", json={**create, "token": token}) as response:
                answer = await response.json()
            assert answer["janus"] == "success", answer
            session = answer["data"]["id"]
            async with http.post(caddy.url + "/janus", json=create) as response:
                refused = await response.json()
            assert refused["janus"] == "error" and refused["error"]["code"] == 403, "Janus without a token"
            async with http.post(caddy.url + "/janus", json={**create, "token": secrets.token_hex(16)}) as response:
                assert (await response.json())["janus"] == "error", "a token Janus was never given"
            async with http.get(caddy.url + "/janus/info") as response:
                assert response.status == 404
                assert "janus" not in await response.text()
            listing = {"janus": "list_sessions", "transaction": "t", "admin_secret": janus_server.admin_secret}
            async with http.post(caddy.url + "/admin", json=listing) as response:
                assert response.status in (404, 405), "the admin API must not be reachable through the proxy"
                assert "sessions" not in await response.text()
            async with http.get(caddy.url + "/readyz") as response:
                assert response.status == 200, "everything else still goes to the brokers"
            destroy = {"janus": "destroy", "transaction": secrets.token_hex(6), "token": token}
            async with http.post(f"{caddy.url}/janus/{session}", json=destroy) as response:
                assert (await response.json())["janus"] == "success"
        finally:
            caddy.stop()
            remove = {**added, "janus": "remove_token", "transaction": secrets.token_hex(6)}
            async with http.post(janus_server.admin_url, json=remove) as response:
                await response.read()
