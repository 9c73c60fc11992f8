"""Ferry's benchmark: one command, one throw-away Ferry, every figure side by side.

    .venv/bin/python -m bench [--quick] [--runtime docker|process]
    .venv/bin/python bench/run.py ...          (the same)

Prints a table, and writes the JSON report to bench/results/latest.json (plus a dated
copy). See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import arq_cases, ferry_cases, scale_cases
from bench.stack import REPO, FerryStack
from bench.stats import exit_status, save_report

RESULTS = REPO / "bench" / "results"

TARGETS = {
    "warm_p50_ms": 8.0,
    "warm_p99_ms": 25.0,
    "throughput_per_s": 800.0,
    "cpu_per_execution_ms": 2.5,
    "idle_replica_worker_redis_ms_per_s": 2.0,
    "cold_start_p50_ms": 150.0,
    "many_services_idle_cores": 0.1,
    "memory_per_idle_replica_mb": 30.0,
}
HIGHER_IS_BETTER = {"throughput_per_s"}
# The arq baseline at the 5 ms poll delay Ferry's replicas used before they were woken by
# enqueues: arq's latency at its best.
ARQ_FAST_POLL_S = 0.005
# The second throughput phase's `executions_per_process`: one forked process runs this
# many executions instead of one (the fork is most of an execution's CPU).
REUSE = 1000


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=20, check=False, cwd=REPO
        )
        return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "nproc_cmd": _run(["nproc"]),
        "cpu": cpu,
        "mem_total_gb": mem_total_gb,
        "free_g": _run(["free", "-g"]),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker_server": _run(["docker", "version", "--format", "{{.Server.Version}}"]),
        "docker_storage_driver": _run(["docker", "info", "--format", "{{.Driver}}"]),
        "loadavg_at_start": os.getloadavg(),
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty_files": _run(
            ["git", "status", "--porcelain", "--untracked-files=no"]
        ).splitlines(),
    }


def plan(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    runs = args.runs or (100 if quick else 500)
    return {
        "mode": "quick" if quick else "full",
        "runtime": args.runtime,
        "warm_runs": runs,
        "warmup": 20 if quick else 50,
        "throughput_executions": args.throughput,
        "batch_size": 1000,
        "throughput_replicas": 2,
        "throughput_concurrency": 16,
        "cold_repeats": 3 if quick else 5,
        "arq_runs": runs,
        "arq_default_runs": args.arq_default_runs if args.arq_default_runs is not None else runs,
        "arq_throughput_max_jobs": 32,  # = Ferry's 2 replicas x concurrency 16
        "docker_calls": 10 if quick else 20,
        "http_floor_calls": 100 if quick else 300,
        "idle_s": 8 if quick else 20,
        "many_services": args.services,
        "many_idle_s": 10 if quick else 30,
        "load_clients": 50,
        "load_executions": 1000 if quick else 4000,
    }


async def measure(stack: FerryStack, p: dict[str, Any], report: dict[str, Any]) -> None:
    from core.settings import Settings

    poll_delay = ARQ_FAST_POLL_S
    report["settings"] = {
        "ferry_queue_fallback_poll_s": Settings(_env_file=None).queue_fallback_poll_s,
        "arq_fast_poll_delay_s": poll_delay,
        "arq_default_poll_delay_s": 0.5,
    }
    ferry: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    report["ferry"], report["baselines"] = ferry, baselines
    client = ferry_cases.FerryClient(stack.url, stack.token)
    meter = stack.cpu_meter()
    logs = stack.dir
    assert logs is not None
    try:
        project, package = await client.setup_package("bench")
        step(f"idle, no replica: {p['idle_s']} s")
        ferry["idle_no_replica"] = await scale_cases.idle_cpu(meter, p["idle_s"])
        step("HTTP floor (GET /healthz)")
        ferry["http_floor"] = await ferry_cases.http_floor(client, p["http_floor_calls"])
        # The default (a fresh process per execution), then processes reused: each
        # variant's service is paused once measured, so it does not idle under the next.
        reused = {"executions_per_process": REUSE}
        for key, name, runtime, what in (
            ("warm_latency", "warm", None, ""),
            ("warm_latency_reused", "warm-reused", reused, ", processes reused"),
        ):
            step(f"warm latency{what}: {p['warm_runs']} sequential no-op executions")
            ferry[key], service_id = await ferry_cases.warm_latency(
                client,
                stack.dsn,
                project,
                package,
                runs=p["warm_runs"],
                warmup=p["warmup"],
                budget_s=900,
                meter=meter,
                name=name,
                runtime=runtime,
            )
            stack.check_alive()
            if runtime is None:
                warm_id = service_id  # its idle replica is measured next
            else:
                await ferry_cases.pause(client, [service_id])
        step(f"idle, one warm replica: {p['idle_s']} s")
        ferry["idle_warm_replica"] = await scale_cases.idle_cpu(meter, p["idle_s"])
        ferry["idle_warm_replica"]["memory"] = scale_cases.agent_memory(meter, stack.pid("worker"))
        for key, name, runtime, what in (
            ("throughput", "throughput", None, ""),
            (
                "throughput_reused",
                "throughput-reused",
                reused,
                f", processes reused ({REUSE} each)",
            ),
        ):
            step(
                f"throughput{what}: {p['throughput_executions']} executions in batches of "
                f"{p['batch_size']}"
            )
            ferry[key], service_id = await ferry_cases.throughput(
                client,
                stack.dsn,
                project,
                package,
                total=p["throughput_executions"],
                batch=p["batch_size"],
                concurrency=p["throughput_concurrency"],
                replicas=p["throughput_replicas"],
                budget_s=600,
                meter=meter,
                name=name,
                runtime=runtime,
            )
            stack.check_alive()
            if runtime is None:
                tp_id = service_id  # the load phase runs on it
            else:
                await ferry_cases.pause(client, [service_id])
        step(f"load: {p['load_executions']} executions from {p['load_clients']} clients")
        ferry["load"] = await scale_cases.concurrent_clients(
            stack.url,
            stack.token,
            tp_id,
            clients=p["load_clients"],
            total=p["load_executions"],
            budget_s=600,
            meter=meter,
        )
        stack.check_alive()
        step(f"cold start: {p['cold_repeats']} new services")
        ferry["cold_start"] = await ferry_cases.cold_starts(
            client, stack.dsn, project, package, repeats=p["cold_repeats"]
        )
        stack.check_alive()
        if p["runtime"] == "docker":
            # A shape the warm pool does not keep: each replica starts its own container.
            step(f"cold start without the warm pool: {p['cold_repeats']} new services")
            ferry["cold_start_no_pool"] = await ferry_cases.cold_starts(
                client,
                stack.dsn,
                project,
                package,
                repeats=p["cold_repeats"],
                runtime={"memory_mb": 500},
                name="cold-nopool",
            )
            stack.check_alive()
        step("pausing Ferry's services")
        await ferry_cases.pause(client, [warm_id, tp_id])
        if p["many_services"]:
            step(f"many services: {p['many_services']} services with one warm replica each")
            many = await scale_cases.many_services(
                client,
                stack.dsn,
                project,
                package,
                count=p["many_services"],
                idle_s=p["many_idle_s"],
                meter=meter,
                worker_pid=stack.pid("worker"),
                budget_s=900,
            )
            many_ids = many.pop("service_ids")
            ferry["many_services"] = many
            stack.check_alive()
            step("pausing the many services")
            await ferry_cases.pause(client, many_ids)
    finally:
        await client.close()

    arq_log = logs / "arq-worker.log"
    step(f"arq latency, poll_delay {poll_delay}: {p['arq_runs']} jobs")
    baselines["arq_latency_ferry_poll"] = await arq_cases.arq_latency(
        stack.redis_url,
        poll_delay,
        runs=p["arq_runs"],
        warmup=p["warmup"],
        budget_s=900,
        log_path=arq_log,
        meter=meter,
    )
    step(f"arq latency, poll_delay 0.5: {p['arq_default_runs']} jobs (about 0.5 s each)")
    baselines["arq_latency_default_poll"] = await arq_cases.arq_latency(
        stack.redis_url,
        0.5,
        runs=p["arq_default_runs"],
        warmup=2,
        budget_s=900,
        log_path=arq_log,
        meter=meter,
    )
    for name, delay in (("ferry_poll", poll_delay), ("default_poll", 0.5)):
        step(f"arq throughput, poll_delay {delay}: {p['throughput_executions']} jobs")
        baselines[f"arq_throughput_{name}"] = await arq_cases.arq_throughput(
            stack.redis_url,
            delay,
            total=p["throughput_executions"],
            max_jobs=p["arq_throughput_max_jobs"],
            budget_s=600,
            log_path=arq_log,
            meter=meter,
        )


def wait_quiet(limit_s: float) -> None:
    threshold = (os.cpu_count() or 1) * 0.5
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        step(f"load average {os.getloadavg()[0]:.1f} ≥ {threshold:g}: waiting")
        time.sleep(15)


def step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def verdicts(report: dict[str, Any]) -> dict[str, Any]:
    ferry = report.get("ferry", {})
    warm = ferry.get("warm_latency", {}).get("post_to_terminal", {})
    tp = ferry.get("throughput", {})
    cold = ferry.get("cold_start", {}).get("post_to_terminal", {})
    many = ferry.get("many_services", {})
    idle_one = ferry.get("idle_warm_replica", {}).get("worker_redis_ms_per_s")
    idle_none = ferry.get("idle_no_replica", {}).get("worker_redis_ms_per_s")
    measured = {
        "warm_p50_ms": warm.get("p50_ms"),
        "warm_p99_ms": warm.get("p99_ms"),
        "throughput_per_s": tp.get("executions_per_s"),
        "cpu_per_execution_ms": tp.get("cpu", {}).get("system_cpu_ms_per_unit"),
        "idle_replica_worker_redis_ms_per_s": None
        if idle_one is None or idle_none is None
        else round(max(idle_one - idle_none, 0.0), 2),
        "cold_start_p50_ms": cold.get("p50_ms"),
        "many_services_idle_cores": many.get("idle_cores"),
        "memory_per_idle_replica_mb": many.get("memory", {}).get("rss_mb_per_replica_p50"),
    }
    out = {}
    for name, target in TARGETS.items():
        value = measured[name]
        higher_is_better = name in HIGHER_IS_BETTER
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        out[name] = {"measured": value, "target": target, "met": met}
    return out


def _met(value: Any, at_least: float | None = None) -> str:
    """A verdict for rows outside TARGETS: a bool, or `value >= at_least`."""
    if value is None:
        return "—"
    ok = value >= at_least if at_least is not None else bool(value)
    return "met" if ok else "MISSED"


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    return f"{value}{unit}"


def table(report: dict[str, Any]) -> str:
    ferry, base = report.get("ferry", {}), report.get("baselines", {})
    v = report.get("verdicts", {})
    rows: list[tuple[str, str, str, str]] = []

    def verdict(name: str) -> tuple[str, str]:
        item = v.get(name, {})
        sign = "≥" if name in HIGHER_IS_BETTER else "≤"
        met = item.get("met")
        return f"{sign} {item.get('target'):g}", "—" if met is None else (
            "met" if met else "MISSED"
        )

    warm = ferry.get("warm_latency", {}).get("post_to_terminal", {})
    rows.append(("Ferry warm p50 (ms)", _fmt(warm.get("p50_ms")), *verdict("warm_p50_ms")))
    rows.append(("Ferry warm p99 (ms)", _fmt(warm.get("p99_ms")), *verdict("warm_p99_ms")))
    rows.append(("Ferry warm mean (ms)", _fmt(warm.get("mean_ms")), "", ""))
    tp = ferry.get("throughput", {})
    rows.append(
        (
            "Ferry throughput (exec/s)",
            _fmt(tp.get("executions_per_s")),
            *verdict("throughput_per_s"),
        )
    )
    cold = ferry.get("cold_start", {}).get("post_to_terminal", {})
    cold_runs = ferry.get("cold_start", {})
    pool_hits = f" ({cold_runs.get('from_warm_pool')}/{cold_runs.get('repeats')} warm pool)"
    rows.append(
        (
            f"Ferry cold start p50 (ms){pool_hits if 'from_warm_pool' in cold_runs else ''}",
            _fmt(cold.get("p50_ms")),
            *verdict("cold_start_p50_ms"),
        )
    )
    no_pool = ferry.get("cold_start_no_pool", {})
    if no_pool:
        rows.append(
            (
                "Ferry cold start p50, no warm pool (memory_mb 500) (ms)",
                _fmt(no_pool.get("post_to_terminal", {}).get("p50_ms")),
                "",
                "",
            )
        )
    warm_cpu = ferry.get("warm_latency", {}).get("cpu", {})
    tp_cpu = tp.get("cpu", {})
    arq_cpu = base.get("arq_throughput_ferry_poll", {}).get("cpu", {})
    rows.append(
        (
            "Ferry CPU per execution, throughput (ms)",
            _fmt(tp_cpu.get("system_cpu_ms_per_unit")),
            "",
            "",
        )
    )
    rows[-1] = (rows[-1][0], rows[-1][1], *verdict("cpu_per_execution_ms"))
    rows.append(
        ("arq CPU per job, throughput (ms)", _fmt(arq_cpu.get("system_cpu_ms_per_unit")), "", "")
    )
    arq_rate = base.get("arq_throughput_ferry_poll", {}).get("jobs_per_s")
    if tp.get("executions_per_s") and arq_rate:
        share = 100 * tp["executions_per_s"] / arq_rate
        rows.append(("Ferry throughput, % of bare arq's", _fmt(share), "≥ 60", _met(share >= 60)))
    reused = ferry.get("throughput_reused", {})
    if reused:
        rate, cpu = reused.get("executions_per_s"), reused.get("cpu", {})
        per = cpu.get("system_cpu_ms_per_unit")
        label = f"processes reused ({REUSE} executions each)"
        rows.append((f"Ferry throughput, {label} (exec/s)", _fmt(rate), "≥ 800", _met(rate, 800)))
        if rate and arq_rate:
            share = 100 * rate / arq_rate
            rows.append(("  same, % of bare arq's", _fmt(share), "≥ 60", _met(share >= 60)))
        rows.append(
            (
                f"Ferry CPU per execution, {label} (ms)",
                _fmt(per),
                "≤ 2.5",
                _met(per is not None and per <= 2.5),
            )
        )
    for key, label in (
        ("warm_latency", ""),
        ("warm_latency_reused", f", processes reused ({REUSE} each)"),
    ):
        for part, how in (("post_to_terminal", "POST + wait"), ("one_request", "POST ?wait=")):
            if key == "warm_latency" and part == "post_to_terminal":
                continue  # the first two rows of the table
            item = ferry.get(key, {}).get(part, {})
            if item:
                p50, p99 = item.get("p50_ms"), item.get("p99_ms")
                rows.append(
                    (
                        f"Ferry warm p50 / p99{label}, {how} (ms)",
                        f"{_fmt(p50)} / {_fmt(p99)}",
                        "≤ 8 / 25",
                        _met(p50 is not None and p50 <= 8 and p99 <= 25),
                    )
                )
    idle_v = v.get("idle_replica_worker_redis_ms_per_s", {})
    rows.append(
        (
            "idle warm replica, worker + Redis (ms CPU/s)",
            _fmt(idle_v.get("measured")),
            *verdict("idle_replica_worker_redis_ms_per_s"),
        )
    )
    load = ferry.get("load", {})
    rows.append(
        (
            f"load, {load.get('clients')} clients (exec/s; p50 / p99 ms)",
            f"{_fmt(load.get('executions_per_s'))}; "
            f"{_fmt(load.get('post_to_terminal', {}).get('p50_ms'))} / "
            f"{_fmt(load.get('post_to_terminal', {}).get('p99_ms'))}",
            "",
            "",
        )
    )
    many = ferry.get("many_services", {})
    if many:
        rows.append(
            (
                f"{many.get('services')} idle services: cores in all",
                _fmt(many.get("idle_cores")),
                *verdict("many_services_idle_cores"),
            )
        )
        rows.append(
            (
                "memory per idle replica, RSS p50 (MB)",
                _fmt(many.get("memory", {}).get("rss_mb_per_replica_p50")),
                *verdict("memory_per_idle_replica_mb"),
            )
        )
        one = many.get("one_each", {}).get("post_to_terminal", {})
        rows.append(
            (
                "then one execution on each: p50 / p99 (ms)",
                f"{_fmt(one.get('p50_ms'))} / {_fmt(one.get('p99_ms'))}",
                "",
                "",
            )
        )
    rows.append(
        (
            "other tenants' CPU share, warm / throughput / load / many idle (%)",
            f"{_fmt(warm_cpu.get('others_pct_of_machine'))} / "
            f"{_fmt(tp_cpu.get('others_pct_of_machine'))} / "
            f"{_fmt(load.get('cpu', {}).get('others_pct_of_machine'))} / "
            f"{_fmt(many.get('idle', {}).get('others_pct_of_machine'))}",
            "",
            "",
        )
    )
    floor = ferry.get("http_floor", {})
    rows.append(("HTTP floor GET /healthz p50 (ms)", _fmt(floor.get("p50_ms")), "", ""))
    for key, label in (("arq_latency_ferry_poll", "arq"), ("arq_latency_default_poll", "arq")):
        item = base.get(key, {})
        lat = item.get("enqueue_to_result", {})
        delay = item.get("poll_delay_s")
        rows.append(
            (
                f"{label} p50 / p99 (ms), poll {delay}",
                f"{_fmt(lat.get('p50_ms'))} / {_fmt(lat.get('p99_ms'))}",
                "",
                "",
            )
        )
    for key in ("arq_throughput_ferry_poll", "arq_throughput_default_poll"):
        item = base.get(key, {})
        rows.append(
            (
                f"arq throughput (jobs/s), poll {item.get('poll_delay_s')}",
                _fmt(item.get("jobs_per_s")),
                "",
                "",
            )
        )
    if "docker_run" in base:
        run = base["docker_run"]["per_call"]
        rows.append(("docker run --rm … python3 -c pass p50 (ms)", _fmt(run.get("p50_ms")), "", ""))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{'figure'.ljust(width)}  {'measured':>16}  {'target':>8}  verdict",
        "-" * (width + 40),
    ]
    for name, value, target, ok in rows:
        lines.append(f"{name.ljust(width)}  {value:>16}  {target:>8}  {ok}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="100 warm runs, 3 cold starts")
    parser.add_argument("--runtime", choices=("docker", "process"), default="docker")
    parser.add_argument("--runs", type=int, default=None, help="warm latency runs (and arq's)")
    parser.add_argument(
        "--arq-default-runs",
        type=int,
        default=None,
        help="runs of the arq poll_delay=0.5 latency (default: --runs)",
    )
    parser.add_argument("--throughput", type=int, default=5000, help="executions to push")
    parser.add_argument(
        "--services",
        type=int,
        default=200,
        help="services of the many-services phase, one warm replica each (0: skip it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to "
        "drop below half the cores (a shared machine)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)

    p = plan(args)
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    started = datetime.datetime.now(datetime.UTC)
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "plan": p,
        "machine": machine(),
        "targets": TARGETS,
    }
    stack = FerryStack(
        runtime=args.runtime, keep_dir=args.keep, worker_capacity=max(16, args.services + 8)
    )
    error: BaseException | None = None
    try:
        step(
            f"starting Ferry ({args.runtime} runtime): embedded PostgreSQL + Redis, "
            "api, worker, scheduler"
        )
        stack.start()
        asyncio.run(measure(stack, p, report))
    except BaseException as exc:  # still stop everything and save what was measured
        error = exc
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        step("stopping Ferry")
        stack.stop()
        if args.keep and stack.dir is not None:
            step(f"kept {stack.dir}")
    if error is None and args.runtime == "docker":
        try:
            step(f"docker run baseline: {p['docker_calls']} calls")
            report.setdefault("baselines", {})["docker_run"] = arq_cases.docker_run(
                "ferry/runner:py3", p["docker_calls"], budget_s=300
            )
        except BaseException as exc:
            error = exc
            report["error"] = f"{type(exc).__name__}: {exc}"
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["verdicts"] = verdicts(report)
    report["duration_s"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    dated = save_report(
        report, args.out, f"{started:%Y%m%dT%H%M%S}-{p['mode']}-{args.runtime}.json"
    )
    print(table(report))
    print(f"\nreport saved to {args.out} and {dated}")
    return exit_status(report, error)


if __name__ == "__main__":
    raise SystemExit(main())
