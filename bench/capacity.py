"""What one execution costs each part of a deploy/compose.yaml stack (docs/capacity.md).

    python -m bench.capacity --project NAME --url http://127.0.0.1:8700 --token T \
        --service SERVICE_ID [--count 1000] [--seconds 0]

Runs `count` executions of the service's `work` function (tests/cluster's package) in
batches and prints, per execution: PostgreSQL statements (pg_stat_statements, by kind),
transactions, rows written and WAL bytes (LSN delta), table growth; Redis commands
(INFO commandstats, by command); CPU seconds per container (cgroup v1 `cpuacct.usage`,
replica containers included). The stack is the compose project NAME on this engine.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from collections import Counter
from typing import Any

import httpx

TABLES = ("executions", "execution_attempts", "execution_logs", "outbox")


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout


def container(project: str, service: str) -> str:
    return sh("docker", "ps", "-q", "--filter", f"name=^{project}_{service}_1$").strip()


def psql(project: str, query: str) -> list[list[str]]:
    out = sh(
        "docker", "exec", "-i", container(project, "postgres"), "psql", "-X", "-q", "-U", "ferry",
        "-d", "ferry", "-tA", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", query,
    )  # fmt: skip
    return [line.split("\t") for line in out.splitlines() if line]


def redis_cli(project: str, *args: str) -> str:
    env = sh("docker", "inspect", "-f", "{{json .Config.Env}}", container(project, "redis"))
    password = next(
        (e.split("=", 1)[1] for e in json.loads(env) if e.startswith("REDIS_PASSWORD=")), ""
    )
    return sh(
        "docker", "exec", container(project, "redis"), "redis-cli", "-a", password,
        "--no-auth-warning", *args,
    )  # fmt: skip


def cpu_ns(project: str, installation: str) -> dict[str, int]:
    ids = sh("docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}")
    replicas = sh("docker", "ps", "-q", "--filter", f"label=ferry.owner={installation}")
    usage: dict[str, int] = {}
    for cid in ids.split():
        name = sh(
            "docker", "inspect", "-f", '{{index .Config.Labels "com.docker.compose.service"}}', cid
        ).strip()
        usage[name] = _usage(cid)
    usage["replicas"] = sum(_usage(cid) for cid in replicas.split())
    return usage


def _usage(cid: str) -> int:
    out = subprocess.run(
        ["docker", "exec", cid, "cat", "/sys/fs/cgroup/cpuacct/cpuacct.usage"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return int(out.stdout.strip() or 0)


def snapshot(project: str, installation: str) -> dict[str, Any]:
    (row,) = psql(
        project,
        "SELECT pg_current_wal_lsn(), xact_commit, tup_inserted, tup_updated, tup_deleted "
        "FROM pg_stat_database WHERE datname = 'ferry'",
    )
    sizes = {t: int(psql(project, f"SELECT pg_total_relation_size('{t}')")[0][0]) for t in TABLES}
    stats = {}
    for line in redis_cli(project, "INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_(\w+):calls=(\d+)", line)
        if m:
            stats[m.group(1)] = int(m.group(2))
    return {"pg": row, "sizes": sizes, "redis": stats, "cpu": cpu_ns(project, installation)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args()
    project = args.project
    psql(project, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    installation = psql(project, "SELECT id FROM installation")[0][0]
    time.sleep(2)
    psql(project, "SELECT pg_stat_statements_reset()")
    redis_cli(project, "CONFIG", "RESETSTAT")
    before = snapshot(project, installation)
    batch = f"capacity-{int(time.time())}"
    headers = {"Authorization": f"Bearer {args.token}"}
    started = time.monotonic()
    with httpx.Client(base_url=args.url, headers=headers, timeout=120) as http:
        for start in range(0, args.count, 500):
            items = [
                {"service": args.service, "function": "work",
                 "input": {"seconds": args.seconds, "batch": batch}}
                for _ in range(min(500, args.count - start))
            ]  # fmt: skip
            http.post("/api/v1/executions/batch", json={"executions": items}).raise_for_status()
    while (
        psql(
            project,
            f"SELECT count(*) FROM executions WHERE input->>'batch' = '{batch}' "
            "AND status NOT IN ('success', 'failed', 'terminated')",
        )[0][0]
        != "0"
    ):
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    time.sleep(2)  # the last outbox relays and heartbeats of the round
    after = snapshot(project, installation)
    n = args.count
    wal = int(
        psql(project, f"SELECT pg_wal_lsn_diff('{after['pg'][0]}', '{before['pg'][0]}')")[0][0]
    )
    commits, ins, upd, dele = (
        int(a) - int(b) for a, b in zip(after["pg"][1:], before["pg"][1:], strict=True)
    )
    statements = psql(
        project,
        "SELECT sum(calls), sum(calls) FILTER (WHERE query ILIKE 'insert%' OR query ILIKE 'with%insert%'), "
        "sum(calls) FILTER (WHERE query ILIKE 'update%' OR query ILIKE 'with%update%'), "
        "sum(calls) FILTER (WHERE query ILIKE 'select%'), sum(shared_blks_dirtied), sum(wal_bytes) "
        "FROM pg_stat_statements WHERE query NOT ILIKE '%pg_stat%'",
    )[0]
    top = psql(
        project,
        "SELECT calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 90) FROM pg_stat_statements "
        "WHERE query NOT ILIKE '%pg_stat%' ORDER BY calls DESC LIMIT 12",
    )
    print(f"{n} executions of {args.seconds}s functions in {elapsed:.1f}s ({n / elapsed:.1f}/s)")
    total, inserts, updates, selects, dirtied, stmt_wal = (float(x or 0) for x in statements)
    print(
        f"PostgreSQL per execution: {total / n:.1f} statements ({inserts / n:.1f} insert-ish, "
        f"{updates / n:.1f} update-ish, {selects / n:.1f} select), {commits / n:.1f} commits, "
        f"rows +{ins / n:.1f} ~{upd / n:.1f} -{dele / n:.1f}, WAL {wal / n:.0f} bytes "
        f"(statements' own {stmt_wal / n:.0f}), {dirtied / n:.1f} blocks dirtied"
    )
    for table in TABLES:
        grew = after["sizes"][table] - before["sizes"][table]
        print(f"  {table}: +{grew / n:.0f} bytes per execution on disk")
    print("  most frequent statements (calls):")
    for calls, query in top:
        print(f"    {int(calls) / n:6.2f}/exec  {query}")
    redis = Counter(after["redis"])
    redis.subtract(before["redis"])
    calls = sum(v for k, v in redis.items() if k not in ("config", "info"))
    print(f"Redis per execution: {calls / n:.1f} commands; " + ", ".join(
        f"{k} {v / n:.2f}" for k, v in redis.most_common() if v > 0 and k not in ("config", "info")
    ))  # fmt: skip
    print("CPU per execution (ms), by container:")
    for name in sorted(after["cpu"]):
        used = after["cpu"][name] - before["cpu"].get(name, 0)
        if used > 0:
            print(f"  {name}: {used / 1e6 / n:.2f} ms")


if __name__ == "__main__":
    main()
