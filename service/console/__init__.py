"""The web console: HTML pages served under `/`, next to the API under `/api/`.

Each page is the one layout template with the page's name filled in; the browser script
(`static/console.js`) signs in with a token kept in `sessionStorage`, calls the API with it,
and follows the API's SSE routes for live updates. The console holds no data and no
privilege of its own: every read and every action is an API call under the token's role.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from string import Template

from aiohttp import web

HERE = Path(__file__).parent
STATIC = HERE / "static"
_LAYOUT = Template((HERE / "templates" / "layout.html").read_text())

# The console's routes are named with this prefix: they are pages, not part of the API's
# document.
ROUTE_PREFIX = "console:"

# (path, page name, title)
PAGES: list[tuple[str, str, str]] = [
    ("/", "overview", "Overview"),
    ("/sign-in", "sign-in", "Sign in"),
    ("/executions", "executions", "Executions"),
    ("/executions/{id}", "execution", "Execution"),
    ("/services", "services", "Services"),
    ("/services/{id}", "service", "Service"),
    ("/packages", "packages", "Packages"),
    ("/packages/{id}", "package", "Package"),
    ("/triggers", "triggers", "Triggers"),
    ("/pipelines", "pipelines", "Pipelines"),
    ("/pipelines/{id}", "pipeline", "Pipeline"),
    ("/pipeline-executions/{id}", "pipeline-execution", "Pipeline execution"),
]

# The console's pages run only their own script and style, and talk only to this origin.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _page(name: str, title: str):
    async def handler(request: web.Request) -> web.Response:
        params = json.dumps(dict(request.match_info))
        body = _LAYOUT.substitute(
            title=html.escape(title),
            page=html.escape(name),
            params=html.escape(params),
        )
        return web.Response(text=body, content_type="text/html", headers=_HEADERS)

    handler.__name__ = f"console_{name.replace('-', '_')}"
    return handler


def add_console_routes(app: web.Application) -> None:
    for path, name, title in PAGES:
        app.router.add_get(path, _page(name, title), name=ROUTE_PREFIX + name.replace("-", "_"))
    app.router.add_static("/console/static", str(STATIC), name=f"{ROUTE_PREFIX}static")
