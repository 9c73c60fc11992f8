"""The CLI's config file: `~/.config/ferry/config.toml` with `url`, `token` and an optional
default `project` (mode 0600). `FERRY_URL` and `FERRY_TOKEN` override the file."""

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


def connection() -> tuple[str | None, str | None]:
    """The URL and token to use: the environment's, else the config file's."""
    config = read_config()
    url = os.environ.get("FERRY_URL") or config.get("url")
    token = os.environ.get("FERRY_TOKEN") or config.get("token")
    return url, token


def write_config(url: str, token: str, **others: str | None) -> Path:
    """Set `url` and `token` (and any of `others`; None removes one), keeping other keys."""
    values = {k: v for k, v in read_config().items() if isinstance(v, str)}
    values.update(url=url, token=token)
    for key, value in others.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps quotes a string the way TOML's basic strings want it.
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
    return path
