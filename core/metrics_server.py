"""Serving one process's metrics registry on its own port, as Prometheus expects of
separate processes (the worker and the scheduler; the API answers `/metrics` itself)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int, process: str
) -> Callable[[], None]:
    """Serve `registry` on host:port in a background thread; returns the function that stops
    it. Port 0 disables it, and a busy port is logged and skipped: metrics are not worth
    failing the process over."""
    if not port:
        return lambda: None
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("%s metrics not served: %s:%d is unavailable (%s)", process, host, port, exc)
        return lambda: None
    log.info("%s metrics on http://%s:%d/metrics", process, host, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
