"""Ferry agent: loads a package's module once, then runs each execution in a forked child.

Usage: ``python3 -u agent.py RUN_DIR``. Reads ``RUN_DIR/config.json``, serves exactly one
worker on the unix socket ``RUN_DIR/agent.sock``. Standard library only, Python >= 3.9:
this file is bind-mounted into containers whose Python we do not choose. The model and
the protocol are described in docs/agent.md.

Exit codes: 0 shutdown asked, 2 worker gone (or never came, or broke the protocol),
3 the module failed to load.
"""

from __future__ import annotations

import asyncio
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
HEADER = struct.Struct(">I")
PR_SET_PDEATHSIG = 1

# Forking a process that started threads in __init__ is the documented trade-off.
warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)


class OutputError(Exception):
    """The function returned something that cannot become its output."""


def encode_frame(obj: dict) -> bytes:
    body = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
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


def run_child(message: dict, function: tuple, agent_pid: int, fds: tuple) -> None:
    """Body of the forked child: calls the function, reports on the msg pipe, never returns."""
    out_w, err_w, msg_w = fds
    status = 1
    try:
        os.setsid()  # its own process group: a stop kills everything it started
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if _LIBC is not None:  # die with the agent, even if it is SIGKILLed
            _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != agent_pid:
                return
        try:  # let the kernel's OOM killer pick this child rather than the agent
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (null, out_w, err_w):
            os.close(fd)

        def send(frame: dict) -> None:
            write_all(msg_w, encode_frame(frame))

        fn, outputs, wants = function
        me = os.getpid()
        try:
            kwargs = dict(message.get("input") or {})
            if "progress" in wants:
                kwargs.setdefault("progress", Progress(send))
            if "context" in wants:
                context = Context(message.get("context") or {})
                context.setdefault("execution_id", message["id"])
                kwargs.setdefault("context", context)
            value = fn(**kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_await(value))
            frame = {"type": "result", "output": shape_output(value, outputs)}
        except BaseException as exc:
            frame = {"type": "error", "error": error_info(exc)}
        if os.getpid() != me:  # a process the function forked came back through here
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            data = encode_frame(frame)
        except (TypeError, ValueError) as exc:
            message_text = f"the output is not JSON-serialisable: {exc}"
            error = {"type": "OutputError", "message": message_text, "traceback": ""}
            data = encode_frame({"type": "error", "error": error})
        write_all(msg_w, data)
        status = 0
    finally:
        os._exit(status)


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
        self.finished = None  # monotonic time of the outcome, or of the exit
        self.status = None  # wait status, once reaped
        self.stop_reason = None  # "terminated" | "timeout"
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
        self.concurrency = int(config.get("concurrency") or 1)
        self.heartbeat_s = float(config.get("heartbeat_s") or 1.0)
        self.oom_paths = oom_counter_paths()
        self.executions = {}  # id -> Execution
        self.by_pid = {}
        self.client = client
        self.client.setblocking(False)
        self.reader = FrameReader()
        self.out = bytearray()  # frames for the worker, sent up to out_pos
        self.out_pos = 0
        self.want_write = False
        self.exit_code = None
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()  # signals (SIGCHLD, SIGTERM) wake the selector
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "exit_code", 0))
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
                self.exit_code = 0
            else:
                print(f"ferry-agent: ignoring message {kind!r}", file=sys.stderr)

    def execute(self, message: dict) -> None:
        exec_id = message.get("id")
        function = self.functions.get(message.get("function"))
        if not isinstance(exec_id, str) or exec_id in self.executions:
            print(f"ferry-agent: ignoring execute with id {exec_id!r}", file=sys.stderr)
        elif function is None:
            text = f"no function {message.get('function')!r} in this service"
            self.reply_error(exec_id, "FunctionNotFound", text)
        elif len(self.executions) >= self.concurrency:
            text = f"all {self.concurrency} execution slots of this replica are busy"
            self.reply_error(exec_id, "AgentBusy", text)
        else:
            self.fork(message, function)

    def reply_error(self, exec_id: str, kind: str, text: str) -> None:
        error = {"type": kind, "message": text, "traceback": ""}
        self.send({"type": "error", "id": exec_id, "error": error, "duration_ms": 0})

    def fork(self, message: dict, function: tuple) -> None:
        oom_before = read_oom_kills(self.oom_paths)
        sys.stdout.flush()
        sys.stderr.flush()
        fds = []
        try:  # under a pids limit (say, a fork bomb next door) or out of fds, this fails
            for _ in range(3):
                fds.extend(os.pipe())
            out_r, out_w, err_r, err_w, msg_r, msg_w = fds
            pid = os.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            text = f"could not start the execution's process: {exc}"
            return self.reply_error(message["id"], "ForkFailed", text)
        if pid == 0:
            signal.set_wakeup_fd(-1)
            parent_fds = [self.client.fileno(), self.wake_r, self.wake_w, self.sel.fileno()]
            for ex in self.executions.values():
                parent_fds.extend(ex.open_fds)
            for fd in [*parent_fds, out_r, err_r, msg_r]:
                os.close(fd)
            run_child(message, function, os.getppid(), (out_w, err_w, msg_w))
        for fd in (out_w, err_w, msg_w):
            os.close(fd)
        ex = Execution(message, pid, (out_r, err_r, msg_r), oom_before)
        self.executions[ex.id] = self.by_pid[pid] = ex
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
        for ex in self.executions.values():
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
            ex = self.by_pid.pop(pid, None)
            if ex is not None:
                ex.status = status
                ex.finished = ex.finished or time.monotonic()
                self.kill(ex, signal.SIGKILL)

    def finish(self, ex: Execution) -> None:
        """Sends the execution's last log lines, then its final frame."""
        for fd in list(ex.open_fds):  # what is left in the pipes, without waiting
            os.set_blocking(fd, False)
            while fd in ex.open_fds:
                try:
                    chunk = os.read(fd, 1 << 20)
                except BlockingIOError:  # held open by a process that escaped the group
                    chunk = b""
                self.on_child_data(ex, fd, chunk)
        del self.executions[ex.id]
        if ex.outcome is not None:
            frame = dict(ex.outcome)
        elif ex.stop_reason is not None:
            frame = {"type": "stopped", "reason": ex.stop_reason}
        else:
            frame = {"type": "error", "error": self.death(ex)}
        frame.update(id=ex.id, duration_ms=round((ex.finished - ex.started) * 1000, 1))
        self.send(frame)

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

    # -- loop -------------------------------------------------------------------------
    def serve(self) -> int:
        ready = {"type": "ready", "agent_version": AGENT_VERSION, "pid": os.getpid()}
        ready.update(python=platform.python_version(), functions=sorted(self.functions))
        self.send(ready)
        next_beat = time.monotonic() + self.heartbeat_s
        while self.exit_code is None:
            timers = [next_beat, *(ex.next_timer() for ex in self.executions.values())]
            timeout = max(0.0, min(timers) - time.monotonic())
            for key, events in self.sel.select(min(timeout, 1.0)):
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
                if ex.status is not None and (not ex.open_fds or now >= ex.finished + DRAIN_S):
                    self.finish(ex)
                elif ex.status is None and ex.kill_at and now >= ex.kill_at:
                    self.kill(ex, signal.SIGKILL)
                    ex.kill_at = None
                elif ex.status is None and ex.deadline and now >= ex.deadline:
                    self.stop(ex.id, "timeout")
            if now >= next_beat:
                self.send({"type": "heartbeat", "running": sorted(self.executions)})
                next_beat = now + self.heartbeat_s
        for ex in self.executions.values():
            self.kill(ex, signal.SIGKILL)
        for ex in self.executions.values():
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


def main(argv: list) -> int:
    if len(argv) != 2:
        print("usage: agent.py RUN_DIR", file=sys.stderr)
        return 2
    run_dir = argv[1]
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    socket_path = os.path.join(run_dir, "agent.sock")
    listener = listen(socket_path)
    # Import-time logging goes to the agent's own output; executions inherit the handler.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.root.addHandler(handler)
    logging.root.setLevel(logging.INFO)
    try:
        functions, init_error = load_functions(config), None
    except BaseException as exc:
        functions, init_error = {}, error_info(exc, skip_agent_frames=False)
        print(init_error["traceback"], file=sys.stderr, end="")
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
