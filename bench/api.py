"""The benchmarks' HTTP client: the public API with a token, keep-alive, errors raised."""

from __future__ import annotations

from typing import Any

import httpx


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=httpx.Timeout(60.0)
        )

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code not in (200, 201, 202):
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None
