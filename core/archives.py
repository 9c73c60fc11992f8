"""Uploaded codebase archives (.zip, .tar.gz), inspected and extracted as hostile input.

Every member name is checked before anything is written: no absolute paths, `..`,
backslashes, drive letters or control characters; only regular files and directories (no
links, devices or fifos); no duplicates; at most `max_files` members. Sizes are counted
from the bytes actually decompressed, never from headers, and reading stops at the cap.
Any problem, including a corrupt or truncated archive, is an `Invalid` naming `codebase`.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, cast

from pydantic import BaseModel, ConfigDict

from core.errors import Invalid

MANIFEST_NAMES = ("ferry.yaml", "ferry.yml")
MAX_MANIFEST_BYTES = 1 << 20
_CHUNK = 1 << 16
# tarfile reads a pax or GNU long-name header's payload in one read(); real ones are tiny.
_MAX_TAR_HEADER_READ = 1 << 20
# Room for tar headers and padding beside the members' content in the decompressed stream.
_TAR_OVERHEAD_PER_MEMBER = 4096
_MAX_PATH_BYTES = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CORRUPT = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    OSError,  # includes gzip.BadGzipFile
    ValueError,  # includes UnicodeDecodeError of member names
    struct.error,
    NotImplementedError,
    RuntimeError,
    IndexError,
    KeyError,
    OverflowError,
)


class ArchiveInfo(BaseModel):
    """What an accepted archive holds. Paths are as extracted: below `root`, if any."""

    model_config = ConfigDict(frozen=True)

    format: Literal["zip", "tar.gz"]
    sha256: str
    size: int  # of the archive itself
    unpacked_size: int  # sum of the regular files' decompressed sizes
    files: list[str]  # regular files, sorted, '/'-separated
    root: str = ""  # single top-level folder holding ferry.yaml, stripped on extraction
    manifest_text: str | None = None  # ferry.yaml or ferry.yml at the root


@dataclass(frozen=True)
class _Member:
    path: str  # normalised, before root stripping; "" is the archive root itself
    is_dir: bool
    executable: bool
    declared_size: int
    open: Callable[[], IO[bytes]]


def inspect_archive(
    data: bytes, filename: str | None, *, max_unpacked_bytes: int, max_files: int
) -> ArchiveInfo:
    """Validate an uploaded codebase, read it fully (checksums, true sizes) and describe it.

    `filename` only improves error messages: the format is detected from the content.
    Raises `Invalid` naming `codebase` for anything unacceptable.
    """
    archive_format = _detect_format(data, filename)
    with _members(data, archive_format, max_unpacked_bytes, max_files, None) as members:
        root, manifest_path = _layout(members)
        budget = _Budget(max_unpacked_bytes)
        manifest_bytes = None
        for member in members:
            if member.is_dir:
                continue
            content = bytearray() if member.path == manifest_path else None
            for chunk in _chunks(member, budget):
                if content is not None:
                    content += chunk
                    if len(content) > MAX_MANIFEST_BYTES:
                        raise _invalid(f"{member.path!r} is larger than {MAX_MANIFEST_BYTES} bytes")
            if content is not None:
                manifest_bytes = bytes(content)
    manifest_text = None
    if manifest_bytes is not None:
        try:
            manifest_text = manifest_bytes.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise _invalid(f"{manifest_path!r} is not UTF-8 text") from None
    return ArchiveInfo(
        format=archive_format,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        unpacked_size=budget.used,
        files=sorted(_strip(root, m.path) for m in members if not m.is_dir),
        root=root,
        manifest_text=manifest_text,
    )


def extract_archive(data: bytes, dest: Path, *, max_unpacked_bytes: int, max_files: int) -> None:
    """Extract a codebase into `dest`, re-validating everything, atomically.

    Files are written into a temporary directory beside `dest` (files 0o644, or 0o755 when
    an executable bit is set; directories 0o755), then renamed into place, so a concurrent
    reader never sees half a codebase. An existing `dest` is left as it is: codebases are
    stored by content hash, so it already holds the same files.
    """
    dest = Path(dest)
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    archive_format = _detect_format(data, None)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        with _members(data, archive_format, max_unpacked_bytes, max_files, dest.parent) as members:
            root, _ = _layout(members)
            _write_members(members, root, staging, _Budget(max_unpacked_bytes))
        for directory, _, _ in os.walk(staging):
            os.chmod(directory, 0o755)
            _fsync(directory)
        try:
            os.rename(staging, dest)
        except OSError:
            if not dest.is_dir():
                raise
            return  # another process extracted the same content first
        _fsync(dest.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_members(members: list[_Member], root: str, staging: Path, budget: _Budget) -> None:
    base = staging.resolve()
    for member in members:
        relative = _strip(root, member.path)
        if not relative:
            continue
        target = staging / relative
        if not target.resolve().is_relative_to(base):
            raise _invalid(f"member {member.path!r} would be written outside the codebase")
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o755 if member.executable else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, mode)
        with open(fd, "wb", closefd=True) as out:
            os.fchmod(fd, mode)  # open()'s mode is filtered by the umask
            for chunk in _chunks(member, budget):
                out.write(chunk)
            out.flush()
            os.fsync(fd)


def _fsync(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Budget:
    """Decompressed bytes counted as they are read, failing as soon as the cap is passed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            raise _too_large(self.limit)


def _chunks(member: _Member, budget: _Budget) -> Iterator[bytes]:
    # Only reading is translated into Invalid; errors of the consumer (say, a full disk)
    # happen outside these blocks and propagate as they are.
    with _corrupt_is_invalid():
        stream = member.open()
    with stream:
        while True:
            with _corrupt_is_invalid():
                chunk = stream.read(_CHUNK)
            if not chunk:
                return
            budget.take(len(chunk))
            yield chunk


@contextlib.contextmanager
def _corrupt_is_invalid() -> Iterator[None]:
    try:
        yield
    except _CORRUPT as error:
        reason = str(error)[:200] or type(error).__name__
        raise _invalid(f"the archive is corrupt or truncated ({reason})") from None


def _detect_format(data: bytes, filename: str | None) -> Literal["zip", "tar.gz"]:
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # the second: an empty zip
        return "zip"
    if data.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if not data:
        raise _invalid("the upload is empty")
    named = f"{filename!r} is not" if filename else "not"
    raise _invalid(f"{named} a .zip or .tar.gz archive (only .zip or .tar.gz are accepted)")


@contextlib.contextmanager
def _members(
    data: bytes,
    archive_format: str,
    max_unpacked_bytes: int,
    max_files: int,
    scratch_dir: Path | None,
) -> Iterator[list[_Member]]:
    """The archive's validated members, readable while the context is open."""
    with contextlib.ExitStack() as stack:
        if archive_format == "zip":
            members = _zip_members(data, max_files, stack)
        else:
            limit = max_unpacked_bytes + (max_files + 1) * _TAR_OVERHEAD_PER_MEMBER
            tar_stream = stack.enter_context(tempfile.TemporaryFile(dir=scratch_dir))
            _gunzip(data, tar_stream, limit, max_unpacked_bytes)
            members = _tar_members(tar_stream, max_files, stack)
        _check_members(members, max_unpacked_bytes)
        yield members


def _zip_members(data: bytes, max_files: int, stack: contextlib.ExitStack) -> list[_Member]:
    with _corrupt_is_invalid():
        archive = stack.enter_context(zipfile.ZipFile(io.BytesIO(data)))
        infos = archive.infolist()
    _check_count(len(infos), max_files)
    members = []
    for info in infos:
        path = _normalise(info.orig_filename)
        if info.flag_bits & 0x1:
            raise _invalid(f"member {path!r} is encrypted")
        # zipfile bounds memory only while inflating deflate; bzip2/lzma could balloon a read.
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _invalid(
                f"member {path!r} uses compression method {info.compress_type}; "
                "only stored and deflate are supported"
            )
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        is_dir = info.filename.endswith("/")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR) or (kind == stat.S_IFDIR and not is_dir):
            raise _invalid(f"member {path!r} is {_kind_name(kind)}; only files and directories")
        members.append(
            _Member(
                path=path,
                is_dir=is_dir,
                executable=bool(mode & 0o111) and not is_dir,
                declared_size=0 if is_dir else info.file_size,
                open=functools.partial(archive.open, info),
            )
        )
    return members


def _gunzip(data: bytes, out: IO[bytes], limit: int, max_unpacked_bytes: int) -> None:
    # Decompressed to a scratch file so tarfile can seek; a gzip bomb stops at `limit`.
    written = 0
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        while True:
            with _corrupt_is_invalid():
                chunk = stream.read(_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if written > limit:
                raise _too_large(max_unpacked_bytes)
            out.write(chunk)
    if written == 0:
        raise _invalid("the archive is empty")
    out.seek(0)


class _TarStream:
    """The decompressed tar stream, refusing tarfile's single huge header reads."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > _MAX_TAR_HEADER_READ:
            raise _invalid(f"a tar header or read of {size} bytes is larger than allowed")
        return self.raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _tar_members(raw: IO[bytes], max_files: int, stack: contextlib.ExitStack) -> list[_Member]:
    stream = _TarStream(raw)
    with _corrupt_is_invalid():
        archive = stack.enter_context(tarfile.open(fileobj=cast(IO[bytes], stream), mode="r:"))
    infos: list[tarfile.TarInfo] = []
    while True:
        with _corrupt_is_invalid():
            info = archive.next()
        if info is None:
            break
        infos.append(info)
        _check_count(len(infos), max_files)
    # tarfile ends quietly at an unreadable header; a sound archive ends with a zero block.
    raw.seek(archive.offset)
    if raw.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise _invalid("the archive is corrupt or truncated (bad tar header)")
    members = []
    for info in infos:
        path = _normalise(info.name)
        if info.sparse is not None or info.type == tarfile.GNUTYPE_SPARSE:
            raise _invalid(f"member {path!r} is a sparse file; only plain files are supported")
        if not (info.isreg() or info.isdir()):
            raise _invalid(f"member {path!r} is {_tar_kind(info)}; only files and directories")
        members.append(
            _Member(
                path=path,
                is_dir=info.isdir(),
                executable=bool(info.mode & 0o111) and not info.isdir(),
                declared_size=0 if info.isdir() else info.size,
                open=_tar_opener(archive, info),
            )
        )
    return members


def _tar_opener(archive: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def open_member() -> IO[bytes]:
        stream = archive.extractfile(info)
        assert stream is not None  # only regular files are opened
        return stream

    return open_member


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.ischr():
        return "a character device"
    if info.isblk():
        return "a block device"
    if info.isfifo():
        return "a fifo"
    return f"of unsupported type {info.type!r}"


def _kind_name(kind: int) -> str:
    names = {
        stat.S_IFLNK: "a symbolic link",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFIFO: "a fifo",
        stat.S_IFSOCK: "a socket",
        stat.S_IFDIR: "a directory without a trailing '/'",
    }
    return names.get(kind, f"of unsupported type {oct(kind)}")


def _normalise(name: str) -> str:
    """A member name as a safe relative '/'-separated path, or `Invalid` saying why not."""
    shown = repr(name[:200])
    if "\x00" in name:
        raise _invalid(f"member {shown} has a NUL byte in its name")
    if "\\" in name:
        raise _invalid(f"member {shown} has a backslash in its name")
    if name.startswith("/"):
        raise _invalid(f"member {shown} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if parts and re.match(r"[A-Za-z]:", parts[0]):
        raise _invalid(f"member {shown} starts with a drive letter")
    if ".." in parts:
        raise _invalid(f"member {shown} has a '..' component")
    if _CONTROL.search(name):
        raise _invalid(f"member {shown} has a control character in its name")
    try:
        encoded = [part.encode("utf-8") for part in parts]
    except UnicodeEncodeError:
        raise _invalid(f"member {shown} has a name that is not valid UTF-8") from None
    if any(len(part) > 255 for part in encoded) or sum(map(len, encoded)) > _MAX_PATH_BYTES:
        raise _invalid(f"member {shown} has a name that is too long")
    return "/".join(parts)


def _check_count(count: int, max_files: int) -> None:
    if count > max_files:
        raise _invalid(f"the archive has more than {max_files} members")


def _check_members(members: list[_Member], max_unpacked_bytes: int) -> None:
    seen: set[str] = set()
    files: set[str] = set()
    for member in members:
        if member.path == "" and member.is_dir:
            continue  # an entry for the archive root itself, as "./" in tar
        if member.path == "" or member.path in seen:
            problem = "an empty name" if member.path == "" else "a duplicate name"
            raise _invalid(f"member {member.path!r} has {problem}")
        seen.add(member.path)
        if not member.is_dir:
            files.add(member.path)
    for path in seen:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in files:
                raise _invalid(f"{parent!r} is both a file and a directory")
    if not files:
        raise _invalid("the archive is empty (no files)")
    if sum(m.declared_size for m in members) > max_unpacked_bytes:
        raise _too_large(max_unpacked_bytes)


def _layout(members: list[_Member]) -> tuple[str, str | None]:
    """The root to strip and the manifest's path: at the top, or in a single top folder."""
    files = {m.path for m in members if not m.is_dir}
    found = [name for name in MANIFEST_NAMES if name in files]
    root = ""
    if not found:
        tops = {m.path.split("/")[0] for m in members if m.path}
        if len(tops) == 1 and (top := tops.pop()) not in files:
            found = [name for name in MANIFEST_NAMES if f"{top}/{name}" in files]
            root = top if found else ""
    if len(found) > 1:
        raise _invalid("both ferry.yaml and ferry.yml are at the root; keep one")
    manifest_path = f"{root}/{found[0]}" if root and found else (found[0] if found else None)
    return root, manifest_path


def _strip(root: str, path: str) -> str:
    if not root:
        return path
    return "" if path == root else path.removeprefix(root + "/")


def _too_large(limit: int) -> Invalid:
    return _invalid(f"the archive unpacks to more than {limit / (1 << 20):g} MB")


def _invalid(message: str) -> Invalid:
    return Invalid.field("codebase", message)
