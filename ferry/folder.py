"""A function folder as `ferry deploy` uploads it: its files (less what `.gitignore` and
`.ferryignore` exclude), its manifest checked, and a reproducible zip of them.

The zip is built the same way every time (sorted names, fixed timestamps and modes), so an
unchanged folder gives the same bytes and the same sha256 the server records for a revision:
that is how a deploy of an unchanged folder knows it has nothing to upload.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pathspec

from core.archives import MANIFEST_NAMES
from core.errors import Invalid
from core.manifest import Manifest, check_entry_points, parse_manifest

IGNORE_FILES = (".gitignore", ".ferryignore")  # later files win: .ferryignore can re-include
# Never part of a codebase, whatever the ignore files say.
ALWAYS_IGNORED = [".git/", "__pycache__/", "*.py[cod]", ".venv/", ".ferry/", ".DS_Store"]
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Limits:
    """The server's archive limits (its FERRY_MAX_* settings)."""

    max_upload_bytes: int = 50 << 20
    max_unpacked_bytes: int = 200 << 20
    max_files: int = 10_000


@dataclass(frozen=True)
class Bundle:
    manifest: Manifest
    files: list[str]
    unpacked_size: int
    archive: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.archive).hexdigest()


def ignore_spec(root: Path) -> pathspec.PathSpec:
    lines = list(ALWAYS_IGNORED)
    for name in IGNORE_FILES:
        path = root / name
        if path.is_file():
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def list_files(root: Path) -> list[str]:
    """The folder's regular files as '/'-separated relative paths, ignored ones left out."""
    spec = ignore_spec(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        relative = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        # Pruning an ignored folder is what git does too: a file below it cannot be re-included.
        dirnames[:] = sorted(d for d in dirnames if not spec.match_file(f"{prefix}{d}/"))
        for name in filenames:
            path = f"{prefix}{name}"
            if not spec.match_file(path) and (Path(dirpath) / name).is_file():
                found.append(path)
    return sorted(found)


def read_manifest(root: Path) -> Manifest:
    """The folder's ferry.yaml, validated; `Invalid` names the field (`manifest.…`)."""
    for name in MANIFEST_NAMES:
        path = root / name
        if path.is_file():
            return parse_manifest(path.read_bytes(), name)
    raise Invalid.field("ferry.yaml", f"no ferry.yaml in {root} (`ferry init NAME` makes one)")


def bundle(root: Path, limits: Limits | None = None) -> Bundle:
    """Check and archive the folder; `Invalid` for a bad manifest or a limit it exceeds."""
    limits = limits or Limits()
    if not root.is_dir():
        raise Invalid.field("dir", f"{root} is not a folder")
    manifest = read_manifest(root)
    files = list_files(root)
    check_entry_points(manifest, files)
    if len(files) > limits.max_files:
        raise Invalid.field(
            "codebase", f"{len(files)} files, more than the server's limit of {limits.max_files}"
        )
    unpacked = sum((root / path).stat().st_size for path in files)
    if unpacked > limits.max_unpacked_bytes:
        raise Invalid.field(
            "codebase",
            f"{_mb(unpacked)} unpacked, more than the server's limit of "
            f"{_mb(limits.max_unpacked_bytes)} (list what need not ship in .ferryignore)",
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            mode = (root / path).stat().st_mode
            info = zipfile.ZipInfo(path, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            executable = mode & stat.S_IXUSR
            info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
            archive.writestr(info, (root / path).read_bytes())
    data = buffer.getvalue()
    if len(data) > limits.max_upload_bytes:
        raise Invalid.field(
            "codebase",
            f"the archive is {_mb(len(data))}, more than the server's upload limit of "
            f"{_mb(limits.max_upload_bytes)}",
        )
    return Bundle(manifest=manifest, files=files, unpacked_size=unpacked, archive=data)


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"
