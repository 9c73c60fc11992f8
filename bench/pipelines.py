"""Ferry's pipeline benchmark, side by side with its baselines measured in the same run.

    .venv/bin/python -m bench.pipelines [--quick] [--runtime process|docker] [--keep]

Cases (see bench/README.md, "Pipelines"):
  hop latency    A -> B -> C of no-op functions on one warm replica: per hop, upstream
                 finished_at -> downstream started_at (PostgreSQL), and end to end from the
                 client; by Ferry's pipeline engine and chained by hand through the
                 executions API; Celery's `chain` of three no-ops end to end.
  fan-out        spread -> N elements -> merge -> one node: wall time and CPU per element;
                 by the engine, by hand (batch POST, poll, list, POST), and Celery's `chord`.

Nothing is asserted: targets are printed next to the figures. The report goes to stdout and
bench/results/pipelines-latest.json (plus a dated copy). A Ferry without the pipelines API
still measures the baselines; its own pipeline figures are then reported as missing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import celery_cases, hand_chained, pipeline_cases
from bench.ferry_cases import JITTER_S, FerryClient, pause
from bench.run import machine, step, wait_quiet
from bench.stack import REPO, FerryStack
from bench.stats import exit_status, save_report

RESULTS = REPO / "bench" / "results"
TARGETS = {"hop_p50_ms": 10.0, "hop_p99_ms": 40.0, "fanout_wall_s": 2.0}


def plan(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "mode": "quick" if quick else "full",
        "runtime": args.runtime,
        "chain_runs": args.runs or (50 if quick else 200),
        "chain_warmup": 10 if quick else 20,
        "hop_replicas": 1,
        "hop_concurrency": 4,
        "fanout_size": args.size,
        "fanout_repeats": args.repeats or (1 if quick else 3),
        "fanout_replicas": 2,
        "fanout_concurrency": 16,
        "batch_size": 1000,
        "celery_concurrency": args.celery_concurrency,
        "celery": not args.no_celery,
    }


async def measure_ferry(stack: FerryStack, p: dict[str, Any], report: dict[str, Any]) -> None:
    ferry: dict[str, Any] = report.setdefault("ferry", {})
    hand: dict[str, Any] = report.setdefault("hand_chained", {})
    client = FerryClient(stack.url, stack.token)
    meter = stack.cpu_meter()
    try:
        project, package = await pipeline_cases.setup(client)
        available = await pipeline_cases.pipelines_available(client, project)
        report["pipelines_api"] = available
        if not available:
            step(
                "this Ferry has no pipelines API (GET /api/v1/pipelines is not served): "
                "only the baselines are measured"
            )
        hop_service = await pipeline_cases.warm_service(
            client, project, package, "hop", p["hop_replicas"], p["hop_concurrency"]
        )
        step(f"hand-chained A->B->C through the executions API: {p['chain_runs']} runs")
        hand["chain"] = await hand_chained.hand_chain(
            client,
            stack.dsn,
            hop_service,
            runs=p["chain_runs"],
            warmup=p["chain_warmup"],
            budget_s=300,
            meter=meter,
        )
        stack.check_alive()
        if available:
            step(f"Ferry pipeline A->B->C: {p['chain_runs']} runs")
            ferry["chain"] = await _guarded(
                pipeline_cases.ferry_chain(
                    client,
                    stack.dsn,
                    project,
                    hop_service,
                    runs=p["chain_runs"],
                    warmup=p["chain_warmup"],
                    budget_s=300,
                    meter=meter,
                )
            )
            stack.check_alive()
        await pause(client, [hop_service])
        fan_service = await pipeline_cases.warm_service(
            client, project, package, "fanout", p["fanout_replicas"], p["fanout_concurrency"]
        )
        step(f"hand-chained fan-out of {p['fanout_size']}: {p['fanout_repeats']} runs")
        hand["fanout"] = await hand_chained.hand_fanout(
            client,
            fan_service,
            size=p["fanout_size"],
            repeats=p["fanout_repeats"],
            batch=p["batch_size"],
            budget_s=300,
            meter=meter,
        )
        stack.check_alive()
        if available:
            step(f"Ferry pipeline fan-out of {p['fanout_size']}: {p['fanout_repeats']} runs")
            ferry["fanout"] = await _guarded(
                pipeline_cases.ferry_fanout(
                    client,
                    stack.dsn,
                    project,
                    fan_service,
                    size=p["fanout_size"],
                    repeats=p["fanout_repeats"],
                    budget_s=300,
                    meter=meter,
                )
            )
            stack.check_alive()
        # Ferry idles through the Celery baseline: no replica polls Redis meanwhile.
        await pause(client, [fan_service])
    finally:
        await client.close()


async def _guarded(case: Any) -> dict[str, Any]:
    """A Ferry pipeline case that fails is reported as such; the baselines still run."""
    try:
        return await case
    except Exception as exc:
        step(f"  failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}


def measure_celery(stack: FerryStack, p: dict[str, Any], report: dict[str, Any]) -> None:
    assert stack.dir is not None
    python = celery_cases.celery_python(step)
    baseline = celery_cases.CeleryBaseline(
        python, stack.redis_url, p["celery_concurrency"], stack.dir, stack.cpu_meter()
    )
    celery: dict[str, Any] = report.setdefault("celery", {})
    celery["python"] = python
    celery["concurrency"] = p["celery_concurrency"]
    try:
        step(f"Celery: prefork worker, concurrency {p['celery_concurrency']}")
        baseline.start()
        step(f"Celery chain of three no-ops: {p['chain_runs']} runs")
        celery["chain"] = baseline.chains(p["chain_runs"], p["chain_warmup"], JITTER_S, 300)
        step(
            f"Celery chord of {p['fanout_size']} no-ops into one callback: "
            f"{p['fanout_repeats']} runs"
        )
        celery["chord"] = baseline.chords(p["fanout_size"], p["fanout_repeats"], 300)
    finally:
        baseline.stop()


# -- the table -------------------------------------------------------------------------------


def _get(report: dict[str, Any], *keys: str) -> Any:
    value: Any = report
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value * scale:,.{digits}f}"


def table(report: dict[str, Any]) -> str:
    size = report["plan"]["fanout_size"]
    missing = "not run" if report.get("pipelines_api") else "no engine yet"

    def ferry(*keys: str, scale: float = 1.0, digits: int = 1) -> str:
        if _get(report, "ferry", keys[0], "error"):
            return "failed"
        value = _get(report, "ferry", *keys)
        return missing if value is None else _fmt(value, scale, digits)

    def other(*keys: str, scale: float = 1.0, digits: int = 1) -> str:
        return _fmt(_get(report, *keys), scale, digits)

    def with_client(cpu: Any) -> str:
        if not isinstance(cpu, dict) or not cpu.get("units"):
            return "—"
        client = cpu["cpu_ms_per_unit"].get("bench client", 0.0)
        return _fmt(cpu["system_cpu_ms_per_unit"] + client, digits=2)

    def ferry_with_client(case: str) -> str:
        if _get(report, "ferry", case, "error"):
            return "failed"
        cpu = _get(report, "ferry", case, "cpu")
        return missing if cpu is None else with_client(cpu)

    def other_with_client(case: str) -> str:
        return with_client(_get(report, "hand_chained", case, "cpu"))

    rows = [
        (
            "hop p50 (ms), finished -> next started",
            ferry("chain", "hop", "p50_ms"),
            other("hand_chained", "chain", "hop", "p50_ms"),
            other("celery", "chain", "hop", "p50_ms"),
            "≤ 10 ms",
        ),
        (
            "hop p99 (ms)",
            ferry("chain", "hop", "p99_ms"),
            other("hand_chained", "chain", "hop", "p99_ms"),
            other("celery", "chain", "hop", "p99_ms"),
            "≤ 40 ms",
        ),
        (
            "A->B->C end to end p50 (ms), client",
            ferry("chain", "end_to_end", "p50_ms"),
            other("hand_chained", "chain", "end_to_end", "p50_ms"),
            other("celery", "chain", "end_to_end", "p50_ms"),
            "",
        ),
        (
            "A->B->C end to end p99 (ms)",
            ferry("chain", "end_to_end", "p99_ms"),
            other("hand_chained", "chain", "end_to_end", "p99_ms"),
            other("celery", "chain", "end_to_end", "p99_ms"),
            "",
        ),
        (
            f"fan-out {size:,} -> merge -> one, wall p50 (s)",
            ferry("fanout", "wall", "p50_ms", scale=0.001, digits=2),
            other("hand_chained", "fanout", "wall", "p50_ms", scale=0.001, digits=2),
            other("celery", "chord", "wall", "p50_ms", scale=0.001, digits=2),
            "≤ 2 s" if size == 1000 else "",
        ),
        (
            "fan-out CPU per element (ms), system under test",
            ferry("fanout", "cpu", "system_cpu_ms_per_unit", digits=2),
            other("hand_chained", "fanout", "cpu", "system_cpu_ms_per_unit", digits=2),
            other("celery", "chord", "cpu", "celery_cpu_ms_per_unit", digits=2),
            "",
        ),
        (
            "fan-out CPU per element with the client's (ms)",
            ferry_with_client("fanout"),
            other_with_client("fanout"),
            other("celery", "chord", "cpu", "celery_with_client_cpu_ms_per_unit", digits=2),
            "",
        ),
        (
            "chain CPU per node execution, sequential (ms)",
            ferry("chain", "cpu", "system_cpu_ms_per_unit", digits=2),
            other("hand_chained", "chain", "cpu", "system_cpu_ms_per_unit", digits=2),
            other("celery", "chain", "cpu", "celery_cpu_ms_per_unit", digits=2),
            "",
        ),
        (
            "other tenants' CPU share, chain / fan-out (%)",
            f"{ferry('chain', 'cpu', 'others_pct_of_machine')} / "
            f"{ferry('fanout', 'cpu', 'others_pct_of_machine')}",
            f"{other('hand_chained', 'chain', 'cpu', 'others_pct_of_machine')} / "
            f"{other('hand_chained', 'fanout', 'cpu', 'others_pct_of_machine')}",
            f"{other('celery', 'chain', 'cpu', 'others_pct_of_machine')} / "
            f"{other('celery', 'chord', 'cpu', 'others_pct_of_machine')}",
            "",
        ),
    ]
    header = ("figure", "Ferry", "hand-chained via API", "Celery", "target")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    lines = [
        "  ".join(
            [
                header[0].ljust(widths[0]),
                *(h.rjust(w) for h, w in zip(header[1:4], widths[1:4], strict=True)),
                header[4],
            ]
        ),
        "-" * (sum(widths) + 8),
    ]
    for row in rows:
        lines.append(
            "  ".join(
                [
                    row[0].ljust(widths[0]),
                    *(v.rjust(w) for v, w in zip(row[1:4], widths[1:4], strict=True)),
                    row[4],
                ]
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipelines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="50 chain runs instead of 200, one fan-out instead of 3",
    )
    parser.add_argument("--runtime", choices=("process", "docker"), default="process")
    parser.add_argument("--runs", type=int, default=None, help="A->B->C runs per case")
    parser.add_argument("--size", type=int, default=1000, help="fan-out elements")
    parser.add_argument("--repeats", type=int, default=None, help="fan-out runs per case")
    parser.add_argument(
        "--celery-concurrency",
        type=int,
        default=os.cpu_count() or 2,
        help="prefork processes of the Celery worker (default: the cores)",
    )
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery baseline")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to drop below half "
        "the cores (a shared machine)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    parser.add_argument("--out", type=Path, default=RESULTS / "pipelines-latest.json")
    args = parser.parse_args(argv)
    if not 1 <= args.size <= 100_000:
        parser.error("--size must be between 1 and 100000")

    p = plan(args)
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    started = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "benchmark": "pipelines",
        "date": started.isoformat(timespec="seconds"),
        "plan": p,
        "machine": machine(),
        "targets": TARGETS,
    }
    stack = FerryStack(runtime=args.runtime, keep_dir=args.keep)
    error: BaseException | None = None
    try:
        step(
            f"starting Ferry ({args.runtime} runtime): embedded PostgreSQL + Redis, "
            "api, worker, scheduler"
        )
        stack.start()
        asyncio.run(measure_ferry(stack, p, report))
        stack.check_alive()
        if p["celery"]:
            measure_celery(stack, p, report)
    except BaseException as exc:  # still stop everything and save what was measured
        error = exc
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        step("stopping Ferry")
        stack.stop()
        if args.keep and stack.dir is not None:
            step(f"kept {stack.dir}")
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["duration_s"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    save_report(
        report, args.out, f"pipelines-{started:%Y%m%dT%H%M%S}-{p['mode']}-{args.runtime}.json"
    )
    print(json.dumps(report, indent=2, default=str))
    print()
    print(table(report))
    print(f"\nsaved to {args.out}")
    return exit_status(report, error)


if __name__ == "__main__":
    raise SystemExit(main())
