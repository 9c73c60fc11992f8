"""Ferry's client side: the `ferry` CLI and the Python SDK (`Client`, `AsyncClient`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ferry.async_client import AsyncClient
    from ferry.client import Client

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `ferry up` does not load the SDK's HTTP stack.
    if name == "Client":
        from ferry.client import Client

        return Client
    if name == "AsyncClient":
        from ferry.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(name)
