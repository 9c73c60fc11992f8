"""The README's quickstart, run as a new user would: its commands are read from the README
itself (so it cannot drift from what works) and run twice, with bash, against a real
`ferry up` on the process runtime."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from tests.test_up import REPO, _free_port, ferry_up

pytestmark = pytest.mark.slow

SECTION = "## Quickstart: from a folder to a result"


def quickstart_script() -> str:
    """The first `sh` block of the README's quickstart section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", 1)]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "the quickstart has no sh block"
    return match.group(1)


def test_the_quickstart_block_is_the_loop():
    commands = [line.split("#")[0].strip() for line in quickstart_script().splitlines()]
    words = [c.split()[:2] for c in commands if c.startswith("ferry ")]
    assert [w[1] for w in words] == ["init", "deploy", "run", "logs"]


def test_readme_quickstart_runs_twice(tmp_path):
    script = quickstart_script()
    # `ferry` as this checkout's: a shim first on the PATH (the README's `.venv/bin` is the
    # clone's own venv, absent from a work tree; where it exists it installs this checkout).
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "ferry"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ferry "$@"\n')
    shim.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    config_home = tmp_path / "config"
    data_dir = Path(tempfile.mkdtemp(prefix="fq-"))  # short: unix socket paths < 107 bytes
    with ferry_up(data_dir, config_home, _free_port(), tmp_path / "up.log") as up:
        up.wait_ready()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
        env.update(
            PATH=f"{shims}:{env['PATH']}",
            PYTHONPATH=str(REPO),
            XDG_CONFIG_HOME=str(config_home),
            HOME=str(home),
            COLUMNS="200",
        )
        for attempt in (1, 2):
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=home,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert done.returncode == 0, (attempt, done.stdout, done.stderr, up.output())
            output = done.stdout
            # `ferry run` printed the output as JSON, then `ferry logs -f` the lines.
            start = output.index("{")
            result, end = json.JSONDecoder().raw_decode(output[start:])
            assert result == {"greeting": "hello ferry"}
            logs = output[start + end :].split()
            assert "logs" in logs and "(3/3)" in logs, output
            if attempt == 1:
                assert "revision 1 uploaded" in done.stderr, done.stderr
            else:
                assert "kept" in done.stderr and "nothing to do" in done.stderr, done.stderr
        config = tomllib.loads((config_home / "ferry" / "config.toml").read_text())
        assert config["url"] == up.url
    shutil.rmtree(data_dir, ignore_errors=True)
