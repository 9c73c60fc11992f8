"""Service secrets: encrypted at rest (Fernet), never returned by the API, masked in logs.

The key comes from `FERRY_SECRET_KEY`; without it, one is generated once into the data
directory (mode 0600). Processes on several hosts must share the key: set the variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from core.settings import Settings

MASK = "********"


class SecretBox:
    def __init__(self, key: str | bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        if settings.secret_key:
            return cls(settings.secret_key)
        path = settings.data_dir / "secret.key"
        return cls(_read_or_create_key(path))

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise RuntimeError(
                "cannot decrypt a service secret: this process has a different FERRY_SECRET_KEY "
                "than the one that stored it"
            ) from exc


def _read_or_create_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    key = Fernet.generate_key()
    # O_EXCL: when two processes race, one writes and the other reads the winner's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


def mask_secrets(text: str, values: list[str]) -> str:
    """Replace every secret value (of 4+ characters; shorter ones would mask noise) in text."""
    for value in values:
        if len(value) >= 4 and value in text:
            text = text.replace(value, MASK)
    return text
