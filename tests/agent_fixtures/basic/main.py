"""Functions the agent tests call: one per behaviour under test."""

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("basic")


def echo(value=None):
    return value


def add(a, b):
    return a + b


def identity(value):
    return value


def bad_pair():
    return 1


def pair(a, b):
    return {"sum": a + b, "product": a * b}


def no_outputs():
    return [1, "two", None]


def not_json():
    return object()


def nan():
    return float("nan")


def big(megabytes):
    return "x" * (megabytes * 1024 * 1024)


def report(progress, context):
    progress.update(50, "half")
    progress.update(100)
    return {
        "execution_id": context.execution_id,
        "attempt": context["attempt"],
        "service_id": context.service_id,
        "context": dict(context),
    }


def chatter(lines=3):
    for i in range(lines):
        print(f"out {i}")
        sys.stderr.write(f"err {i}\n")
    log.info("logged %s", "info")
    log.debug("not shown")
    os.write(1, b"raw fd write\n")
    subprocess.run(["echo", "from a subprocess"], check=True)
    print("no newline at the end", end="")
    return "done"


def long_line(size):
    print("y" * size)
    return size


def fail(message="bad input"):
    raise ValueError(message)


def sleep(seconds):
    print(f"sleeping pid={os.getpid()}", flush=True)
    time.sleep(seconds)
    return seconds


async def async_add(a, b):
    await asyncio.sleep(0.01)
    return a + b


def exit_hard(code=9):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def segfault():
    ctypes.string_at(0)


def pids():
    return {"agent": os.getppid(), "child": os.getpid(), "uid": os.getuid()}


def allocate(megabytes):
    chunks = [b"x" * (1024 * 1024) for _ in range(megabytes)]
    return len(chunks)


def fork_bomb():
    while True:
        os.fork()


def connect(host, port):
    with socket.create_connection((host, port), timeout=3):
        return "connected"


def write_file(path):
    with open(path, "w") as f:
        f.write("x")
    return path


def environment(name):
    return {"value": os.environ.get(name), "cwd": os.getcwd()}


def background():
    process = subprocess.Popen(["sleep", "30"])  # inherits stdout: holds the log pipe open
    return process.pid


def fork_and_return():
    return "child" if os.fork() == 0 else "parent"


def flood(lines, width=100):
    row = "z" * width
    for i in range(lines):
        print(i, row)
    return lines


def stubborn_fork_bomb(seconds):
    # Every copy keeps forking until the deadline, waiting a little when the limit is hit.
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.fork()
        except OSError:
            time.sleep(0.01)
    os._exit(0)
