"""The web console in a real browser: Playwright drives Debian's Chromium headless against a
real Ferry (the API on loopback and a worker with the process runtime).

Each test signs in with a token, works the pages as a person would, and checks what Ferry
recorded through the API. Screenshots of every page go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_zip, token_for
from tests.engine_helpers import running_worker
from tests.pipeline_helpers import create_pipeline, deploy_flow, link, node

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).parent / "artifacts"
V1 = "/api/v1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        async_playwright is None,
        reason="Playwright for Python is not installed (make install-test)",
    ),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium on this machine (make install-test installs Debian's as root)",
    ),
]

DEMO_MANIFEST = {
    "name": "demo",
    "description": "functions the console tests run",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {
                    "name": "greet",
                    "description": "says hello, slowly",
                    "inputs": [
                        {"name": "who", "type": "string"},
                        {"name": "times", "type": "integer", "default": 1},
                        {"name": "loud", "type": "boolean", "default": False},
                        {"name": "extra", "type": "json", "default": {}},
                    ],
                    "outputs": [{"name": "text", "type": "string"}],
                },
                {
                    "name": "chatty",
                    "inputs": [{"name": "lines", "type": "integer"}],
                    "outputs": [{"name": "count", "type": "integer"}],
                },
                {
                    "name": "hold",
                    "inputs": [{"name": "seconds", "type": "number"}],
                    "outputs": [],
                },
            ],
        }
    ],
}

DEMO_CODE = """
import time


def greet(who, progress, times=1, loud=False, extra=None):
    print("greeting", who)
    progress.update(50, "half way")
    time.sleep(1.5)
    text = ("hello " + who + " ") * times
    return {"text": text.upper() if loud else text}


def chatty(lines):
    for i in range(lines):
        print(f"line {i}", flush=True)
        time.sleep(0.03)
    return {"count": lines}


def hold(seconds):
    time.sleep(seconds)
"""


def demo_archive() -> bytes:
    import yaml

    return make_zip({"ferry.yaml": yaml.safe_dump(DEMO_MANIFEST), "main.py": DEMO_CODE})


async def until(check, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Console:
    """One browser page signed in to the Ferry under test."""

    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: self.errors.append(msg.text) if msg.type == "error" else None,
        )

    async def sign_in(self, token: str) -> None:
        await self.page.goto(self.base + "/sign-in")
        await self.page.fill("#token", token)
        await self.page.press("#token", "Enter")
        await self.page.wait_for_url("**/executions")

    async def open(self, path: str) -> None:
        await self.page.goto(self.base + path)
        await self.page.wait_for_selector("#content > :not(noscript)")

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield launched
        await launched.close()


@pytest.fixture
async def ferry(api, client, project, settings, pool, redis) -> AsyncIterator[dict[str, Any]]:
    """A project with the demo package deployed as a service, and a worker running it."""
    status, package = await api.upload(project["id"], demo_archive())
    assert status == 201, package
    status, service = await api.post(
        f"{V1}/services",
        {
            "project": project["id"],
            "name": "demo",
            "package": package["id"],
            "runtime": {"concurrency": 4, "max_replicas": 1},
        },
    )
    assert status == 201, service
    async with running_worker(settings, pool, redis, runtime="process"):
        yield {
            "base": str(client.make_url("")).rstrip("/"),
            "project": project,
            "package": package,
            "service": service,
        }


@pytest.fixture
async def browse(browser, ferry, pool) -> AsyncIterator[Any]:
    """`await browse(role, **context)`: a page signed in with a new token of that role. The
    pages are closed before Ferry stops, so no live stream holds the server open."""
    opened: list[Any] = []

    async def open_(role: str, **context: Any) -> Console:
        browser_context = await browser.new_context(**context)
        opened.append(browser_context)
        return await open_console(browser_context, ferry, pool, role)

    yield open_
    for browser_context in opened:
        await browser_context.close()


async def open_console(context, ferry, pool, role: str) -> Console:
    page = await context.new_page()
    console = Console(page, ferry["base"])
    await console.sign_in(await token_for(pool, role, ferry["project"]["id"]))
    return console


async def run(api, ferry, function: str, input_: dict) -> dict:
    status, execution = await api.post(
        f"{V1}/executions",
        {"service": ferry["service"]["id"], "function": function, "input": input_},
    )
    assert status == 201, execution
    return execution


async def status_of(api, execution_id: str) -> str:
    status, execution = await api.get(f"{V1}/executions/{execution_id}")
    assert status == 200, execution
    return execution["status"]


async def test_a_bad_token_is_refused_and_pages_need_signing_in(browser, ferry):
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(ferry["base"] + "/executions")
    await page.wait_for_url("**/sign-in")
    await page.fill("#token", "fry_not-a-token")
    await page.press("#token", "Enter")
    await page.wait_for_selector("#flash.error")
    assert "not valid" in await page.inner_text("#flash")
    assert await page.evaluate("sessionStorage.getItem('ferry.token')") is None
    await Console(page, ferry["base"]).shot("sign-in")
    await context.close()


async def test_run_a_function_from_its_form_and_watch_it_finish_live(browse, ferry, api, pool):
    console = await browse("developer")
    page = console.page
    await console.open(f"/packages/{ferry['package']['id']}")
    # Every status the run's badge shows is recorded in the page, and the page never reloads.
    await page.evaluate(
        """() => {
        window.seen = []; window.sameDocument = true;
        new MutationObserver(() => {
          for (const b of document.querySelectorAll('.run .run-status .badge')) {
            const s = b.dataset.status;
            if (window.seen[window.seen.length - 1] !== s) window.seen.push(s);
          }
        }).observe(document.getElementById('runs'), {subtree: true, childList: true});
    }"""
    )
    form = page.locator('form[data-function="greet"]')
    await form.locator('input[name="who"]').fill("ferry")
    await form.locator('input[name="times"]').fill("2")
    await form.locator('input[name="loud"]').check()
    await console.shot("package")
    await form.locator("button[type=submit]").click()
    run_box = page.locator(".run")
    await run_box.locator('.badge[data-status="success"]').wait_for(timeout=60_000)
    execution_id = await run_box.get_attribute("data-id")
    seen = await page.evaluate("window.seen")
    assert await page.evaluate("window.sameDocument") is True
    assert seen[-1] == "success", seen
    assert "in-progress" in seen, seen  # seen live, between the created and the end
    assert "HELLO FERRY HELLO FERRY" in await run_box.inner_text()
    await console.shot("package-run")

    status, execution = await api.get(f"{V1}/executions/{execution_id}")
    assert status == 200, execution
    assert [e["status"] for e in execution["status_log"]] == ["created", "in-progress", "success"]
    assert execution["input"] == {"who": "ferry", "times": 2, "loud": True, "extra": {}}

    # The executions page lists it, with counters; its own page shows output and the timeline.
    await console.open("/executions")
    await page.locator(f'tr[data-id="{execution_id}"] .badge[data-status="success"]').wait_for()
    await page.locator('[data-counter="success"] b').filter(has_text="1").wait_for()
    await console.open(f"/executions/{execution_id}")
    await page.locator("#timeline li").nth(2).wait_for()
    assert "HELLO FERRY" in await page.inner_text("#content")
    await console.shot("execution")
    assert console.errors == []


async def test_the_executions_table_is_live(browse, ferry, api, pool):
    console = await browse("developer", viewport={"width": 1280, "height": 800})
    page = console.page
    await page.evaluate("window.marker = 1")
    execution = await run(api, ferry, "greet", {"who": "table"})
    row = page.locator(f'tr[data-id="{execution["id"]}"]')
    await row.wait_for(timeout=30_000)
    await row.locator('.badge[data-status="success"]').wait_for(timeout=60_000)
    assert await page.evaluate("window.marker") == 1  # no reload: the rows came from the stream
    await console.shot("executions")
    # A filter that does not match keeps new rows out.
    await console.open("/executions?status=failed")
    other = await run(api, ferry, "greet", {"who": "filtered"})
    await until(lambda: _is(api, other["id"], "success"), 60, "the run to finish")
    await asyncio.sleep(0.5)
    assert await page.locator(f'tr[data-id="{other["id"]}"]').count() == 0
    assert console.errors == []


async def _is(api, execution_id: str, status: str) -> bool:
    return await status_of(api, execution_id) == status


async def test_follow_a_chatty_executions_logs_live(browse, ferry, api, pool):
    console = await browse("viewer")
    page = console.page
    execution = await run(api, ferry, "chatty", {"lines": 150})
    await console.open(f"/executions/{execution['id']}")
    lines = page.locator("#logs > div")
    # Lines arrive while it runs: some are shown before the last one is printed.
    await until(lambda: _count_between(lines, 1, 149), 60, "some but not all lines")
    assert await status_of(api, execution["id"]) == "in-progress"
    await page.locator("#logs > div", has_text="line 149").wait_for(timeout=60_000)
    assert await lines.count() >= 150
    at_end = await page.evaluate(
        "(() => { const l = document.getElementById('logs');"
        " return l.scrollTop + l.clientHeight >= l.scrollHeight - 4; })()"
    )
    assert at_end, "follow keeps the newest line in view"
    await page.locator('#status .badge[data-status="success"]').wait_for(timeout=30_000)
    await page.fill("#log-search", "line 42")
    assert await page.locator("#logs > div:not(.hidden)").all_inner_texts() == ["line 42"]
    await page.fill("#log-search", "")
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download").click()
    download = await download_info.value
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    assert "line 0" in text and "line 149" in text
    await console.shot("execution-logs")
    assert console.errors == []


async def _count_between(locator, low: int, high: int) -> bool:
    return low <= await locator.count() <= high


async def test_terminate_a_running_execution_from_its_page(browse, ferry, api, pool):
    console = await browse("developer")
    page = console.page
    execution = await run(api, ferry, "hold", {"seconds": 120})
    await until(lambda: _is(api, execution["id"], "in-progress"), 60, "the run to start")
    await console.open(f"/executions/{execution['id']}")
    await page.locator('#status .badge[data-status="in-progress"]').wait_for()
    await page.get_by_role("button", name="Terminate").click()
    await page.locator('#status .badge[data-status="terminated"]').wait_for(timeout=60_000)
    assert await page.get_by_role("button", name="Terminate").count() == 0
    assert await status_of(api, execution["id"]) == "terminated"
    await console.shot("execution-terminated")

    # From the list: select two running executions and terminate both.
    first = await run(api, ferry, "hold", {"seconds": 120})
    second = await run(api, ferry, "hold", {"seconds": 120})
    await console.open("/executions")
    for x in (first, second):
        await page.locator(f'tr[data-id="{x["id"]}"] input[type=checkbox]').check()
    await page.get_by_role("button", name="Terminate selected").click()
    for x in (first, second):
        await page.locator(f'tr[data-id="{x["id"]}"] .badge[data-status="terminated"]').wait_for(
            timeout=60_000
        )
        assert await status_of(api, x["id"]) == "terminated"
    assert console.errors == []


async def test_scale_limits_and_rollout_from_the_service_form(browse, ferry, api, pool):
    service_id = ferry["service"]["id"]
    status, revision = await api.upload(
        None, demo_archive(), path=f"{V1}/packages/{ferry['package']['id']}/revisions"
    )
    assert status == 201, revision
    console = await browse("developer")
    page = console.page
    await console.open(f"/services/{service_id}")
    form = page.locator("#scale-form")
    await form.wait_for()
    assert await form.locator("#max_replicas").input_value() == "1"
    assert await form.locator("#concurrency").input_value() == "4"
    revisions = await form.locator("#package_revision option").evaluate_all(
        "os => os.map(o => o.value)"
    )
    assert revisions == ["2", "1"], revisions
    assert await form.locator("#package_revision").input_value() == "1"

    # Out of range: the API's 422 is shown next to the field it names; nothing changes.
    await form.locator("#max_replicas").fill("101")
    await form.get_by_role("button", name="Apply").click()
    error = page.locator("#error-max_replicas")
    await error.filter(has_text="100").wait_for(timeout=10_000)
    assert await form.locator("#max_replicas").get_attribute("aria-invalid") == "true"
    assert await page.locator("#error-concurrency").inner_text() == ""
    # A rule across fields is shown next to the first field it names.
    await form.locator("#max_replicas").fill("2")
    await form.locator("#min_replicas").fill("3")
    await form.get_by_role("button", name="Apply").click()
    await (
        page.locator("#error-min_replicas")
        .filter(has_text="must not exceed")
        .wait_for(timeout=10_000)
    )
    assert await error.inner_text() == ""
    await console.shot("service-form-errors")
    status, service = await api.get(f"{V1}/services/{service_id}")
    assert status == 200
    assert service["runtime"]["max_replicas"] == 1 and service["runtime"]["min_replicas"] == 0
    assert service["package_revision"] == 1

    # Good values and a new revision: one PATCH, recorded as typed.
    await form.locator("#min_replicas").fill("0")
    await form.locator("#target_queue_per_replica").fill("5")
    await form.locator("#concurrency").fill("3")
    await form.locator("#memory_mb").fill("256")
    await form.locator("#package_revision").select_option("2")
    await form.get_by_role("button", name="Apply").click()
    await page.locator("#flash", has_text="rolling out revision 2").wait_for(timeout=10_000)
    status, service = await api.get(f"{V1}/services/{service_id}")
    assert status == 200
    assert service["package_revision"] == 2
    runtime = service["runtime"]
    assert (
        runtime["min_replicas"],
        runtime["max_replicas"],
        runtime["target_queue_per_replica"],
        runtime["concurrency"],
        runtime["memory_mb"],
    ) == (0, 2, 5, 3, 256), runtime
    # The form is drawn again from what was recorded.
    await page.locator("#package_revision option:checked", has_text="running").wait_for(
        state="attached"
    )
    assert await page.locator("#package_revision").input_value() == "2"
    assert await page.locator("#scale-form .field-error").all_inner_texts() == [""] * 7
    await console.shot("service-form")
    assert console.errors == [] or all("422" in e for e in console.errors), console.errors


async def _rows(page) -> list[str]:
    return await page.locator("#executions tr").evaluate_all("rs => rs.map(r => r.dataset.id)")


async def _api_pages(api, service_id: str, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        path = f"{V1}/executions?service={service_id}&limit={limit}"
        status, page = await api.get(path + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, page
        pages.append([x["id"] for x in page["items"]])
        cursor = page["next_cursor"]
        if not cursor:
            return pages


async def test_the_executions_table_pages_and_stays_live_on_the_first_page(
    browse, ferry, api, pool
):
    service_id = ferry["service"]["id"]
    for _ in range(5):
        await run(api, ferry, "hold", {"seconds": 0})
    expected = await _api_pages(api, service_id, 2)
    assert [len(p) for p in expected] == [2, 2, 1], expected
    console = await browse("viewer")
    page = console.page
    await console.open(f"/executions?service={service_id}&limit=2")
    await page.locator('body[data-executions-page="1"]').wait_for()
    assert await _rows(page) == expected[0]
    assert await page.locator("#previous-page").is_disabled()
    await page.locator("#next-page").click()
    await page.locator('body[data-executions-page="2"]').wait_for()
    assert await _rows(page) == expected[1]
    await page.locator("#next-page").click()
    await page.locator('body[data-executions-page="3"]').wait_for()
    assert await _rows(page) == expected[2]
    assert await page.locator("#next-page").is_disabled()
    await console.shot("executions-last-page")

    # A new execution does not join a later page ...
    newer = await run(api, ferry, "hold", {"seconds": 0})
    await until(lambda: _is(api, newer["id"], "success"), 60, "the run to finish")
    await asyncio.sleep(0.5)
    assert await _rows(page) == expected[2]
    await page.locator("#previous-page").click()
    await page.locator('body[data-executions-page="2"]').wait_for()
    assert await _rows(page) == expected[1]
    # ... and the first page, read again, has it on top; later ones arrive there live.
    await page.locator("#previous-page").click()
    await page.locator('body[data-executions-page="1"]').wait_for()
    assert await _rows(page) == [newer["id"], expected[0][0]]
    await page.evaluate("window.marker = 1")
    newest = await run(api, ferry, "hold", {"seconds": 0})
    await page.locator(f'#executions tr[data-id="{newest["id"]}"]').wait_for(timeout=30_000)
    assert (await _rows(page))[0] == newest["id"]
    assert await page.evaluate("window.marker") == 1
    assert console.errors == []


async def test_a_viewer_sees_no_buttons_and_cannot_act(browse, ferry, api, pool):
    execution = await run(api, ferry, "hold", {"seconds": 120})
    await until(lambda: _is(api, execution["id"], "in-progress"), 60, "the run to start")
    console = await browse("viewer")
    page = console.page
    assert await page.locator("body[data-role=viewer]").count() == 1
    await page.locator(f'tr[data-id="{execution["id"]}"]').wait_for()
    # Filtering is reading: the one button a viewer gets on the list.
    assert await page.locator("#content button:visible").all_inner_texts() == ["Filter"]
    assert await page.locator("#content input[type=checkbox]").count() == 0
    await console.open(f"/executions/{execution['id']}")
    await page.locator('#status .badge[data-status="in-progress"]').wait_for()
    for name in ("Terminate", "Rerun"):
        assert await page.get_by_role("button", name=name).count() == 0
    await console.open(f"/packages/{ferry['package']['id']}")
    assert await page.locator("form.run-form button").count() == 0
    await console.open(f"/services/{ferry['service']['id']}")
    assert await page.get_by_role("button", name="Pause").count() == 0
    assert await page.locator("#scale-form").count() == 0

    # A request crafted in the page with the viewer's token is refused by the API.
    answer = await page.evaluate(
        """async (id) => {
        const r = await fetch(`/api/v1/executions/${id}/terminate`, {method: 'POST',
          headers: {Authorization: 'Bearer ' + sessionStorage.getItem('ferry.token')}});
        return [r.status, await r.json()];
    }""",
        execution["id"],
    )
    assert answer[0] == 403, answer
    assert "developer" in answer[1]["error"]["message"]
    assert await status_of(api, execution["id"]) == "in-progress"
    status, _ = await api.post(f"{V1}/executions/{execution['id']}/terminate")
    assert status == 202
    assert console.errors == [] or all("403" in e for e in console.errors), console.errors


async def test_a_pipeline_graph_renders_with_live_node_states(browse, ferry, api, pool, tmp_path):
    project = ferry["project"]["id"]
    await deploy_flow(api, project)
    gate = tmp_path / "gate"
    gate.write_text("")
    pipeline = await create_pipeline(
        api,
        project,
        "graph",
        [
            node("start", "add", plus=1),
            node("wait", "hold", path=str(gate), seconds=60.0),
            node("double", "add", plus=2),
            node("bump", "add", plus=10),
        ],
        [
            link("start", "n", "wait", "n"),
            link("start", "n", "double", "n"),
            link("wait", "n", "bump", "n"),
        ],
    )
    console = await browse("developer")
    page = console.page
    await console.open(f"/pipelines/{pipeline['id']}")
    assert await page.locator("#graph g.node").count() == 4
    await console.shot("pipeline")
    await page.fill("textarea[aria-label='pipeline input as JSON']", '{"n": 1}')
    await page.get_by_role("button", name="Execute").click()
    await page.wait_for_url("**/pipeline-executions/*")
    graph = page.locator("#graph")
    await graph.locator('g[data-node="wait"][data-status="in-progress"]').wait_for(timeout=60_000)
    await graph.locator('g[data-node="double"][data-status="success"]').wait_for(timeout=60_000)
    assert await graph.locator('g[data-node="bump"]').get_attribute("data-status") == "pending"
    # The layered layout puts each node right of the nodes it takes from.
    xs = {
        n: (await graph.locator(f'g[data-node="{n}"]').bounding_box())["x"]
        for n in ("start", "wait", "double", "bump")
    }
    assert xs["start"] < xs["wait"] == xs["double"] < xs["bump"], xs
    assert "null" not in await page.inner_text("#content > .card")
    await console.shot("pipeline-execution-running")
    gate.unlink()
    await graph.locator('g[data-node="bump"][data-status="success"]').wait_for(timeout=60_000)
    await page.locator('#run-status .badge[data-status="success"]').wait_for(timeout=30_000)
    await graph.locator('g[data-node="bump"]').click()
    await page.locator("#node-detail .badge[data-status=success]").first.wait_for()
    run_id = page.url.rsplit("/", 1)[1]
    status, run_ = await api.get(f"{V1}/pipeline-executions/{run_id}")
    assert status == 200 and run_["status"] == "success", run_
    assert {n["node"]: n["status"] for n in run_["nodes"]} == dict.fromkeys(
        ("start", "wait", "double", "bump"), "success"
    )
    await console.shot("pipeline-execution")
    assert console.errors == []


async def test_every_page_renders_wide_narrow_light_and_dark(browse, ferry, api, pool):
    """A tour of the pages for the screenshots, at 1280 px and at phone width."""
    project = ferry["project"]["id"]
    ok = await run(api, ferry, "greet", {"who": "tour"})
    status, bad = await api.post(
        f"{V1}/executions",
        {"service": ferry["service"]["id"], "function": "hold", "input": {"seconds": 30}},
    )
    assert status == 201
    status, trigger = await api.post(
        f"{V1}/triggers",
        {
            "project": project,
            "name": "nightly",
            "type": "cron",
            "operation": {
                "type": "function",
                "service": ferry["service"]["id"],
                "function": "greet",
            },
            "input": {"who": "cron"},
            "spec": {"cron": "0 3 * * *"},
        },
    )
    assert status == 201, trigger
    await until(lambda: _is(api, ok["id"], "success"), 60, "the run to finish")
    await api.post(f"{V1}/executions/{bad['id']}/terminate")
    pages = {
        "overview": "/",
        "executions": "/executions",
        "services": "/services",
        "service": f"/services/{ferry['service']['id']}",
        "packages": "/packages",
        "package": f"/packages/{ferry['package']['id']}",
        "execution": f"/executions/{ok['id']}",
        "triggers": "/triggers",
        "pipelines": "/pipelines",
    }
    for scheme in ("light", "dark"):
        for label, viewport in (
            ("wide", {"width": 1280, "height": 900}),
            ("phone", {"width": 390, "height": 844}),
        ):
            console = await browse("owner", viewport=viewport, color_scheme=scheme)
            for name, path in pages.items():
                await console.open(path)
                await asyncio.sleep(0.3)
                wide = await console.page.evaluate("document.documentElement.scrollWidth")
                assert wide <= viewport["width"] + 1, f"{name} scrolls sideways at {label}"
                text = await console.page.inner_text("#content")
                assert "undefined" not in text and "null" not in text, f"{name}: {text}"
                await console.shot(f"{name}-{label}-{scheme}")
            assert console.errors == [], console.errors
    # Keyboard: the skip link and the sign-out button are reachable with Tab.
    console = await browse("owner")
    await console.open("/triggers")
    await console.page.keyboard.press("Tab")
    assert await console.page.evaluate("document.activeElement.className") == "skip"
    await (
        console.page.locator(f'tr[data-id="{trigger["id"]}"]')
        .get_by_role("button", name="Pause")
        .click()
    )
    status, paused = await until(
        lambda: _trigger_paused(api, trigger["id"]), 10, "the trigger to be paused"
    )


async def _trigger_paused(api, trigger_id: str):
    status, trigger = await api.get(f"{V1}/triggers/{trigger_id}")
    return (status, trigger) if not trigger["active"] else None
