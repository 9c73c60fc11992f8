"""Functions the engine tests deploy; each exercises one behaviour of a replica.

The dangerous ones (memory, fork bomb) refuse to run outside a container with a pids
limit, so a mistake in a test can never turn them loose on the host.
"""

import logging
import os
import socket
import sys
import time

log = logging.getLogger("ferry.sample")


def work(text, progress, context):
    print("stdout: starting", text)
    time.sleep(0.1)  # stdout and stderr are separate pipes: keep their order unambiguous
    print("stderr: warming up", file=sys.stderr)
    time.sleep(0.1)
    log.warning("logging: half way")
    progress.update(50, "half")
    time.sleep(1.5)
    return {
        "text": text.upper(),
        "execution_id": context["execution_id"],
        "attempt": context.attempt,
        "pid": os.getpid(),
    }


def fail(message):
    def inner():
        raise ValueError(message)

    inner()


def nap(seconds):
    time.sleep(seconds)
    return {"slept": seconds}


def show_secret():
    value = os.environ["API_KEY"]
    print("the key is", value)
    return {"length": len(value)}


def _in_limited_container():
    """True only inside a container with a pids limit (cgroup v2, then v1)."""
    if not os.path.exists("/.dockerenv"):
        return False
    for path in ("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"):
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        return limit != "max" and int(limit) <= 4096
    return False


def allocate(mb):
    if not _in_limited_container():
        raise RuntimeError("refusing to allocate outside a memory-limited container")
    chunks = [b"\x01" * (1024 * 1024) for _ in range(mb)]  # touched, so really resident
    return {"allocated_mb": len(chunks)}


def fork_bomb(seconds):
    if not _in_limited_container():
        raise RuntimeError("refusing to fork-bomb outside a pids-limited container")
    # Every copy gives up after `seconds`, whatever happens to the execution.
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.fork()
        except OSError:
            time.sleep(0.01)
    os._exit(0)


def network():
    with open("/proc/net/dev") as f:
        interfaces = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    try:
        # A private, unroutable address: with no network it fails at once (ENETUNREACH).
        socket.create_connection(("10.255.255.1", 9), timeout=2).close()
        error = None
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {"interfaces": interfaces, "error": error}


def chatter(lines, width):
    for n in range(lines):
        print(f"line {n:04d} " + "x" * (width - 10))
    return {"printed": lines}


def whoami(context):
    return {
        "execution_id": context["execution_id"],
        "trigger_id": context["trigger_id"],
        "trigger_fire_time": context["trigger_fire_time"],
    }
