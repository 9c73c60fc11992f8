"""Ferry agent: loads a package's module once, then runs each execution in a forked child
(forked ahead of time: a child waits, ready, for the next execution).

Usage: ``python3 -u agent.py RUN_DIR [--pool]``. Reads ``RUN_DIR/config.json``, serves
exactly one worker on the unix socket ``RUN_DIR/agent.sock``. With ``--pool`` (a warm
pool's container, started before its service is known) it listens first and reads the
config once a worker connects: the worker writes it, and the codebase, before. Standard library only, Python >= 3.9:
this file is bind-mounted into containers whose Python we do not choose. The model and
the protocol are described in docs/agent.md.

A shutdown (asked by the worker, or SIGTERM) stops every execution still running (SIGTERM,
then SIGKILL after STOP_GRACE_S), reports each as `stopped` with reason `shutdown` so the
worker can hand it back, and only then exits.

Exit codes: 0 shutdown asked, 2 worker gone (or never came, or broke the protocol),
3 the module failed to load.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import platform
import select
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
import warnings

try:
    import resource
except ImportError:  # not on every platform: executions then share the replica's bound alone
    resource = None

try:
    import ctypes

    _LIBC = ctypes.CDLL(None)
except (ImportError, OSError):  # a Python built without ctypes still works, minus pdeathsig
    _LIBC = None

AGENT_VERSION = 1
MAX_FRAME = 64 * 1024 * 1024
MAX_LINE = 16 * 1024
STOP_GRACE_S = 1.0  # SIGTERM, then SIGKILL: a stop completes in well under 1.5 s
DRAIN_S = 0.3  # a grandchild may keep a dead child's stdout open; stop waiting after this
OUT_HIGH = 4 * 1024 * 1024  # unsent bytes above which the agent waits for the worker
STALL_S = 60.0  # the worker reading nothing for this long is stuck: leave
FLUSH_S = 5.0  # at shutdown, how long the last frames may take to reach the worker
# A ready child is forked ahead for the next execution once the one that took the last
# ready child has reported, or this long after it started, whichever comes first.
PREFORK_AFTER_S = 0.05
FORK_RETRY_S = 0.5  # how long an execution's fork is retried while pids are short
HEADER = struct.Struct(">I")
PR_SET_PDEATHSIG = 1

# Forking a process that started threads in __init__ is the documented trade-off.
warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)


class OutputError(Exception):
    """The function returned something that cannot become its output."""


def encode_frame(obj: dict) -> bytes:
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    # A character is at least one byte: refuse before the bytes copy, which an execution
    # near its memory bound may not have room for.
    if len(text) > MAX_FRAME:
        raise ValueError(f"{len(text)} characters is over the {MAX_FRAME}-byte frame limit")
    body = text.encode()
    del text
    if len(body) > MAX_FRAME:
        raise ValueError(f"{len(body)} bytes is over the {MAX_FRAME}-byte frame limit")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes and yields the complete frames they contain."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> list:
        self.buf += chunk
        frames, start = [], 0
        while len(self.buf) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buf, start)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes is over the limit")
            if len(self.buf) - start - HEADER.size < size:
                break
            body = self.buf[start + HEADER.size : start + HEADER.size + size]
            frames.append(json.loads(body.decode()))
            start += HEADER.size + size
        del self.buf[:start]
        return frames


def split_lines(buf: bytearray, final: bool) -> list:
    """Takes the complete lines out of buf (lines over MAX_LINE are cut, at a UTF-8 boundary)."""
    lines, start = [], 0
    while True:
        nl = buf.find(b"\n", start, start + MAX_LINE + 1)
        if nl != -1:
            lines.append(buf[start:nl])
            start = nl + 1
        elif len(buf) - start > MAX_LINE:
            cut = start + MAX_LINE
            while cut > start + MAX_LINE - 4 and buf[cut] & 0xC0 == 0x80:
                cut -= 1
            lines.append(buf[start:cut])
            start = cut
        else:
            break
    if final and start < len(buf):
        lines.append(buf[start:])
        start = len(buf)
    del buf[:start]
    return [bytes(line).rstrip(b"\r").decode("utf-8", "replace") for line in lines]


def error_info(exc: BaseException, skip_agent_frames: bool = True) -> dict:
    tb = exc.__traceback__
    while skip_agent_frames and tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {"type": type(exc).__name__, "message": str(exc), "traceback": text}


def oom_counter_paths() -> list:
    """Files whose `oom_kill` line counts OOM kills in our cgroup (v2, then v1)."""
    paths = ["/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"]
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if path not in ("", "/") and controllers == "":
                    paths.insert(0, f"/sys/fs/cgroup{path}/memory.events")
                elif path not in ("", "/") and "memory" in controllers.split(","):
                    paths.insert(0, f"/sys/fs/cgroup/memory{path}/memory.oom_control")
    except (OSError, ValueError):
        pass
    return paths


def read_oom_kills(paths: list) -> int | None:
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


class Context(dict):
    """The execution's context: `context["execution_id"]` and `context.execution_id` alike."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Progress:
    """Passed as `progress`: `progress.update(50, "half way")`."""

    def __init__(self, send) -> None:
        self._send = send

    def update(self, percent, message=None) -> None:
        percent = min(100.0, max(0.0, float(percent)))
        percent = int(percent) if percent.is_integer() else percent
        text = None if message is None else str(message)
        self._send({"type": "progress", "percent": percent, "message": text})


def load_functions(config: dict) -> dict:
    """Imports the entry point (and instantiates the class) once; returns name -> callable."""
    sys.path.insert(0, config["code_dir"])
    entry = config["entry_point"]
    module_name = (entry[:-3] if entry.endswith(".py") else entry).strip("/").replace("/", ".")
    owner = importlib.import_module(module_name)
    if config.get("class_name"):
        owner = getattr(owner, config["class_name"])(**(config.get("init_inputs") or {}))
    functions = {}
    for name, spec in (config.get("functions") or {}).items():
        fn = getattr(owner, name, None)
        if not callable(fn):
            raise AttributeError(f"{entry} has no callable {name!r}")
        try:
            params = set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            params = set()
        outputs = [o if isinstance(o, str) else o["name"] for o in spec.get("outputs") or []]
        functions[name] = (fn, outputs, params & {"progress", "context"})
    # asyncio costs a replica ~7 MB: imported only when a function is a coroutine
    # function (before the forks, so no execution pays for the import).
    if any(inspect.iscoroutinefunction(fn) for fn, _, _ in functions.values()):
        import asyncio  # noqa: F401
    return functions


def shape_output(value, outputs: list):
    if len(outputs) == 1 and not (isinstance(value, dict) and list(value) == outputs):
        return {outputs[0]: value}
    if len(outputs) > 1 and not isinstance(value, dict):
        raise OutputError(
            f"the function declares outputs {', '.join(outputs)} and must return a dict"
            f" keyed by them, not {type(value).__name__}"
        )
    return value


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def _await(awaitable):
    return await awaitable


def bound_memory(memory_mb) -> None:
    """Caps this process's data (heap and anonymous mappings) at memory_mb.

    Each execution gets its own bound, below the replica's: one that allocates too much
    gets MemoryError (reported as `oom`) before the replica as a whole runs out, so the
    kernel never has to kill the agent or the executions next to it.
    """
    if not memory_mb or resource is None:
        return
    limit = int(memory_mb) * 1024 * 1024
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    except (ValueError, OSError):  # a lower hard limit set from outside stays in force
        pass


def out_of_memory(exc: MemoryError, memory_mb) -> dict:
    # The traceback's frames hold what was allocated: free it before formatting anything.
    traceback.clear_frames(exc.__traceback__)
    try:
        info = error_info(exc)
    except MemoryError:
        info = {"traceback": ""}
    bound = f" of {memory_mb} MB" if memory_mb else ""
    text = f"the execution ran out of memory: it reached its memory bound{bound}"
    return {"type": "OutOfMemory", "message": text, "traceback": info["traceback"]}


def read_job(ctl_r: int):
    """A pre-forked child's wait: the one frame its agent sends it, or None at EOF."""
    reader = FrameReader()
    while True:
        chunk = os.read(ctl_r, 1 << 16)
        if not chunk:
            return None
        frames = reader.feed(chunk)
        if frames:
            return frames[0]


def run_child(
    functions: dict,
    agent_pid: int,
    fds: tuple,
    ctl_r: int,
    memory_mb=None,
    runs: int = 1,
    ahead: bool = False,
) -> None:
    """Body of the forked child: calls the function, reports on the msg pipe, never returns.

    It makes itself ready first (its own process group, its memory bound, its output pipes)
    and then waits for the execution on `ctl_r`: the agent sends it the message and the
    secrets when one arrives (at once for a child forked on demand, later for one forked
    ahead). With `runs` above 1 (a service's `executions_per_process`) it then waits for the
    next one, up to `runs` executions, saying in each outcome frame (`next`) whether it will."""
    out_w, err_w, msg_w = fds
    status = 1
    try:
        os.setsid()  # its own process group: a stop kills everything it started
        bound_memory(memory_mb)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if _LIBC is not None:  # die with the agent, even if it is SIGKILLed
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != agent_pid:
                return
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (null, out_w, err_w):
            os.close(fd)
        me = os.getpid()
        if ahead:  # it has time before its execution comes (not so one forked on demand)
            warm_up()
        left = runs
        first = True
        while left > 0:
            job = read_job(ctl_r)
            if job is None:  # the agent needs it no more (a shutdown, or it has enough)
                status = 0
                return
            message, secrets = job["message"], job["secrets"]
            left -= 1
            if first:
                first = False
                try:  # let the kernel's OOM killer pick this execution rather than the agent
                    # (a child still waiting for one is no more a target than the agent)
                    with open("/proc/self/oom_score_adj", "w") as f:
                        f.write("1000")
                except OSError:
                    pass
            frame, reusable = run_one(message, functions, msg_w, secrets, memory_mb)
            if os.getpid() != me:  # a process the function forked came back through here
                return
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            again = reusable and left > 0
            says_next = runs > 1  # the agent keeps a child that says so
            try:
                data = encode_frame(dict(frame, next=again) if says_next else frame)
            except (TypeError, ValueError) as exc:
                message_text = f"the output is not JSON-serialisable: {exc}"
                error = {"type": "OutputError", "message": message_text, "traceback": ""}
                data = encode_frame({"type": "error", "error": error, "next": again})
            except MemoryError as exc:
                frame = None  # its output may be what filled the memory: let it go
                again = False
                error = out_of_memory(exc, memory_mb)
                data = encode_frame({"type": "error", "error": error, "next": False})
            write_all(msg_w, data)
            if not again:
                break
        status = 0
    finally:
        os._exit(status)


def warm_up() -> None:
    """A ready child's first steps while it waits: what an execution's path writes to (the
    frame codec, the objects it looks up) is copied from the agent's pages now, not while
    an execution waits for it (a page written first after a fork is copied then)."""
    try:
        job = {"message": {"id": "", "function": "", "input": {}, "context": {}}, "secrets": {}}
        FrameReader().feed(encode_frame(job))
        encode_frame({"type": "result", "output": {"value": None}, "next": True})
        Context({}).get("")
        os.environ.get("")
    except Exception:  # only ever a head start: the execution does the same for real
        pass


def run_one(message: dict, functions: dict, msg_w: int, secrets, memory_mb) -> tuple:
    """Calls the function of one execution: its outcome frame, and whether the process may
    run another one (not after running out of memory)."""

    def send(frame: dict) -> None:
        write_all(msg_w, encode_frame(frame))

    fn, outputs, wants = functions[message["function"]]
    reusable = True
    try:
        # Only this child's environment holds the secrets: not the agent's, not the
        # container's (which the engine's metadata shows), not the module's import.
        os.environ.update(secrets)
        kwargs = dict(message.get("input") or {})
        if "progress" in wants:
            kwargs.setdefault("progress", Progress(send))
        if "context" in wants:
            context = Context(message.get("context") or {})
            context.setdefault("execution_id", message["id"])
            kwargs.setdefault("context", context)
        value = fn(**kwargs)
        if inspect.isawaitable(value):
            import asyncio  # loaded by the agent already when a function is async

            value = asyncio.run(_await(value))
        frame = {"type": "result", "output": shape_output(value, outputs)}
    except MemoryError as exc:
        frame, reusable = {"type": "error", "error": out_of_memory(exc, memory_mb)}, False
    except BaseException as exc:
        frame = {"type": "error", "error": error_info(exc)}
    return frame, reusable


class Execution:
    def __init__(self, message: dict, pid: int, fds: tuple, oom_before: int | None) -> None:
        self.id, self.pid, self.oom_before = message["id"], pid, oom_before
        self.started = time.monotonic()
        timeout = message.get("timeout_s")
        self.deadline = self.started + timeout if timeout else None
        out_r, err_r, self.msg_fd = fds
        self.streams = {out_r: ("stdout", bytearray()), err_r: ("stderr", bytearray())}
        self.open_fds = set(fds)
        self.frames = FrameReader()
        self.outcome = None  # the child's result or error frame
        self.ctl_w = None  # the control pipe of a child that may run the next execution
        self.reusable = False  # its outcome said it waits for another (`next`)
        self.finished = None  # monotonic time of the outcome, or of the exit
        self.status = None  # wait status, once reaped
        self.stop_reason = None  # "terminated" | "timeout" | "shutdown"
        self.kill_at = None  # SIGKILL time after a SIGTERM

    def next_timer(self) -> float:
        if self.status is not None:
            return self.finished + DRAIN_S
        if self.kill_at:
            return self.kill_at
        if self.deadline and self.outcome is None and self.stop_reason is None:
            return self.deadline
        return float("inf")


class Agent:
    """The single-threaded parent: a selector over the socket, the children's pipes and timers."""

    def __init__(self, config: dict, functions: dict, client: socket.socket) -> None:
        self.functions = functions
        self.secrets = {}  # from the worker's `secrets` frame; set in each child's environment
        self.concurrency = int(config.get("concurrency") or 1)
        self.heartbeat_s = float(config.get("heartbeat_s") or 1.0)
        self.execution_memory_mb = config.get("execution_memory_mb")
        # How many executions one child runs (the service's `executions_per_process`): 1,
        # a fresh process each; more, a child that reported goes back to `idle`.
        self.runs = max(1, int(config.get("executions_per_process") or 1))
        self.oom_paths = oom_counter_paths()
        self.executions = {}  # id -> Execution
        self.by_pid = {}  # pid -> Execution, until reaped
        # Executions whose outcome went out while their process was still exiting: reaped
        # (and their process group killed) by the loop, like the others.
        self.departing = {}  # pid -> Execution
        # Children waiting for an execution, the last to wait at the end: (pid, its pipes'
        # read ends, the write end of its control pipe). One is forked ahead of time, so
        # the fork is off an execution's path: the agent hands it the message and forks
        # the next one after; with `runs` above 1 those that ran one wait here again.
        self.idle = []
        self.prefork_at = 0.0  # monotonic time from which to fork the next ready child
        self.client = client
        self.client.setblocking(False)
        self.reader = FrameReader()
        self.out = bytearray()  # frames for the worker, sent up to out_pos
        self.out_pos = 0
        self.want_write = False
        self.exit_code = None
        self.shutdown_asked = False  # set by a signal handler: acted on in the loop
        self.shutting_down = False
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()  # signals (SIGCHLD, SIGTERM) wake the selector
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "shutdown_asked", True))
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        self.sel.register(self.client, selectors.EVENT_READ, ("client", None))

    # -- to the worker ----------------------------------------------------------------
    def send(self, frame: dict) -> None:
        self.out += encode_frame(frame)
        self.flush()
        if len(self.out) - self.out_pos > OUT_HIGH:
            # The worker reads slower than the functions write: wait for it, which leaves
            # the children blocked on full pipes instead of growing our memory.
            deadline = time.monotonic() + STALL_S
            while self.out and self.exit_code is None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [self.client], [], left)[1]:
                    print("ferry-agent: the worker stopped reading; leaving", file=sys.stderr)
                    self.exit_code = 2
                self.flush()

    def flush(self) -> None:
        with memoryview(self.out) as view:
            while self.out_pos < len(view) and self.exit_code is None:
                try:
                    self.out_pos += self.client.send(view[self.out_pos :])
                except BlockingIOError:
                    break
                except OSError:
                    self.exit_code = 2
        if self.out_pos * 2 >= len(self.out):  # compact, without quadratic copying
            del self.out[: self.out_pos]
            self.out_pos = 0
        if self.exit_code is None and self.want_write != bool(self.out):
            self.want_write = bool(self.out)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
            self.sel.modify(self.client, events, ("client", None))

    # -- from the worker --------------------------------------------------------------
    def on_client_readable(self) -> None:
        try:
            chunk = self.client.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        try:
            messages = self.reader.feed(chunk)
        except ValueError as exc:
            print(f"ferry-agent: protocol error from the worker: {exc}", file=sys.stderr)
            chunk = b""
        if not chunk:
            self.exit_code = 2
            return
        for message in messages:
            kind = message.get("type")
            if kind == "execute":
                self.execute(message)
            elif kind == "stop":
                self.stop(message.get("id"), "terminated")
            elif kind == "shutdown":
                self.shutdown_asked = True
            elif kind == "secrets":
                self.set_secrets(message.get("env"))
            else:
                print(f"ferry-agent: ignoring message {kind!r}", file=sys.stderr)

    def set_secrets(self, env) -> None:
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            print("ferry-agent: ignoring a secrets frame that is not strings", file=sys.stderr)
            return
        self.secrets = dict(env)

    def execute(self, message: dict) -> None:
        exec_id = message.get("id")
        function = self.functions.get(message.get("function"))
        if not isinstance(exec_id, str) or exec_id in self.executions:
            print(f"ferry-agent: ignoring execute with id {exec_id!r}", file=sys.stderr)
        elif self.shutting_down:  # handed back at once, like those running
            self.send({"type": "stopped", "id": exec_id, "reason": "shutdown", "duration_ms": 0})
        elif function is None:
            text = f"no function {message.get('function')!r} in this service"
            self.reply_error(exec_id, "FunctionNotFound", text)
        elif len(self.executions) >= self.concurrency:
            text = f"all {self.concurrency} execution slots of this replica are busy"
            self.reply_error(exec_id, "AgentBusy", text)
        else:
            self.start(message)

    def reply_error(self, exec_id: str, kind: str, text: str) -> None:
        error = {"type": kind, "message": text, "traceback": ""}
        self.send({"type": "error", "id": exec_id, "error": error, "duration_ms": 0})

    def fork(self, ahead: bool = False):
        """Forks a child that waits on its control pipe for an execution (see `hand`):
        `ahead` of one (then it prepares meanwhile), or for one there already.

        Returns (pid, read ends of stdout, stderr, msg, write end of the control pipe).
        Raises OSError when the fork fails (a pids limit, no fds left)."""
        sys.stdout.flush()
        sys.stderr.flush()
        fds = []
        try:
            for _ in range(4):
                fds.extend(os.pipe())
            pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        out_r, out_w, err_r, err_w, msg_r, msg_w, ctl_r, ctl_w = fds
        if pid == 0:
            signal.set_wakeup_fd(-1)
            parent_fds = [self.client.fileno(), self.wake_r, self.wake_w, self.sel.fileno()]
            for ex in self.executions.values():
                parent_fds.extend(ex.open_fds)
                if ex.ctl_w is not None:
                    parent_fds.append(ex.ctl_w)
            for _, pipes, ctl in self.idle:
                parent_fds.extend([*pipes, ctl])
            for fd in [*parent_fds, out_r, err_r, msg_r, ctl_w]:
                os.close(fd)
            run_child(
                self.functions,
                os.getppid(),
                (out_w, err_w, msg_w),
                ctl_r,
                self.execution_memory_mb,
                self.runs,
                ahead,
            )
        for fd in (out_w, err_w, msg_w, ctl_r):
            os.close(fd)
        return pid, (out_r, err_r, msg_r), ctl_w

    def fork_on_demand(self):
        """Forks a child for an execution that is here already. A fork refused for want of
        pids is retried for up to FORK_RETRY_S, reaping meanwhile: what the last execution
        started (killed when it reported) may still be zombies counted against the
        replica's pids limit until this process, their reaper, collects them."""
        give_up_at = time.monotonic() + FORK_RETRY_S
        while True:
            try:
                return self.fork()
            except BlockingIOError:  # EAGAIN: the pids limit, maybe for a moment only
                if time.monotonic() >= give_up_at:
                    raise
            time.sleep(0.01)
            self.reap()

    def prefork(self) -> None:
        """Forks the next ready child, unless one waits (or a fork failed a moment ago)."""
        if self.idle or self.shutting_down or time.monotonic() < self.prefork_at:
            return
        try:
            self.idle.append(self.fork(ahead=True))
        except OSError:  # a pids limit reached: executions fork on demand meanwhile
            self.prefork_at = time.monotonic() + 1.0

    def drop_idle(self, child=None) -> None:
        """Lets a waiting child go (every one when None: a shutdown): EOF on its control
        pipe, and SIGKILL unless it is gone already (its pid then None)."""
        for waiting in [child] if child is not None else list(self.idle):
            self.idle = [c for c in self.idle if c[2] != waiting[2]]
            pid, pipes, ctl_w = waiting
            for fd in (*pipes, ctl_w):
                os.close(fd)
            if pid is not None:  # reaped by the loop: no zombie is left
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def hand(self, child, message: dict) -> bool:
        """Sends a waiting child its execution; False when it died meanwhile."""
        try:
            write_all(child[2], encode_frame({"message": message, "secrets": self.secrets}))
        except (OSError, ValueError):
            return False
        return True

    def start(self, message: dict) -> None:
        """Runs an execution: in a waiting child if there is one, else in a new child."""
        oom_before = read_oom_kills(self.oom_paths)
        child = None
        while self.idle and child is None:
            child = self.idle.pop()
            if not self.hand(child, message):  # it died meanwhile: try another, or fork one
                self.drop_idle(child)
                child = None
        if child is None:
            try:
                child = self.fork_on_demand()
            except OSError as exc:
                text = f"could not start the execution's process: {exc}"
                return self.reply_error(message["id"], "ForkFailed", text)
            if not self.hand(child, message):
                self.drop_idle(child)
                text = "the execution's process ended before it could be handed its execution"
                return self.reply_error(message["id"], "ForkFailed", text)
        pid, pipes, ctl_w = child
        if self.runs == 1:
            os.close(ctl_w)  # it runs this one execution only
            ctl_w = None
        ex = Execution(message, pid, pipes, oom_before)
        ex.ctl_w = ctl_w
        self.executions[ex.id] = self.by_pid[pid] = ex
        # The next ready child is forked once this execution has sent its outcome (a short
        # one: its fork is then on no execution's path) or PREFORK_AFTER_S from now.
        self.prefork_at = max(self.prefork_at, time.monotonic() + PREFORK_AFTER_S)
        for fd in ex.open_fds:
            self.sel.register(fd, selectors.EVENT_READ, ("child", ex))

    def stop(self, exec_id, reason: str) -> None:
        ex = self.executions.get(exec_id)
        if ex is None or ex.status is not None or ex.outcome or ex.stop_reason:
            return  # finished, finishing or already being stopped: its frame will come
        ex.stop_reason = reason
        if reason == "timeout":
            self.kill(ex, signal.SIGKILL)
        else:
            self.kill(ex, signal.SIGTERM)
            ex.kill_at = time.monotonic() + STOP_GRACE_S

    def kill(self, ex: Execution, sig: int) -> None:
        try:
            os.killpg(ex.pid, sig)  # the child, and every process it started
        except OSError:
            pass

    # -- from the children ------------------------------------------------------------
    def on_child_data(self, ex: Execution, fd: int, chunk: bytes) -> None:
        """Handles bytes from one of a child's pipes; empty bytes mean the pipe is done."""
        if fd == ex.msg_fd:
            try:
                frames = ex.frames.feed(chunk)
            except ValueError:  # not our frames: something else wrote to the pipe
                frames = []
            for frame in frames:
                if frame.get("type") == "progress":
                    self.send(dict(frame, id=ex.id))
                elif ex.outcome is None:
                    ex.reusable = bool(frame.pop("next", False)) and ex.ctl_w is not None
                    ex.outcome = frame
                    ex.finished = ex.finished or time.monotonic()
        else:
            stream, buf = ex.streams[fd]
            buf += chunk
            for text in split_lines(buf, final=not chunk):
                at = time.time()
                self.send({"type": "log", "id": ex.id, "stream": stream, "text": text, "at": at})
        if not chunk:
            ex.open_fds.discard(fd)
            self.sel.unregister(fd)
            os.close(fd)

    def reap(self) -> None:
        for ex in [*self.executions.values(), *self.departing.values()]:
            if ex.status is None:
                try:  # WNOWAIT leaves the zombie, so its process group id cannot be reused
                    exited = os.waitid(os.P_PID, ex.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    exited = None
                if exited is not None:
                    self.kill(ex, signal.SIGKILL)  # whatever it left running
        while True:  # as a container's PID 1 we also reap the orphans functions leave
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            waiting = next((c for c in self.idle if c[0] == pid), None)
            if waiting is not None:  # died waiting: let it go (reaped: no kill), fork anew
                self.drop_idle((None, waiting[1], waiting[2]))
                self.prefork_at = time.monotonic() + 1.0
                continue
            ex = self.by_pid.pop(pid, None)
            self.departing.pop(pid, None)
            if ex is not None:
                ex.status = status
                ex.finished = ex.finished or time.monotonic()
                self.kill(ex, signal.SIGKILL)

    def finish(self, ex: Execution) -> None:
        """Sends the execution's last log lines, then its final frame; a child that said
        it runs another goes back to `idle`."""
        if ex.reusable:
            self.keep_child(ex)
        else:
            for fd in list(ex.open_fds):  # what is left in the pipes, without waiting
                os.set_blocking(fd, False)
                while fd in ex.open_fds:
                    try:
                        chunk = os.read(fd, 1 << 20)
                    except BlockingIOError:  # held open by a process that escaped the group
                        chunk = b""
                    self.on_child_data(ex, fd, chunk)
            if ex.ctl_w is not None:
                os.close(ex.ctl_w)
            if ex.status is None:  # it reported and now exits: its slot is free already
                # Whatever it started goes now, not when the child is reaped: a fork bomb's
                # copies would hold the replica's pids limit and the next execution's fork
                # would fail. The child itself only has `os._exit` left to run.
                self.kill(ex, signal.SIGKILL)
                self.departing[ex.pid] = ex
        del self.executions[ex.id]
        if ex.outcome is not None:
            frame = dict(ex.outcome)
        elif ex.stop_reason is not None:
            frame = {"type": "stopped", "reason": ex.stop_reason}
        else:
            frame = {"type": "error", "error": self.death(ex)}
        frame.update(id=ex.id, duration_ms=round((ex.finished - ex.started) * 1000, 1))
        self.send(frame)

    def keep_child(self, ex: Execution) -> None:
        """Takes what the child printed before its outcome (its output is flushed before the
        outcome is written, so it is in the pipes by now) and puts the child back to wait."""
        for fd, (stream, buf) in ex.streams.items():
            os.set_blocking(fd, False)
            while fd in ex.open_fds:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:
                    break
                self.on_child_data(ex, fd, chunk)  # b"": it is exiting after all
            for text in split_lines(buf, final=True):  # a last line without its newline
                self.send(
                    {"type": "log", "id": ex.id, "stream": stream, "text": text, "at": time.time()}
                )
        self.by_pid.pop(ex.pid, None)
        if len(ex.open_fds) == 3:
            for fd in ex.open_fds:
                self.sel.unregister(fd)
            out_r, err_r = ex.streams
            self.idle.append((ex.pid, (out_r, err_r, ex.msg_fd), ex.ctl_w))
        else:  # reaped by the loop's waitpid(-1), like an orphan
            for fd in list(ex.open_fds):
                self.on_child_data(ex, fd, b"")
            os.close(ex.ctl_w)

    def death(self, ex: Execution) -> dict:
        """The error of a child that died without reporting: OOM-killed, or crashed."""
        if not os.WIFSIGNALED(ex.status):
            code = os.WEXITSTATUS(ex.status)
            text = f"the function's process exited with code {code} before returning"
            return {"type": "Crashed", "message": text, "traceback": "", "exit_code": code}
        sig = os.WTERMSIG(ex.status)
        after = read_oom_kills(self.oom_paths)
        known = None not in (ex.oom_before, after)
        if sig == signal.SIGKILL and known and after > ex.oom_before:
            text = "killed by the out-of-memory killer: the replica's memory limit was reached"
            return {"type": "OutOfMemory", "message": text, "traceback": "", "signal": sig}
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        text = f"the function's process was killed by signal {sig} ({name})"
        if sig == signal.SIGKILL and not known:
            text += ", possibly by the out-of-memory killer"
        return {"type": "Crashed", "message": text, "traceback": "", "signal": sig}

    def begin_shutdown(self) -> None:
        """Stops every execution; the loop ends once each has sent its `stopped` frame."""
        self.shutting_down = True
        self.drop_idle()
        for ex in list(self.executions.values()):
            self.stop(ex.id, "shutdown")

    def flush_all(self) -> None:
        """Sends what is left for the worker, blocking up to FLUSH_S."""
        if self.exit_code not in (None, 0) or self.out_pos >= len(self.out):
            return
        try:
            self.client.settimeout(FLUSH_S)
            self.client.sendall(bytes(self.out[self.out_pos :]))
        except OSError:
            pass

    # -- loop -------------------------------------------------------------------------
    def serve(self) -> int:
        ready = {"type": "ready", "agent_version": AGENT_VERSION, "pid": os.getpid()}
        ready.update(python=platform.python_version(), functions=sorted(self.functions))
        self.send(ready)
        self.prefork()
        next_beat = time.monotonic() + self.heartbeat_s
        while self.exit_code is None and not (self.shutting_down and not self.executions):
            if self.shutdown_asked and not self.shutting_down:
                self.begin_shutdown()
                continue
            timers = [next_beat, *(ex.next_timer() for ex in self.executions.values())]
            if not self.idle and not self.shutting_down:
                timers.append(self.prefork_at)
            timeout = max(0.0, min(timers) - time.monotonic())
            # Signals wake the selector through wake_r: nothing else needs a shorter nap.
            for key, events in self.sel.select(timeout):
                kind, ex = key.data
                if kind == "client" and events & selectors.EVENT_WRITE:
                    self.flush()
                if kind == "client" and events & selectors.EVENT_READ:
                    self.on_client_readable()
                elif kind == "wake":
                    os.read(self.wake_r, 4096)
                elif kind == "child" and key.fd in ex.open_fds:
                    self.on_child_data(ex, key.fd, os.read(key.fd, 1 << 20))
            self.reap()
            now = time.monotonic()
            for ex in list(self.executions.values()):
                # Done once reaped (its slot and pid are really free) and its pipes drained.
                # Done once it reported: its output was flushed before the outcome, so what
                # it printed is in the pipes (the child itself only exits after that, off the
                # execution's path). Or once it died and its pipes are drained.
                if ex.outcome is not None or (
                    ex.status is not None and (not ex.open_fds or now >= ex.finished + DRAIN_S)
                ):
                    self.finish(ex)
                    if self.prefork_at <= now + PREFORK_AFTER_S:  # not backing off a failure
                        self.prefork_at = 0.0
                elif ex.status is None and ex.kill_at and now >= ex.kill_at:
                    self.kill(ex, signal.SIGKILL)
                    ex.kill_at = None
                elif ex.status is None and ex.deadline and now >= ex.deadline:
                    self.stop(ex.id, "timeout")
            if now >= next_beat:
                self.send({"type": "heartbeat", "running": sorted(self.executions)})
                next_beat = now + self.heartbeat_s
            # After this round's frames went out, so it delays none of them.
            self.prefork()
        if self.exit_code is None:  # a shutdown: every execution was stopped and reported
            self.exit_code = 0
            self.flush_all()
        waiting = [pid for pid, _, _ in self.idle if pid is not None]
        self.drop_idle()
        for pid in waiting:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        leaving = [*self.executions.values(), *self.departing.values()]
        for ex in leaving:
            self.kill(ex, signal.SIGKILL)
        for ex in leaving:
            try:
                os.waitpid(ex.pid, 0)
            except ChildProcessError:
                pass
        self.client.close()
        return self.exit_code


def listen(path: str) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)  # the worker may run as another uid than the container's user
    sock.listen(1)
    return sock


def load(config: dict):
    """(functions, None), or ({}, the error) when the module failed to load."""
    # The service's environment, for a module that reads it at import. Already in ours when
    # this process started for the service; not when it started generic, in a warm pool.
    os.environ.update(config.get("env") or {})
    try:
        return load_functions(config), None
    except BaseException as exc:
        init_error = error_info(exc, skip_agent_frames=False)
        print(init_error["traceback"], file=sys.stderr, end="")
        return {}, init_error


def wait_taken(listener: socket.socket, config_path: str):
    """A warm pool's agent: waits, for as long as it takes, for the worker that takes it
    over, which writes the config before it connects. Returns (client, config)."""
    # As a container's PID 1 the default action of SIGTERM does not apply: leave on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    client, _ = listener.accept()
    listener.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with open(config_path) as f:
        return client, json.load(f)


def main(argv: list) -> int:
    pooled = argv[2:] == ["--pool"]
    if len(argv) != 2 and not pooled:
        print("usage: agent.py RUN_DIR [--pool]", file=sys.stderr)
        return 2
    run_dir = argv[1]
    config_path = os.path.join(run_dir, "config.json")
    socket_path = os.path.join(run_dir, "agent.sock")
    # Import-time logging goes to the agent's own output; executions inherit the handler.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.root.addHandler(handler)
    logging.root.setLevel(logging.INFO)
    if pooled:
        client, config = wait_taken(listen(socket_path), config_path)
        functions, init_error = load(config)
    else:
        with open(config_path) as f:
            config = json.load(f)
        listener = listen(socket_path)
        functions, init_error = load(config)  # while the worker connects
        listener.settimeout(float(config.get("connect_timeout_s") or 60.0))
        try:
            client, _ = listener.accept()
        except OSError:  # socket.timeout, a TimeoutError since 3.10
            print("ferry-agent: no worker connected; leaving", file=sys.stderr)
            return 3 if init_error else 2
        finally:
            listener.close()
    if init_error is not None:
        client.settimeout(10.0)
        try:
            client.sendall(encode_frame({"type": "init_failed", "error": init_error}))
        except OSError:
            pass
        client.close()
        return 3
    code = Agent(config, functions, client).serve()
    try:
        os.unlink(socket_path)
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
