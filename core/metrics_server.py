"""Serving one process's metrics registry on its own port, as Prometheus expects of
separate processes (the worker and the scheduler; the API answers `/metrics` itself), and
who may read metrics at all.

Metrics name every service and count its executions, so they are not public: without a
token (`FERRY_METRICS_TOKEN`) only loopback clients are answered; with one, every client
must send it as a bearer token, loopback included.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)


def metrics_refusal(remote: str | None, authorization: str | None, token: str | None) -> str | None:
    """Why a client may not read metrics, or None when it may."""
    if token:
        if authorization is not None and hmac.compare_digest(
            authorization.encode(), f"Bearer {token}".encode()
        ):
            return None
        return "metrics need the bearer token set in FERRY_METRICS_TOKEN"
    if _is_loopback(remote):
        return None
    return "metrics answer loopback clients only unless FERRY_METRICS_TOKEN is set"


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a line each on stderr."""


def _guarded(app: Callable[..., Iterable[bytes]], token: str | None) -> Callable[..., Any]:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refusal = metrics_refusal(
            environ.get("REMOTE_ADDR"), environ.get("HTTP_AUTHORIZATION"), token
        )
        if refusal is None:
            return app(environ, start_response)
        status = "401 Unauthorized" if token else "403 Forbidden"
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if token:
            headers.append(("WWW-Authenticate", "Bearer"))
        start_response(status, headers)
        return [refusal.encode() + b"\n"]

    return guarded


def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    process: str,
    token: str | None = None,
) -> Callable[[], None]:
    """Serve `registry` on host:port in a background thread, to the clients
    `metrics_refusal` lets in; returns the function that stops it. Port 0 disables it, and
    a busy port is logged and skipped: metrics are not worth failing the process over."""
    if not port:
        return lambda: None

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = make_server(
            host,
            port,
            _guarded(make_wsgi_app(registry), token),
            Server,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        log.warning("%s metrics not served: %s:%d is unavailable (%s)", process, host, port, exc)
        return lambda: None
    thread = threading.Thread(target=server.serve_forever, name=f"{process}-metrics", daemon=True)
    thread.start()
    log.info("%s metrics on http://%s:%d/metrics", process, host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
