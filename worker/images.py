"""Runner images: the default one built offline from Debian, and per-revision requirement images.

Machines without a registry cannot `FROM python:3.11-slim`, so the default runner image is
made from the OS package mirror: `debootstrap` a minimal Debian with Python into a temp dir,
shape it like `deploy/runner/Dockerfile` (user `ferry` 1000:1000, `/ferry/code`, env, labels)
and `docker import` it. A package revision's `requirements` become an image layered on the
runner image, tagged by a hash of its base image id and requirements, so equal revisions
share one image and a changed base rebuilds them.

Everything here blocks (subprocesses, Docker API calls): async callers use
`asyncio.to_thread`. Builds take a host-wide `flock`, so workers starting together on one
host build each image once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import docker
import docker.errors
from docker.utils import parse_repository_tag

RUNNER_TAG = "ferry/runner:py3"
RUNNER_VERSION = "1"  # bump when the image's shape changes (user, dirs, env, packages)
RUNNER_UID = 1000
REVISION_REPOSITORY = "ferry/revision"
DEBIAN_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RUNNER_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
LOCK_DIR = Path("/tmp")  # not $TMPDIR: every worker on the host must meet on the same file

# The image config both build paths give the runner image (see deploy/runner/Dockerfile).
RUNNER_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV PYTHONUNBUFFERED=1",
    "ENV LANG=C.UTF-8",
    "WORKDIR /ferry/code",
    "USER 1000:1000",
    'CMD ["python3"]',
    "LABEL ferry.runner=1",
    f"LABEL ferry.runner.version={RUNNER_VERSION}",
)

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """An image could not be built; `output` holds the last lines of the tool that failed."""

    def __init__(self, message: str, output: Iterable[str] = ()) -> None:
        self.output = list(output)
        if self.output:
            message = message + "\n" + "\n".join(self.output)
        super().__init__(message)


def _ignore(_: str) -> None:
    pass


# --- apt mirror -------------------------------------------------------------------------


def parse_apt_mirrors(text: str, suite: str = DEBIAN_SUITE) -> list[str]:
    """Binary-package mirrors serving `suite`, from deb822 `.sources` or one-line `.list` text.

    The suite filter skips `bookworm-security` and `bookworm-updates` entries, which
    debootstrap cannot bootstrap from.
    """
    mirrors: list[str] = []
    if re.search(r"^\s*URIs\s*:", text, re.MULTILINE | re.IGNORECASE):
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.lstrip().startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            types = fields.get("types", "deb").split()
            if "deb" not in types or fields.get("enabled", "yes").lower() == "no":
                continue
            if suite in fields.get("suites", "").split():
                mirrors.extend(fields.get("uris", "").split())
    else:
        for line in text.splitlines():
            line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])  # drop [options]
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                mirrors.append(words[1])
    return [m.rstrip("/") for m in mirrors if m.startswith(("http://", "https://", "file:/"))]


def default_mirror(suite: str = DEBIAN_SUITE, apt_dir: Path = Path("/etc/apt")) -> str:
    """The first mirror of this machine's apt sources serving `suite`, else deb.debian.org."""
    files = sorted(apt_dir.glob("sources.list.d/*.sources"))
    files += [apt_dir / "sources.list", *sorted(apt_dir.glob("sources.list.d/*.list"))]
    for path in files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            mirrors = parse_apt_mirrors(path.read_text(), suite)
            if mirrors:
                return mirrors[0]
    return DEFAULT_MIRROR


# --- host-wide lock ---------------------------------------------------------------------


@contextlib.contextmanager
def host_lock(name: str, lock_dir: Path | None = None) -> Iterator[None]:
    """Hold an exclusive `flock` named after `name`, shared by every process on this host."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    path = Path(lock_dir or LOCK_DIR) / f"ferry-image-{safe}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # created by another user in sticky /tmp: flock needs no write
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- the runner image -------------------------------------------------------------------


def runner_image_exists(client: docker.DockerClient, tag: str = RUNNER_TAG) -> bool:
    """Whether the local engine has `tag` (no registry is asked)."""
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_runner_image(
    client: docker.DockerClient,
    tag: str = RUNNER_TAG,
    on_progress: Progress | None = None,
    *,
    mirror: str | None = None,
    lock_dir: Path | None = None,
) -> str:
    """The id of the runner image `tag`, building it offline first if the engine lacks it."""
    with contextlib.suppress(docker.errors.ImageNotFound):
        return client.images.get(tag).id
    with host_lock(tag, lock_dir):
        with contextlib.suppress(docker.errors.ImageNotFound):
            return client.images.get(tag).id  # another worker built it while we waited
        return build_runner_image(tag, mirror, on_progress, client=client)


def build_runner_image(
    tag: str = RUNNER_TAG,
    mirror: str | None = None,
    on_progress: Progress | None = None,
    *,
    client: docker.DockerClient | None = None,
    suite: str = DEBIAN_SUITE,
) -> str:
    """Build the runner image from a Debian mirror with debootstrap and `docker import` it.

    Needs root and `debootstrap`; takes about a minute and the mirror's bandwidth.
    Returns the new image id.
    """
    progress = on_progress or _ignore
    if os.geteuid() != 0:
        raise ImageBuildError(
            "building the runner image needs root (debootstrap creates device nodes and "
            "chowns files): run `sudo python -m worker.images`, or build "
            "deploy/runner/Dockerfile where a registry is reachable"
        )
    if shutil.which("debootstrap") is None:
        raise ImageBuildError(
            "debootstrap is not installed: `apt-get install debootstrap` (Debian/Ubuntu) or "
            "`dnf install debootstrap` (Fedora), or build deploy/runner/Dockerfile instead"
        )
    client = client or docker.from_env()
    mirror = mirror or default_mirror(suite)
    workdir = Path(tempfile.mkdtemp(prefix="ferry-rootfs-"))
    root = workdir / "root"
    try:
        started = time.monotonic()
        progress(f"debootstrap {suite} from {mirror} into {root}")
        _debootstrap(root, suite, mirror, progress)
        progress(f"debootstrap finished in {time.monotonic() - started:.0f}s")
        prepare_rootfs(root)
        progress(f"root filesystem trimmed to {_tree_size(root) / 1e6:.0f} MB")
        started = time.monotonic()
        image_id = import_rootfs(client, root, tag, progress)
        progress(f"imported {tag} ({image_id[:19]}) in {time.monotonic() - started:.0f}s")
        return image_id
    finally:
        _unmount_below(workdir)
        shutil.rmtree(workdir, ignore_errors=True)


# Per-package debootstrap lines; the stage lines between them are what progress reports.
_PACKAGE_LINE = re.compile(
    r"^I: (?:(?:Retrieving|Validating) \S+ \S+|(?:Extracting|Unpacking|Configuring) \S+\.\.\.)$"
)


def _debootstrap(
    root: Path,
    suite: str,
    mirror: str,
    progress: Progress,
    packages: Iterable[str] = RUNNER_PACKAGES,
    cache_dir: Path | None = None,
) -> None:
    command = [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        *([f"--cache-dir={cache_dir}"] if cache_dir is not None else []),
        suite,
        str(root),
        mirror,
    ]
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line and not _PACKAGE_LINE.match(line):
                progress(f"debootstrap: {line}")
    if proc.returncode != 0:
        log = root / "debootstrap" / "debootstrap.log"
        with contextlib.suppress(OSError):
            tail.extend(log.read_text(errors="replace").splitlines()[-20:])
        raise ImageBuildError(f"debootstrap exited with {proc.returncode}", tail)


_DPKG_EXCLUDES = """\
# Keep the runner image small when derived images apt-get install more packages.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""

_APT_CLEAN = """\
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
"""


def prepare_rootfs(root: Path) -> None:
    """Shape a debootstrapped tree like the Dockerfile's image, and trim what runs never use."""
    etc = root / "etc"
    _append_once(etc / "passwd", "ferry:", "ferry:x:1000:1000:Ferry runner:/home/ferry:/bin/sh")
    _append_once(etc / "group", "ferry:", "ferry:x:1000:")
    _append_once(etc / "shadow", "ferry:", "ferry:*:19000:0:99999:7:::")
    _append_once(etc / "gshadow", "ferry:", "ferry:*::")
    for sub in ("home/ferry", "ferry/code", "ferry/run"):
        path = root / sub
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        os.chown(path, RUNNER_UID, RUNNER_UID)
    python = root / "usr/local/bin/python"  # python:3.x-slim has `python`; keep them alike
    if not python.exists():
        python.parent.mkdir(parents=True, exist_ok=True)
        python.symlink_to("/usr/bin/python3")

    (etc / "dpkg/dpkg.cfg.d/ferry-slim").write_text(_DPKG_EXCLUDES)
    (etc / "apt/apt.conf.d/ferry-clean").write_text(_APT_CLEAN)
    # Docker mounts its own /dev, resolv.conf, hostname and hosts; the host's must not leak.
    for name in ("resolv.conf", "hostname", "hosts"):
        (etc / name).unlink(missing_ok=True)
        (etc / name).touch()
    _empty(root / "dev")
    for pattern in (
        "var/lib/apt/lists/*",
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/cache/debconf/*-old",
        "var/lib/dpkg/*-old",
        "var/log/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
        "usr/share/lintian/*",
        "tmp/*",
        "root/.cache",
    ):
        for path in root.glob(pattern):
            _remove(path)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    for doc in (root / "usr/share/doc").glob("*"):
        if doc.is_dir() and not doc.is_symlink():
            for path in doc.iterdir():
                if path.name != "copyright":
                    _remove(path)


def import_rootfs(
    client: docker.DockerClient,
    root: Path,
    tag: str,
    on_progress: Progress | None = None,
    changes: Iterable[str] = RUNNER_CHANGES,
) -> str:
    """`docker import` the tree at `root` as `tag` with `changes` (by default the runner
    config); returns the image id."""
    progress = on_progress or _ignore
    repository, image_tag = parse_repository_tag(tag)
    # GNU tar keeps owners, modes, symlinks, hard links and device nodes exactly;
    # --one-file-system keeps a stray mount from ending up in the image.
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--one-file-system", "-C", str(root), "-cf", "-", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tar.stdout is not None and tar.stderr is not None
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        while chunk := tar.stdout.read(1 << 20):  # type: ignore[union-attr]
            sent += len(chunk)
            yield chunk

    progress(f"docker import as {tag}")
    try:
        client.api.import_image_from_data(
            chunks(), repository=repository, tag=image_tag, changes=list(changes)
        )
    finally:
        tar.stdout.close()
        errors = tar.stderr.read().decode(errors="replace").splitlines()
        tar.wait()
    if tar.returncode != 0:
        raise ImageBuildError(f"tar of {root} exited with {tar.returncode}", errors[-20:])
    progress(f"sent {sent / 1e6:.0f} MB to the engine")
    return client.images.get(tag).id


def _append_once(path: Path, prefix: str, line: str) -> None:
    if not path.exists():
        return
    text = path.read_text()
    if any(existing.startswith(prefix) for existing in text.splitlines()):
        return
    path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _empty(directory: Path) -> None:
    if directory.is_dir():
        for path in directory.iterdir():
            _remove(path)


def _tree_size(root: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _unmount_below(directory: Path) -> None:
    """Lazily unmount anything a failed debootstrap left mounted (proc, sys) before rmtree."""
    prefix = str(directory.resolve()) + "/"
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)


# --- per-revision requirement images ----------------------------------------------------

_NAME = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(\[[A-Za-z0-9._,\s-]*\])?")
_SPECIFIER = re.compile(r"^\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*$")
_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".zip")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The builder's own lines; what remains of a failed build's output is pip's.
_NEW_LAYER = re.compile(r"^ ---> ([0-9a-f]{12})$")
_BUILDER_CHATTER = re.compile(
    r"^(Step \d+/\d+ :| ---> |Removing intermediate container|Successfully (built|tagged))"
)


def normalise_requirements(requirements: Iterable[str]) -> list[str]:
    """Validated, canonical, sorted and de-duplicated pip requirement lines.

    Only PEP 508 requirements are accepted: `name[extras] specifiers ; marker` or
    `name @ https://...`. Options (`-e`, `-r`, `--index-url`, `--hash`), local paths and
    archives, and lines with embedded newlines raise ValueError naming the line.
    """
    normalised: set[str] = set()
    for raw in requirements:
        if any(c in raw for c in "\r\n\x00"):
            raise ValueError(f"requirement {raw!r}: must be a single line")
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise ValueError(f"requirement {raw!r}: pip options are not allowed")
        match = _NAME.match(line)
        if match is None or match.group(1).lower().endswith(_ARCHIVE_SUFFIXES):
            raise ValueError(f"requirement {raw!r}: not a package name (local paths are refused)")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        extras = match.group(2) or ""
        if extras:
            parts = sorted({e.strip().lower() for e in extras[1:-1].split(",") if e.strip()})
            extras = f"[{','.join(parts)}]"
        spec, _, marker = line[match.end() :].partition(";")
        spec = spec.strip()
        if spec.startswith("@"):
            url = spec[1:].strip()
            if not re.match(r"^(?:git\+)?https?://\S+$", url):
                raise ValueError(f"requirement {raw!r}: only http(s) URLs may follow '@'")
            spec = f" @ {url}"
        elif spec and not all(_SPECIFIER.match(part) for part in spec.split(",")):
            raise ValueError(f"requirement {raw!r}: not a version specifier")
        else:
            spec = re.sub(r"\s+", "", spec)
        marker = " ".join(marker.split())
        normalised.add(f"{name}{extras}{spec}" + (f" ; {marker}" if marker else ""))
    return sorted(normalised)


def revision_image_tag(base_image_id: str, requirements: Iterable[str]) -> str:
    """The cache tag of `requirements` installed on `base_image_id` (an image id, not a tag)."""
    lines = normalise_requirements(requirements)
    digest = hashlib.sha256("\n".join([base_image_id, *lines]).encode()).hexdigest()
    return f"{REVISION_REPOSITORY}:{digest[:16]}"


def ensure_revision_image(
    client: docker.DockerClient,
    base_image: str,
    requirements: list[str],
    on_progress: Progress | None = None,
    *,
    network_mode: str | None = None,
    ca_bundle: Path | None = None,
    lock_dir: Path | None = None,
) -> str:
    """The tag of `base_image` with `requirements` pip-installed, built once per content.

    Empty requirements return `base_image` itself. `network_mode` is the build's network
    (`"host"` where the default bridge cannot reach the package index). pip in the build
    trusts `ca_bundle`, by default this host's CA bundle, so a TLS-intercepting proxy the
    host trusts works in builds too; the bundle is not part of the cache key.
    """
    lines = normalise_requirements(requirements)
    if not lines:
        return base_image
    try:
        base_id = client.images.get(base_image).id
    except docker.errors.ImageNotFound as exc:
        raise ImageBuildError(
            f"base image {base_image!r} is not in the local engine; "
            "build it first (ensure_runner_image for the default runner image)"
        ) from exc
    tag = revision_image_tag(base_id, lines)
    if runner_image_exists(client, tag):
        return tag
    with host_lock(tag, lock_dir):
        if not runner_image_exists(client, tag):
            bundle = ca_bundle or _host_ca_bundle()
            _build_revision_image(client, base_id, lines, tag, on_progress, network_mode, bundle)
    return tag


def _host_ca_bundle() -> Path | None:
    cafile = ssl.get_default_verify_paths().cafile
    return Path(cafile) if cafile and Path(cafile).is_file() else None


def _build_revision_image(
    client: docker.DockerClient,
    base_id: str,
    lines: list[str],
    tag: str,
    on_progress: Progress | None,
    network_mode: str | None,
    ca_bundle: Path | None,
) -> None:
    progress = on_progress or _ignore
    files = {"requirements.txt": ("\n".join(lines) + "\n").encode()}
    cert = ""
    if ca_bundle is not None:
        files["ca-bundle.crt"] = ca_bundle.read_bytes()
        cert = " --cert /tmp/ferry-build/ca-bundle.crt"
    files["Dockerfile"] = "\n".join(
        [
            f"FROM {base_id}",
            "USER root",
            f"COPY {' '.join(sorted(files))} /tmp/ferry-build/",
            "RUN python3 -m pip install --no-cache-dir --break-system-packages"
            " --root-user-action=ignore --disable-pip-version-check --progress-bar off"
            f" --no-warn-script-location{cert} -r /tmp/ferry-build/requirements.txt"
            " && rm -rf /tmp/ferry-build",
            "USER 1000:1000",
            "",
        ]
    ).encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)

    started = time.monotonic()
    progress(f"building {tag} with {len(lines)} requirement(s) on {base_id[:19]}")
    tail: deque[str] = deque(maxlen=30)
    layers: list[str] = []  # made by this build, not taken from the cache
    previous = ""
    try:
        for event in client.api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            network_mode=network_mode,
            labels={"ferry.revision": "1", "ferry.revision.base": base_id},
            timeout=600,  # per read: pip may download a large wheel silently
        ):
            for line in _ANSI.sub("", str(event.get("stream", ""))).splitlines():
                if not line.strip():
                    continue
                progress(f"build: {line.rstrip()}")
                layer = _NEW_LAYER.match(line)
                if layer and "Using cache" not in previous and "FROM " not in previous:
                    layers.append(layer.group(1))
                elif not _BUILDER_CHATTER.match(line):
                    tail.append(line.rstrip())
                previous = line
            if "error" in event:
                tail.append(_ANSI.sub("", str(event["error"])).rstrip())
                raise ImageBuildError(f"building {tag} failed", tail)
    except docker.errors.APIError as exc:
        _remove_layers(client, layers, base_id)
        raise ImageBuildError(f"building {tag} failed: {exc}", tail) from exc
    except ImageBuildError:
        _remove_layers(client, layers, base_id)
        raise
    progress(f"built {tag} in {time.monotonic() - started:.0f}s")


def _remove_layers(client: docker.DockerClient, layers: list[str], base_id: str) -> None:
    """Drop the untagged layers a failed build left, so failures do not pile up images."""
    for layer in reversed(layers):
        if base_id.removeprefix("sha256:").startswith(layer):
            continue
        with contextlib.suppress(docker.errors.APIError):
            if not client.images.get(layer).tags:
                client.images.remove(layer, noprune=False)


def main(argv: list[str] | None = None) -> None:
    """`python -m worker.images`: build the runner image offline (replacing an existing tag)."""
    parser = argparse.ArgumentParser(prog="python -m worker.images", description=main.__doc__)
    parser.add_argument("--tag", default=RUNNER_TAG)
    parser.add_argument("--mirror", help="Debian mirror (default: this machine's apt sources)")
    parser.add_argument("--suite", default=DEBIAN_SUITE)
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing when the engine has --tag"
    )
    args = parser.parse_args(argv)
    client = docker.from_env()
    try:
        if args.if_missing:
            image_id = ensure_runner_image(client, args.tag, print, mirror=args.mirror)
        else:
            with host_lock(args.tag):
                image_id = build_runner_image(
                    args.tag, args.mirror, print, client=client, suite=args.suite
                )
    except ImageBuildError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(image_id)


if __name__ == "__main__":
    main()
