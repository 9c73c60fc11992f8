"""`ferry up` as a user runs it: a real process with embedded PostgreSQL and Redis, stopped
with SIGINT, started again on the same data directory."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Up:
    """One `ferry up` process and what it started."""

    def __init__(self, data_dir: Path, config_home: Path, port: int, log: Path) -> None:
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
        env.update(
            FERRY_DATA_DIR=str(data_dir),
            FERRY_API_PORT=str(port),
            FERRY_API_HOST="127.0.0.1",
            FERRY_RUNTIME="process",
            XDG_CONFIG_HOME=str(config_home),
        )
        self.started = time.monotonic()
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ferry", "up"],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as a shell would give it
            )
        self.seen: dict[int, float] = {}  # pid -> create_time of everything it ran

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> float:
        deadline = self.started + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.process.poll()
            assert code is None, f"ferry up exited with {code} before ready:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready within {READY_TIMEOUT_S} s:\n{self.output()}")

    def child_roles(self) -> set[str]:
        """The `ferry <role>` processes it runs."""
        roles = set()
        for child in psutil.Process(self.process.pid).children():
            cmdline = child.cmdline()
            if cmdline[1:3] == ["-m", "ferry"] and len(cmdline) >= 4:  # api: maybe --workers
                roles.add(cmdline[3])
        return roles

    def check_children_stayed_up(self) -> None:
        assert self.child_roles() == {"api", "scheduler", "worker"}, self.output()
        text = self.log.read_text(errors="replace")
        assert "restarting" not in text and "keeps dying" not in text, self.output()

    def remember_processes(self) -> None:
        """Every process of this instance: its children and the servers under data_dir
        (PostgreSQL's postmaster detaches from the process tree, so it is found by its pid
        file and its own children)."""
        found: list[psutil.Process] = []
        try:
            found += psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        found += _processes_of(self.data_dir)
        for proc in list(found):
            try:
                found += proc.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for proc in found:
            try:
                self.seen[proc.pid] = proc.create_time()
            except psutil.NoSuchProcess:
                pass

    def still_running(self) -> list[str]:
        alive = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and _alive(proc):
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        alive += _processes_of(self.data_dir)
        described = set()
        for proc in alive:
            try:
                described.add(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        return sorted(described)

    def stop(self, *, whole_group: bool) -> int:
        """SIGINT to the process, or to its whole group as Ctrl-C in a terminal does."""
        self.remember_processes()
        if whole_group:
            os.killpg(self.process.pid, signal.SIGINT)
        else:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {STOP_TIMEOUT_S} s after SIGINT:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """Leave nothing behind, whatever state the test failed in."""
        self.remember_processes()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:
                    proc.kill()
            except psutil.NoSuchProcess:
                pass


def _processes_of(data_dir: Path) -> list[psutil.Process]:
    """Live processes whose command line names data_dir, plus the postmaster of its pid file."""
    found = [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if str(data_dir) in " ".join(proc.info["cmdline"] or ())
    ]
    try:
        pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        found.append(psutil.Process(pid))
    except (FileNotFoundError, IndexError, ValueError, psutil.NoSuchProcess):
        pass  # a stale pid file may name a pid that is gone
    return [proc for proc in found if _alive(proc)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def ferry_up(data_dir: Path, config_home: Path, port: int, log: Path) -> Iterator[Up]:
    up = Up(data_dir, config_home, port, log)
    try:
        yield up
    finally:
        up.kill()


def _get(url: str, path: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_up_stops_cleanly_and_starts_again_with_its_data(tmp_path):
    data_dir = Path(tempfile.mkdtemp(prefix="fu-"))  # short: unix socket paths < 107 bytes
    config_home = tmp_path / "config"
    config_file = config_home / "ferry" / "config.toml"
    port = _free_port()
    log = tmp_path / "ferry-up.log"
    try:
        # First start: embedded servers are created, an admin token is written.
        with ferry_up(data_dir, config_home, port, log) as up:
            first_ready_s = up.wait_ready()
            assert config_file.exists(), up.output()
            assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
            config_text = config_file.read_text()
            config = tomllib.loads(config_text)
            assert config["url"] == up.url
            token = config["token"]
            assert _get(up.url, "/api/v1/projects", token).status_code == 200
            created = httpx.post(
                f"{up.url}/api/v1/projects",
                json={"name": "survives-restart"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert created.status_code == 201, created.text
            project_id = created.json()["id"]
            up.check_children_stayed_up()

            assert up.stop(whole_group=False) == 0, up.output()
            leftovers = up.still_running()
            assert not leftovers, f"still running after exit: {leftovers}\n{up.output()}"

        # Second start on the same data directory: same data, same token, same config file.
        with ferry_up(data_dir, config_home, port, log) as up:
            second_ready_s = up.wait_ready()
            assert config_file.read_text() == config_text, "the config file was rewritten"
            projects = _get(up.url, "/api/v1/projects", token)
            assert projects.status_code == 200
            assert project_id in [p["id"] for p in projects.json()["items"]]
            tokens = _get(up.url, "/api/v1/tokens", token).json()["items"]
            assert [t["role"] for t in tokens].count("admin") == 1, tokens
            up.check_children_stayed_up()

            assert up.stop(whole_group=True) == 0, up.output()  # as Ctrl-C in a terminal
            leftovers = up.still_running()
            assert not leftovers, f"still running after exit: {leftovers}\n{up.output()}"

        print(
            f"\nferry up: ready in {first_ready_s:.1f} s on first start (fresh data dir), "
            f"{second_ready_s:.1f} s on second start"
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_up_falls_back_to_the_process_runtime_without_a_runner_image(settings):
    """A missing image that cannot be built here: said so, and the process runtime instead
    of executions waiting in `created` forever (no engine at all: `auto` is process)."""
    from io import StringIO

    from rich.console import Console

    from ferry.supervisor import _runner_image_unusable

    text = StringIO()
    console = Console(file=text, width=300)
    missing = settings.model_copy(update={"runtime": "auto", "runner_image": "ferry/none:0"})
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception:
        assert _runner_image_unusable(missing, console) is False
        return
    assert _runner_image_unusable(missing, console) is True
    assert "ferry/none:0 is missing" in text.getvalue()
    assert "process runtime" in text.getvalue()
    forced = settings.model_copy(update={"runtime": "process", "runner_image": "ferry/none:0"})
    assert _runner_image_unusable(forced, console) is False
