"""CPU accounting per Ferry component, from /proc: where the machine's cycles go in a phase.

Every process is charged to the nearest ancestor that is a component root (api, worker,
scheduler, the agents, PostgreSQL's postmaster, Redis). A process's own time (its threads'
schedstat, in nanoseconds) plus the time of children it reaped (cutime/cstime, in clock
ticks) is counted, so the agents' forked per-execution children land on the agents. The rest of the machine (other tenants) is `others`: the
whole machine's busy time from /proc/stat minus everything above and this process.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    pid: int
    ppid: int
    cpu_s: float  # utime + stime + cutime + cstime
    cmdline: str


def _own_cpu_s(proc_dir: str) -> float | None:
    """A process's own CPU time in ns precision: the sum over its threads' schedstat (the
    clock ticks of /proc/PID/stat are 10 ms, too coarse for what an idle process uses)."""
    total = 0
    try:
        for task in os.scandir(os.path.join(proc_dir, "task")):
            with open(os.path.join(task.path, "schedstat")) as handle:
                total += int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def _processes() -> dict[int, Proc]:
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = (
                Path(entry.path, "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
        pid = int(entry.name)
        own = _own_cpu_s(entry.path)
        if own is None:
            own = (utime + stime) / TICK
        found[pid] = Proc(pid, ppid, own + (cutime + cstime) / TICK, cmdline)
    return found


def _machine_busy_s() -> float:
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / TICK


class CpuMeter:
    """`snapshot()` charges every process to a component; `delta()` between two snapshots."""

    def __init__(self, roots: dict[int, str], docker_owner: str | None = None) -> None:
        self.roots = roots
        self.docker_owner = docker_owner

    def _container_roots(self) -> dict[int, str]:
        if not self.docker_owner:
            return {}
        ids = subprocess.run(
            ["docker", "ps", "-q", "--filter", f"label=ferry.owner={self.docker_owner}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.split()
        if not ids:
            return {}
        pids = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.Pid}}", *ids],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.split()
        return {int(p): "agents" for p in pids if p.isdigit() and int(p) > 0}

    def snapshot(self) -> dict[str, float]:
        procs = _processes()
        roots = {**self.roots, **self._container_roots()}
        worker_pids = {pid for pid, name in self.roots.items() if name == "worker"}
        for proc in procs.values():  # process runtime: agents are the worker's children
            if "agent.py" in proc.cmdline and proc.ppid in worker_pids:
                roots[proc.pid] = "agents"
        totals: dict[str, float] = {}
        me = os.getpid()
        for proc in procs.values():
            pid, group, hops = proc.pid, None, 0
            while pid > 1 and hops < 64:
                if pid in roots:
                    group = roots[pid]
                    break
                if pid == me:
                    group = "bench client"
                    break
                parent = procs.get(pid)
                if parent is None:
                    break
                pid, hops = parent.ppid, hops + 1
            if group is not None:
                totals[group] = totals.get(group, 0.0) + proc.cpu_s
        totals["_machine"] = _machine_busy_s()
        totals["_wall"] = time.monotonic()
        return totals


def delta(before: dict[str, float], after: dict[str, float], units: int) -> dict[str, object]:
    """CPU seconds per component between two snapshots, and CPU ms per unit of work.

    `system_cpu_ms_per_unit` sums the system under test (all components but the benchmark's
    own client and other tenants); `others_pct_of_machine` is how busy the rest of the
    machine kept the cores meanwhile: a high value means the figures are disturbed."""
    wall = after["_wall"] - before["_wall"]
    names = sorted((set(before) | set(after)) - {"_machine", "_wall"})
    used = {n: max(0.0, after.get(n, 0.0) - before.get(n, 0.0)) for n in names}
    machine = after["_machine"] - before["_machine"]
    ours = sum(used.values())
    used["others (not this benchmark)"] = max(0.0, machine - ours)
    ncpu = os.cpu_count() or 1
    others = used["others (not this benchmark)"]
    measured = ours - used.get("bench client", 0.0)
    return {
        "wall_s": round(wall, 2),
        "machine_busy_pct": round(100 * machine / (wall * ncpu), 1) if wall else None,
        "others_pct_of_machine": round(100 * others / (wall * ncpu), 1) if wall else None,
        "system_cpu_ms_per_unit": round(1000 * measured / units, 3) if units else None,
        "cpu_s": {n: round(v, 4) for n, v in used.items()},
        "cpu_ms_per_unit": {n: round(1000 * v / units, 3) for n, v in used.items()}
        if units
        else {},
        "units": units,
    }
