"""Hostile uploads: every archive here is built for real with zipfile/tarfile."""

from __future__ import annotations

import contextlib
import io
import os
import random
import stat
import struct
import tarfile
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from core.archives import ArchiveInfo, extract_archive, inspect_archive
from core.errors import Invalid

MB = 1 << 20
LIMITS = {"max_unpacked_bytes": 10 * MB, "max_files": 100}
MANIFEST = "name: demo\nmodules: [{name: main, entry_point: main.py, functions: [{name: f}]}]\n"


def make_zip(
    entries: dict[str, bytes | str], *, modes: dict[str, int] | None = None, method: int = 8
) -> bytes:
    """A zip of `entries`; names ending in '/' are directories; `modes` are unix st_mode."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicates some tests want
        with zipfile.ZipFile(buffer, "w", compression=method) as archive:
            for name, content in entries.items():
                info = zipfile.ZipInfo(name)
                info.compress_type = method
                default = 0o40755 if name.endswith("/") else 0o100644
                info.external_attr = ((modes or {}).get(name, default) & 0xFFFF) << 16
                archive.writestr(info, content)
    return buffer.getvalue()


def zip_with(infos: list[tuple[str, bytes]]) -> bytes:
    """A zip that may repeat names (a dict cannot)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, content in infos:
                archive.writestr(name, content)
    return buffer.getvalue()


def tar_member(name: str, content: bytes = b"", **fields: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, content


def make_tar_gz(
    members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=fmt) as archive:
        for info, content in members:
            archive.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return buffer.getvalue()


def tar_of(entries: dict[str, bytes | str]) -> bytes:
    members = []
    for name, content in entries.items():
        if name.endswith("/"):
            members.append(tar_member(name.rstrip("/"), type=tarfile.DIRTYPE, mode=0o755))
        else:
            raw = content.encode() if isinstance(content, str) else content
            members.append(tar_member(name, raw))
    return make_tar_gz(members)


def rejected(data: bytes, *, extract_to: Path | None = None, **limits: int) -> Invalid:
    """Assert that both inspect and extract refuse `data` with codebase details; return one."""
    limits = {**LIMITS, **limits}
    with pytest.raises(Invalid) as inspected:
        inspect_archive(data, "upload.zip", **limits)  # type: ignore[arg-type]
    assert inspected.value.status == 422
    assert [d["field"] for d in inspected.value.details] == ["codebase"]
    if extract_to is not None:
        dest = extract_to / "codebase"
        with pytest.raises(Invalid):
            extract_archive(data, dest, **limits)  # type: ignore[arg-type]
        assert not dest.exists()
        assert os.listdir(extract_to) == []  # no partial staging directory left behind
    return inspected.value


# --- formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [make_zip, tar_of], ids=["zip", "tar.gz"])
def test_valid_archive_is_described(build):
    data = build({"ferry.yaml": MANIFEST, "main.py": "def f(): pass\n", "lib/util.py": "x = 1\n"})
    info = inspect_archive(data, "code", **LIMITS)
    assert isinstance(info, ArchiveInfo)
    assert info.format == ("zip" if build is make_zip else "tar.gz")
    assert info.files == ["ferry.yaml", "lib/util.py", "main.py"]
    assert info.manifest_text == MANIFEST
    assert info.root == ""
    assert info.size == len(data)
    assert info.unpacked_size == len(MANIFEST) + len("def f(): pass\n") + len("x = 1\n")
    assert len(info.sha256) == 64


def test_format_comes_from_content_not_name():
    data = tar_of({"main.py": "x = 1\n"})
    assert inspect_archive(data, "misnamed.zip", **LIMITS).format == "tar.gz"


@pytest.mark.parametrize(
    "data",
    [
        b"Rar!\x1a\x07\x00" + bytes(100),
        random.Random(1).randbytes(4096),
        b"\x7fELF\x02\x01\x01" + bytes(64),
    ],
    ids=["rar", "random", "elf"],
)
def test_other_formats_are_refused(data, tmp_path):
    error = rejected(data, extract_to=tmp_path)
    assert "only .zip or .tar.gz" in error.details[0]["message"]
    assert "upload.zip" in error.details[0]["message"]


def test_plain_uncompressed_tar_is_refused():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info, content = tar_member("main.py", b"x")
        archive.addfile(info, io.BytesIO(content))
    assert "only .zip or .tar.gz" in rejected(buffer.getvalue()).message


def test_gzip_of_something_other_than_tar_is_refused():
    import gzip

    assert "corrupt" in rejected(gzip.compress(b"just some text, not a tar" * 40)).message


@pytest.mark.parametrize(
    "data",
    [b"", make_zip({}), make_tar_gz([]), make_zip({"only-a-dir/": b""})],
    ids=["no-bytes", "empty-zip", "empty-tar.gz", "only-dirs"],
)
def test_empty_archives_are_refused(data, tmp_path):
    assert "empty" in rejected(data, extract_to=tmp_path).message


# --- member names ----------------------------------------------------------------------

HOSTILE_NAMES = {
    "../evil.py": "'..'",
    "lib/../../evil.py": "'..'",
    "/etc/x": "absolute",
    "..\\evil.py": "backslash",
    "lib\\..\\..\\evil.py": "backslash",
    "C:/Windows/evil.py": "drive letter",
    "c:evil.py": "drive letter",
    "evil\n.py": "control character",
}


@pytest.mark.parametrize("name", list(HOSTILE_NAMES))
def test_hostile_names_in_zip(name, tmp_path):
    error = rejected(make_zip({"main.py": "x", name: "boom"}), extract_to=tmp_path)
    assert HOSTILE_NAMES[name] in error.message
    assert repr(name) in error.message  # the member is named
    assert not (tmp_path.parent / "evil.py").exists()


@pytest.mark.parametrize("name", list(HOSTILE_NAMES))
def test_hostile_names_in_tar(name, tmp_path):
    data = make_tar_gz([tar_member("main.py", b"x"), tar_member(name, b"boom")])
    assert HOSTILE_NAMES[name] in rejected(data, extract_to=tmp_path).message


def test_nul_byte_in_zip_name_is_refused():
    # zipfile truncates names at NUL ("evil.py\0.txt" reads as "evil.py"); the raw name counts.
    data = make_zip({"main.py": "x", "evil.py": "boom"})
    data = data.replace(b"evil.py", b"evi\x00.py")
    assert "NUL" in rejected(data).message


def test_overlong_names_are_refused():
    assert "too long" in rejected(make_zip({"a" * 300 + ".py": "x"})).message
    deep = "/".join(["d" * 100] * 12) + "/x.py"
    assert "too long" in rejected(make_zip({deep: "x"})).message


@pytest.mark.parametrize(
    "data",
    [
        zip_with([("main.py", b"a"), ("main.py", b"b")]),
        zip_with([("main.py", b"a"), ("./main.py", b"b")]),
        zip_with([("lib/x.py", b"a"), ("lib//x.py", b"b")]),
        make_tar_gz([tar_member("main.py", b"a"), tar_member("main.py", b"b")]),
    ],
    ids=["zip", "zip-dot-slash", "zip-double-slash", "tar"],
)
def test_duplicate_names_are_refused(data):
    assert "duplicate" in rejected(data).message


def test_a_path_cannot_be_both_file_and_directory():
    error = rejected(make_zip({"lib": "file", "lib/x.py": "x"}))
    assert "both a file and a directory" in error.message


def test_too_many_members(tmp_path):
    entries = {f"m{i}.py": "x" for i in range(6)}
    for data in (make_zip(entries), tar_of(entries)):
        error = rejected(data, extract_to=tmp_path, max_files=5)
        assert "more than 5 members" in error.message
    assert inspect_archive(make_zip(entries), None, max_unpacked_bytes=MB, max_files=6)


# --- member types ----------------------------------------------------------------------


def test_symlink_in_zip_is_refused(tmp_path):
    data = make_zip({"main.py": "x", "link": "/etc/passwd"}, modes={"link": stat.S_IFLNK | 0o777})
    error = rejected(data, extract_to=tmp_path)
    assert "'link' is a symbolic link" in error.message


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(stat.S_IFCHR, "character device"), (stat.S_IFIFO, "fifo"), (stat.S_IFSOCK, "socket")],
)
def test_special_files_in_zip_are_refused(kind, expected):
    assert expected in rejected(make_zip({"odd": ""}, modes={"odd": kind | 0o644})).message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "a symbolic link"),
        ({"type": tarfile.SYMTYPE, "linkname": "../../outside"}, "a symbolic link"),
        ({"type": tarfile.LNKTYPE, "linkname": "main.py"}, "a hard link"),
        ({"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, "a character device"),
        ({"type": tarfile.BLKTYPE, "devmajor": 8, "devminor": 0}, "a block device"),
        ({"type": tarfile.FIFOTYPE}, "a fifo"),
    ],
    ids=["symlink-absolute", "symlink-relative", "hardlink", "chardev", "blockdev", "fifo"],
)
def test_links_and_devices_in_tar_are_refused(fields, expected, tmp_path):
    data = make_tar_gz([tar_member("main.py", b"x"), tar_member("odd", **fields)])
    error = rejected(data, extract_to=tmp_path)
    assert f"'odd' is {expected}" in error.message


def test_bzip2_members_are_refused():
    data = make_zip({"main.py": "x" * 100}, method=zipfile.ZIP_BZIP2)
    assert "compression method 12" in rejected(data).message


def test_encrypted_members_are_refused():
    data = bytearray(make_zip({"main.py": "x"}, method=zipfile.ZIP_STORED))
    for offset, flag_at in ((0, 6), (data.index(b"PK\x01\x02"), 8)):
        data[offset + flag_at] |= 0x1  # the "encrypted" general purpose flag
    assert "encrypted" in rejected(bytes(data)).message


# --- sizes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """300 MB of zeros deflated into a few hundred KB, streamed so it builds in a second."""
    buffer = io.BytesIO()
    zeros = bytes(MB)
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("zeros.bin", "w", force_zip64=True) as member:
            for _ in range(300):
                member.write(zeros)
    return buffer.getvalue()


def test_zip_bomb_is_refused(zip_bomb, tmp_path):
    assert len(zip_bomb) < 2 * MB
    error = rejected(zip_bomb, extract_to=tmp_path)
    assert "more than 10 MB" in error.message


def _lie_about_sizes(data: bytes, claimed: int) -> bytes:
    """Rewrite every uncompressed-size field (local header and central directory) to `claimed`."""
    patched = bytearray(data)
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := patched.find(signature, start)) >= 0:
            patched[start + size_at : start + size_at + 4] = struct.pack("<I", claimed)
            start += 4
    return bytes(patched)


def test_zip_whose_header_lies_about_size_is_refused(tmp_path):
    # 30 MB of zeros claiming to be 1 KB: the header passes the cap, so only reading the
    # content can tell; reading stops at the claimed size and the checksum then fails.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("main.py", "x = 1\n")
        with archive.open("data.bin", "w") as member:
            for _ in range(30):
                member.write(bytes(MB))
    lying = _lie_about_sizes(buffer.getvalue(), 1024)
    started = time.monotonic()
    assert "corrupt" in rejected(lying, extract_to=tmp_path).message
    assert time.monotonic() - started < 10


def test_zip_claiming_more_than_the_cap_is_refused_before_reading():
    lying = _lie_about_sizes(make_zip({"main.py": "x = 1\n"}), 0xFFFF_FFF0)
    assert "more than 10 MB" in rejected(lying).message


def test_many_members_adding_up_past_the_cap():
    entries = {f"part{i}.bin": bytes(MB) for i in range(11)}
    assert "more than 10 MB" in rejected(make_zip(entries)).message


def test_tar_gz_bomb_is_refused(tmp_path):
    class Zeros(io.RawIOBase):
        def __init__(self, size: int) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer):  # type: ignore[no-untyped-def]
            count = min(len(buffer), self.left)
            buffer[:count] = bytes(count)
            self.left -= count
            return count

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 200 * MB
        archive.addfile(info, io.BufferedReader(Zeros(info.size)))
    error = rejected(buffer.getvalue(), extract_to=tmp_path)
    assert "more than 10 MB" in error.message


def test_tar_with_huge_long_name_header_is_refused():
    # tarfile reads a GNU long-name payload in one go: a 4 MB name must not be read whole.
    data = make_tar_gz([tar_member("x" * (4 * MB), b"boom")], fmt=tarfile.GNU_FORMAT)
    assert "larger than allowed" in rejected(data).message


def test_exactly_at_the_cap_is_accepted():
    data = make_zip({"a.bin": bytes(MB), "b.bin": bytes(MB)})
    assert inspect_archive(data, None, max_unpacked_bytes=2 * MB, max_files=2).unpacked_size == (
        2 * MB
    )
    assert "more than" in rejected(data, max_unpacked_bytes=2 * MB - 1).message


# --- corruption ------------------------------------------------------------------------


def test_corrupt_zip_content_is_refused(tmp_path):
    data = bytearray(make_zip({"main.py": "print('hello world')\n" * 50}))
    data[60] ^= 0xFF  # inside the deflated data of the only member
    assert "corrupt" in rejected(bytes(data), extract_to=tmp_path).message


@pytest.mark.parametrize("build", [make_zip, tar_of], ids=["zip", "tar.gz"])
def test_truncated_archives_are_refused(build, tmp_path):
    data = build({"main.py": random.Random(2).randbytes(20_000), "ferry.yaml": MANIFEST})
    for cut in (len(data) // 3, len(data) // 2, len(data) - 10):
        rejected(data[:cut], extract_to=tmp_path)


def test_tar_with_garbage_after_a_member_is_refused():
    # tarfile alone stops silently at an unreadable header and would drop the rest.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info, content = tar_member("main.py", b"x")
        archive.addfile(info, io.BytesIO(content))
    tar = buffer.getvalue()
    damaged = tar[:1024] + b"\xff" * 512 + tar[1536:]
    import gzip

    assert "corrupt" in rejected(gzip.compress(damaged)).message


@pytest.mark.parametrize("build", [make_zip, tar_of], ids=["zip", "tar.gz"])
def test_damaged_bytes_never_escape_as_other_errors(build, tmp_path):
    data = build({"ferry.yaml": MANIFEST, "main.py": "def f():\n    return 1\n" * 30})
    rng = random.Random(3)
    for attempt in range(300):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(4, len(damaged))] = rng.randrange(256)
        payload = bytes(damaged)
        with contextlib.suppress(Invalid):  # anything else escaping fails the test
            inspect_archive(payload, None, **LIMITS)
        with contextlib.suppress(Invalid):
            extract_archive(payload, tmp_path / f"run{attempt}", **LIMITS)


# --- layout ----------------------------------------------------------------------------


@pytest.mark.parametrize("build", [make_zip, tar_of], ids=["zip", "tar.gz"])
def test_single_top_folder_holding_the_manifest_is_the_root(build, tmp_path):
    data = build(
        {"proj/": b"", "proj/ferry.yml": MANIFEST, "proj/main.py": "x", "proj/lib/a.py": "y"}
    )
    info = inspect_archive(data, None, **LIMITS)
    assert info.root == "proj"
    assert info.files == ["ferry.yml", "lib/a.py", "main.py"]
    assert info.manifest_text == MANIFEST
    extract_archive(data, tmp_path / "code", **LIMITS)
    assert sorted(
        str(p.relative_to(tmp_path / "code")) for p in (tmp_path / "code").rglob("*")
    ) == [
        "ferry.yml",
        "lib",
        "lib/a.py",
        "main.py",
    ]


def test_single_top_folder_without_manifest_is_kept():
    info = inspect_archive(make_zip({"pkg/__init__.py": "", "pkg/main.py": "x"}), None, **LIMITS)
    assert (info.root, info.manifest_text) == ("", None)
    assert info.files == ["pkg/__init__.py", "pkg/main.py"]


def test_manifest_deeper_than_one_level_is_not_found():
    info = inspect_archive(make_zip({"a/b/ferry.yaml": MANIFEST}), None, **LIMITS)
    assert info.manifest_text is None


def test_tar_made_from_dot_has_dot_slash_names():
    data = make_tar_gz(
        [
            tar_member(".", type=tarfile.DIRTYPE, mode=0o755),
            tar_member("./ferry.yaml", MANIFEST.encode()),
            tar_member("./main.py", b"x"),
        ]
    )
    info = inspect_archive(data, None, **LIMITS)
    assert info.files == ["ferry.yaml", "main.py"]
    assert info.manifest_text == MANIFEST


def test_both_manifest_spellings_is_ambiguous():
    data = make_zip({"ferry.yaml": MANIFEST, "ferry.yml": MANIFEST})
    assert "keep one" in rejected(data).message


def test_manifest_must_be_utf8():
    assert "not UTF-8" in rejected(make_zip({"ferry.yaml": b"name: \xff\xfe"})).message


# --- extraction ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_extract_round_trip_with_modes(fmt, tmp_path):
    script = b"#!/bin/sh\necho hi\n"
    if fmt == "zip":
        data = make_zip(
            {"ferry.yaml": MANIFEST, "bin/": b"", "bin/run.sh": script, "secret.py": "x"},
            modes={"bin/": 0o40700, "bin/run.sh": 0o104755, "secret.py": 0o100600},
        )
    else:
        data = make_tar_gz(
            [
                tar_member("ferry.yaml", MANIFEST.encode()),
                tar_member("bin", type=tarfile.DIRTYPE, mode=0o700),
                tar_member("bin/run.sh", script, mode=0o4755),
                tar_member("secret.py", b"x", mode=0o600),
                tar_member("deep/er/file.txt", b"implicit parents"),
            ]
        )
    dest = tmp_path / "codebases" / "abc123"
    extract_archive(data, dest, **LIMITS)
    assert (dest / "bin" / "run.sh").read_bytes() == script
    assert (dest / "ferry.yaml").read_text() == MANIFEST
    assert stat.S_IMODE((dest / "bin" / "run.sh").stat().st_mode) == 0o755  # no setuid
    assert stat.S_IMODE((dest / "secret.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "ferry.yaml").stat().st_mode) == 0o644
    for directory in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    assert os.listdir(dest.parent) == ["abc123"]  # the staging directory is gone
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == (
        inspect_archive(data, None, **LIMITS).files
    )


def test_extract_leaves_an_existing_destination_alone(tmp_path):
    dest = tmp_path / "code"
    extract_archive(make_zip({"main.py": "first"}), dest, **LIMITS)
    extract_archive(make_zip({"main.py": "second"}), dest, **LIMITS)
    assert (dest / "main.py").read_text() == "first"


def test_concurrent_extractions_of_the_same_codebase(tmp_path):
    data = make_zip({f"m{i}.py": f"x = {i}\n" for i in range(50)})
    dest = tmp_path / "code"
    errors: list[BaseException] = []

    def extract() -> None:
        try:
            extract_archive(data, dest, **LIMITS)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=extract) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(list(dest.iterdir())) == 50
    assert os.listdir(tmp_path) == ["code"]


def test_extract_revalidates_and_writes_nothing_for_a_hostile_archive(tmp_path):
    data = make_tar_gz([tar_member("main.py", b"x"), tar_member("../../escape.py", b"boom")])
    with pytest.raises(Invalid):
        extract_archive(data, tmp_path / "sub" / "code", **LIMITS)
    assert not (tmp_path / "escape.py").exists()
    assert os.listdir(tmp_path / "sub") == []
