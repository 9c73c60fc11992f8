"""Property-based fuzzing of the whole API from its served OpenAPI document.

Schemathesis generates requests for every operation, both valid ones and ones that break
the schema, and sends them to a live server on loopback backed by the real PostgreSQL and
Redis. Any 5xx, any status the document does not list for the operation, and any response
that does not match its documented schema or content type fails the test.

The run is bounded: a fixed number of examples per operation and mode, derandomized so CI
sees the same cases every time, and endless streams left out (the event stream, and live
log modes, which need an Accept header the generator never sends).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, openapi
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

EXAMPLES_PER_OPERATION = 25  # per generation mode; ~45 operations x 2 modes
TIME_BUDGET_S = 150.0  # a loaded CI machine stops early rather than overrunning
REQUEST_TIMEOUT_S = 30.0
SKIPPED = {("GET", "/api/v1/events/stream")}  # an endless SSE stream
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class FuzzReport:
    cases: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _run_operation(
    operation: Any,
    mode: GenerationMode,
    path_ids: dict[str, Any] | None,
    base_url: str,
    headers: dict[str, str],
    report: FuzzReport,
    session: requests.Session,
) -> None:
    label = f"{operation.method.upper()} {operation.path} [{mode.value}]"
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_ids)

    @hypothesis_settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        report.cases += 1
        report.by_operation[label] = report.by_operation.get(label, 0) + 1
        try:
            response = case.call(
                base_url=base_url, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S
            )
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # a failed check: report all at the end
            if len(report.failures) < 30:
                summary = " / ".join(str(exc).splitlines()[:12])
                report.failures.append(f"{label}: {summary}\n  {case.as_curl_command(headers)}")

    try:
        run()
    except Unsatisfiable:  # e.g. negative data for an operation that takes no input
        report.skipped.append(f"{label}: nothing to generate")


def fuzz(document: dict[str, Any], base_url: str, token: str, ids: dict[str, str]) -> FuzzReport:
    schema = openapi.from_dict(document)
    report = FuzzReport()
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    # Deletions last, so the objects the other operations are pointed at still exist.
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    started = time.monotonic()
    with requests.Session() as session:
        for operation in operations:
            key = (operation.method.upper(), operation.path)
            if key in SKIPPED:
                report.skipped.append(f"{key[0]} {key[1]}: endless stream")
                continue
            targets: list[dict[str, Any] | None] = [None]  # generated ids: mostly 404s
            resource = _resource_of(operation.path)
            if resource in ids and not operation.path.endswith("/wait"):
                targets.append({"id": ids[resource]})  # the real object: the deeper paths
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for target in targets:
                    if time.monotonic() - started > TIME_BUDGET_S:
                        report.skipped.append(f"{key[0]} {key[1]} [{mode.value}]: time budget")
                        continue
                    _run_operation(operation, mode, target, base_url, headers, report, session)
    return report


def _resource_of(path: str) -> str | None:
    parts = path.split("/")
    return parts[3] if len(parts) > 4 and parts[4] == "{id}" else None


@pytest.fixture
async def live_world(api, project, package, service) -> dict[str, Any]:
    status, execution = await api.post(
        "/api/v1/executions", {"service": service["id"], "function": "echo", "input": {"text": "x"}}
    )
    assert status == 201, execution
    status, trigger = await api.post(
        "/api/v1/triggers",
        {
            "project": project["id"],
            "name": "nightly",
            "type": "cron",
            "operation": {"type": "function", "service": service["id"], "function": "noop"},
            "spec": {"cron": "0 3 * * *"},
        },
    )
    assert status == 201, trigger
    status, token = await api.post(
        "/api/v1/tokens", {"name": "spare", "role": "viewer", "project": project["id"]}
    )
    assert status == 201, token
    return {
        "projects": project["id"],
        "packages": package["id"],
        "services": service["id"],
        "executions": execution["id"],
        "triggers": trigger["id"],
        "tokens": token["id"],
    }


async def test_fuzz_the_served_openapi_document(client, admin_token, live_world, record_property):
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    document = await response.json()
    base_url = str(client.make_url("")).rstrip("/")
    # The server runs on this test's event loop; the synchronous fuzzer runs beside it.
    report = await asyncio.to_thread(fuzz, document, base_url, admin_token, live_world)
    record_property("fuzz_cases", report.cases)
    print(
        f"\nfuzzed {report.cases} cases over {len(report.by_operation)} operation/mode pairs; "
        f"skipped {len(report.skipped)}"
    )
    for line in report.skipped:
        print(f"  skipped {line}")
    assert report.cases >= 200, report.by_operation
    assert not report.failures, f"{len(report.failures)} failing cases:\n" + "\n\n".join(
        report.failures
    )
