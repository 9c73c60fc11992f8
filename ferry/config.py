"""The CLI's config file: `~/.config/ferry/config.toml` with `url` and `token` (mode 0600)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ferry" / "config.toml"


def read_config() -> dict[str, str]:
    try:
        return tomllib.loads(config_path().read_text())
    except FileNotFoundError:
        return {}


def write_config(url: str, token: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps quotes a string the way TOML's basic strings want it.
    text = f"url = {json.dumps(url)}\ntoken = {json.dumps(token)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
    return path
