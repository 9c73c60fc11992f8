"""Who may read /metrics (API, worker and scheduler alike): loopback clients by default,
or any client with the bearer token `FERRY_METRICS_TOKEN` once it is set."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, Counter

from core.metrics_server import metrics_refusal, serve_metrics
from service.app import create_app

TOKEN = "metrics-token-5b1e"


def _status(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _own_address() -> str | None:
    """This host's address on its default route (no packet is sent), if it is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only routing is consulted
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_refusal_rules() -> None:
    for remote in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"):
        assert metrics_refusal(remote, None, None) is None, remote
    for remote in ("10.1.2.3", "192.168.0.5", "::ffff:10.0.0.1", "2001:db8::1", "", None, "x"):
        assert "loopback" in (metrics_refusal(remote, None, None) or ""), remote
    # With a token, the token decides, from anywhere.
    assert metrics_refusal("10.1.2.3", f"Bearer {TOKEN}", TOKEN) is None
    assert metrics_refusal("127.0.0.1", None, TOKEN) is not None
    assert metrics_refusal("127.0.0.1", f"Bearer {TOKEN}x", TOKEN) is not None
    assert metrics_refusal("127.0.0.1", TOKEN, TOKEN) is not None


async def test_the_api_metrics_need_the_token_once_it_is_set(settings, pool, redis):
    app = create_app(
        settings.model_copy(update={"metrics_token": TOKEN}), pool, redis, settings.database_url
    )
    async with TestClient(TestServer(app)) as client:
        bare = await client.get("/metrics")
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        right = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert bare.status == 401 and wrong.status == 401
        assert (await bare.json())["error"]["code"] == "unauthorized"
        assert right.status == 200
        assert "ferry_workers_alive" in await right.text()


async def test_the_api_metrics_refuse_clients_off_loopback(settings, pool, redis):
    address = _own_address()
    if address is None:
        pytest.skip("this host has no non-loopback address to connect from")
    app = create_app(settings, pool, redis, settings.database_url)
    async with TestClient(TestServer(app, host="0.0.0.0")) as client:
        port = client.server.port
        remote = await asyncio.to_thread(_status, f"http://{address}:{port}/metrics")
        local = await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/metrics")
        health = await asyncio.to_thread(_status, f"http://{address}:{port}/healthz")
    assert remote[0] == 403 and "loopback" in remote[1], remote
    assert local[0] == 200 and "ferry_workers_alive" in local[1]
    assert health[0] == 200  # only /metrics is guarded


async def test_a_process_metrics_port_follows_the_same_rules() -> None:
    registry = CollectorRegistry()
    Counter("ferry_test_things", "things", registry=registry).inc()
    port = _free_port("127.0.0.1")
    stop = serve_metrics(registry, "127.0.0.1", port, "test", token=TOKEN)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        bare = await asyncio.to_thread(_status, url)
        right = await asyncio.to_thread(_status, url, TOKEN)
    finally:
        await asyncio.to_thread(stop)
    assert bare[0] == 401 and "FERRY_METRICS_TOKEN" in bare[1], bare
    assert right[0] == 200 and "ferry_test_things_total 1.0" in right[1], right

    address = _own_address()
    if address is None:
        pytest.skip("this host has no non-loopback address to connect from")
    port = _free_port("0.0.0.0")
    stop = serve_metrics(registry, "0.0.0.0", port, "test")
    try:
        remote = await asyncio.to_thread(_status, f"http://{address}:{port}/metrics")
        local = await asyncio.to_thread(_status, f"http://127.0.0.1:{port}/metrics")
    finally:
        await asyncio.to_thread(stop)
    assert remote[0] == 403, remote
    assert local[0] == 200 and "ferry_test_things_total 1.0" in local[1], local
