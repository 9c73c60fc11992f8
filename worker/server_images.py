"""The images Ferry's own processes and its servers run in, built without a registry.

`ferry image build --all` makes, each only when its content changed:

- the runner image (worker/images.py), the base of the next one;
- `ferry/ferry:latest`: Ferry itself (API, scheduler, worker, `ferry migrate`), the runner
  image plus Ferry and its dependencies installed from wheels made on this host with pip,
  so the build itself downloads nothing (deploy/images/ferry/offline.Dockerfile);
- `ferry/postgres:15`, `ferry/redis:7` and `ferry/proxy:latest`: one debootstrapped
  bookworm with Debian's postgresql-15, redis-server and haproxy packages, and thin images
  on it with their entrypoints (deploy/images/postgres, redis, proxy). The proxy spreads
  the API's one published port over the API processes.

An image carries the label `ferry.content`, a hash of everything it is made from (files,
base image id, wheels' requirements); a build whose hash the tagged image already has is
skipped, so a second run takes seconds. Dependency wheels are cached under
`~/.cache/ferry/wheels`, keyed by pyproject.toml. Everything blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from worker import images
from worker.images import ImageBuildError, Progress

REPO = Path(__file__).resolve().parent.parent
DEPLOY_IMAGES = REPO / "deploy" / "images"
SERVER_TAG = "ferry/ferry:latest"
POSTGRES_TAG = "ferry/postgres:15"
REDIS_TAG = "ferry/redis:7"
DATASTORE_REPOSITORY = "ferry/datastore-base"
DATASTORE_PACKAGES = ("postgresql-15", "redis-server", "haproxy", "ca-certificates", "util-linux")
PROXY_TAG = "ferry/proxy:latest"
CONTENT_LABEL = "ferry.content"
# Ferry's own sources: what goes into its wheel.
SOURCE_DIRS = ("core", "service", "worker", "scheduler", "ferry")
SOURCE_FILES = ("pyproject.toml", "README.md")
BUILD_TIMEOUT_S = 900


@dataclass
class Built:
    tag: str
    image_id: str
    seconds: float
    cached: bool


def wheel_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ferry" / "wheels"


def _digest(parts: Iterable[bytes | str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _tree_files(root: Path, base: Path) -> list[tuple[str, bytes]]:
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append((str(path.relative_to(base)), path.read_bytes()))
    return files


def source_files(repo: Path = REPO) -> list[tuple[str, bytes]]:
    """Ferry's source files as (relative path, bytes): the input of its wheel."""
    files = [(name, (repo / name).read_bytes()) for name in SOURCE_FILES]
    for directory in SOURCE_DIRS:
        files += _tree_files(repo / directory, repo)
    return files


def _labelled(client: docker.DockerClient, tag: str, content: str) -> str | None:
    """The id of `tag` when it carries `content`, else None."""
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    return image.id if labels.get(CONTENT_LABEL) == content else None


def docker_build(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    *,
    dockerfile: str,
    buildargs: dict[str, str],
    labels: dict[str, str],
    progress: Progress,
) -> str:
    """`docker build` the directory `context` (no registry: pull=False); returns the id.

    The image `tag` named before is removed when nothing else uses it, so rebuilds do not
    pile up untagged images."""
    previous = None
    with contextlib.suppress(docker.errors.ImageNotFound):
        previous = client.images.get(tag).id
    with tempfile.TemporaryFile() as archive:
        with tarfile.open(fileobj=archive, mode="w") as tar:
            tar.add(str(context), arcname=".")
        archive.seek(0)
        tail: deque[str] = deque(maxlen=30)
        try:
            for event in client.api.build(
                fileobj=archive,
                custom_context=True,
                dockerfile=dockerfile,
                tag=tag,
                buildargs=buildargs,
                labels=labels,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
                timeout=BUILD_TIMEOUT_S,
            ):
                for line in str(event.get("stream", "")).splitlines():
                    if line.strip():
                        tail.append(line.rstrip())
                        progress(f"{tag}: {line.rstrip()}")
                if "error" in event:
                    tail.append(str(event["error"]).rstrip())
                    raise ImageBuildError(f"building {tag} failed", tail)
        except docker.errors.APIError as exc:
            raise ImageBuildError(f"building {tag} failed: {exc}", tail) from exc
    image_id = str(client.images.get(tag).id)
    if previous and previous != image_id:
        with contextlib.suppress(docker.errors.APIError):  # in use by a container: kept
            client.images.remove(previous)
            progress(f"{tag}: removed the image it replaced ({previous[:19]})")
    return image_id


# --- Ferry itself -----------------------------------------------------------------------


def _server_requirements(repo: Path = REPO) -> list[str]:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    return [*project.get("dependencies", []), *project["optional-dependencies"]["server"]]


def _pip(args: list[str], progress: Progress, what: str) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    tail: deque[str] = deque(maxlen=30)
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if line.startswith(("Collecting", "Saved", "Building", "Successfully")):
                progress(f"{what}: {line.strip()}")
    if proc.returncode != 0:
        raise ImageBuildError(f"pip {' '.join(args[:1])} ({what}) exited {proc.returncode}", tail)


def image_python(client: docker.DockerClient, image_id: str) -> tuple[str, str]:
    """(Python version, glibc version) of `image_id`, asked of a throwaway container."""
    code = "import platform; print(platform.python_version(), platform.libc_ver()[1])"
    out = client.containers.run(image_id, ["python3", "-c", code], remove=True, network_mode="none")
    version, libc = out.decode().split()
    return version, libc


_MISSING = re.compile(r"No matching distribution found for ([^;\s]+)")


def _missing_in_image(
    client: docker.DockerClient, image_id: str, wheels: Path, requirements: list[str]
) -> str | None:
    """The first requirement the image's pip cannot satisfy from `wheels` alone, or None.

    pip evaluates environment markers against the Python it runs on, not the target one,
    so a download on the host can miss a dependency the image's Python needs
    (`async-timeout; python_full_version < "3.11.3"` on Debian's 3.11.2): ask the image.
    """
    command = [
        "python3", "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", "/wheels",
        "--ignore-installed", "--break-system-packages", "--disable-pip-version-check",
        "--quiet", *requirements,
    ]  # fmt: skip
    try:
        client.containers.run(
            image_id,
            command,
            remove=True,
            network_mode="none",
            user="root",
            volumes={str(wheels): {"bind": "/wheels", "mode": "ro"}},
            stderr=True,
        )
    except docker.errors.ContainerError as exc:
        text = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc)
        found = _MISSING.search(text)
        if found is None:
            raise ImageBuildError(
                "pip in the image cannot install the wheels", text.splitlines()[-20:]
            ) from exc
        return found.group(1)
    return None


def dependency_wheels(
    client: docker.DockerClient, image_id: str, progress: Progress, repo: Path = REPO
) -> Path:
    """Wheels of Ferry's server dependencies for the image's Python and glibc (not this
    host's), downloaded as binaries with pip on the host and cached by pyproject.toml."""
    requirements = _server_requirements(repo)
    version, libc = image_python(client, image_id)
    key = _digest([version, libc, *requirements])[:16]
    directory = wheel_cache_dir() / key
    if (directory / ".complete").exists():
        progress(f"dependency wheels cached in {directory}")
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=directory.parent))
    partial.chmod(0o755)
    target = [
        "--only-binary=:all:", "--dest", str(partial), "--python-version", version,
        "--implementation", "cp",
        *[arg for platform in _platforms(libc) for arg in ("--platform", platform)],
    ]  # fmt: skip
    try:
        _pip(["download", *target, *requirements], progress, "wheels")
        for _ in range(10):
            missing = _missing_in_image(client, image_id, partial, requirements)
            if missing is None:
                break
            progress(f"wheels: the image's Python also needs {missing}")
            _pip(["download", *target, missing], progress, "wheels")
        else:
            raise ImageBuildError("the image's Python keeps needing more wheels")
        (partial / ".complete").touch()
        shutil.rmtree(directory, ignore_errors=True)
        partial.rename(directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def _platforms(libc: str) -> list[str]:
    """Every manylinux tag a glibc `libc` (e.g. "2.36") runs: pip does not expand them."""
    major, minor = (int(part) for part in libc.split(".")[:2])
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def build_server_image(
    client: docker.DockerClient,
    progress: Progress,
    *,
    tag: str = SERVER_TAG,
    base_tag: str = images.RUNNER_TAG,
    mirror: str | None = None,
    repo: Path = REPO,
) -> Built:
    """`ferry/ferry:latest`: the runner image plus Ferry installed from local wheels."""
    started = time.monotonic()
    base_id = images.ensure_runner_image(client, base_tag, progress, mirror=mirror)
    folder = repo / "deploy" / "images" / "ferry"
    dockerfile = (folder / "offline.Dockerfile").read_bytes()
    content = _digest(
        [base_id, dockerfile, *_server_requirements(repo)]
        + [part for name, data in source_files(repo) for part in (name, data)]
    )
    existing = _labelled(client, tag, content)
    if existing:
        progress(f"{tag} is up to date ({existing[:19]})")
        return Built(tag, existing, time.monotonic() - started, True)
    with images.host_lock(tag):
        deps = dependency_wheels(client, base_id, progress, repo)
        with tempfile.TemporaryDirectory(prefix="ferry-image-") as tmp:
            context = Path(tmp)
            wheels = context / "wheels"
            wheels.mkdir()
            progress("building Ferry's wheel")
            _pip(["wheel", "--no-deps", "--wheel-dir", str(wheels), str(repo)], progress, "ferry")
            for wheel in deps.glob("*.whl"):
                if not wheel.name.startswith("ferry-"):
                    shutil.copy2(wheel, wheels / wheel.name)
            (context / "offline.Dockerfile").write_bytes(dockerfile)
            image_id = docker_build(
                client,
                context,
                tag,
                dockerfile="offline.Dockerfile",
                buildargs={"BASE": base_id},
                labels={CONTENT_LABEL: content},
                progress=progress,
            )
    return Built(tag, image_id, time.monotonic() - started, False)


# --- PostgreSQL and Redis ---------------------------------------------------------------

DATASTORE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    "LABEL ferry.image=datastore-base",
)


def build_datastore_base(
    client: docker.DockerClient,
    progress: Progress,
    *,
    mirror: str | None = None,
    suite: str = images.DEBIAN_SUITE,
) -> Built:
    """A debootstrapped Debian with postgresql-15, redis-server and haproxy, tagged by its inputs."""
    started = time.monotonic()
    content = _digest([suite, *DATASTORE_PACKAGES, *DATASTORE_CHANGES])
    tag = f"{DATASTORE_REPOSITORY}:{content[:16]}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        image = client.images.get(tag)
        progress(f"{tag} exists")
        return Built(tag, str(image.id), time.monotonic() - started, True)
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        raise ImageBuildError(
            "building the PostgreSQL and Redis images offline needs root and debootstrap "
            "(`sudo ferry image build --all`); with a registry, build deploy/images/postgres "
            "and deploy/images/redis instead"
        )
    mirror = mirror or images.default_mirror(suite)
    with images.host_lock(tag):
        workdir = Path(tempfile.mkdtemp(prefix="ferry-datastore-"))
        root = workdir / "root"
        try:
            progress(f"debootstrap {suite} with {', '.join(DATASTORE_PACKAGES)} from {mirror}")
            cache = wheel_cache_dir().parent / "debootstrap"  # the .debs, kept for rebuilds
            cache.mkdir(parents=True, exist_ok=True)
            images._debootstrap(root, suite, mirror, progress, DATASTORE_PACKAGES, cache)
            progress(f"debootstrap finished in {time.monotonic() - started:.0f}s")
            # The package's post-install made a cluster the image never uses: its entrypoint
            # initialises PGDATA (a volume) on first start instead.
            for leftover in ("var/lib/postgresql/15", "etc/postgresql/15"):
                shutil.rmtree(root / leftover, ignore_errors=True)
            images.prepare_rootfs(root)
            image_id = images.import_rootfs(client, root, tag, progress, DATASTORE_CHANGES)
        finally:
            images._unmount_below(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
    return Built(tag, image_id, time.monotonic() - started, False)


def build_datastore_image(
    client: docker.DockerClient, name: str, tag: str, base: Built, progress: Progress
) -> Built:
    """`ferry/postgres:15` or `ferry/redis:7`: deploy/images/<name>/ on the datastore base."""
    started = time.monotonic()
    folder = DEPLOY_IMAGES / name
    content = _digest(
        [base.image_id]
        + [part for rel, data in _tree_files(folder, folder) for part in (rel, data)]
    )
    existing = _labelled(client, tag, content)
    if existing:
        progress(f"{tag} is up to date ({existing[:19]})")
        return Built(tag, existing, time.monotonic() - started, True)
    image_id = docker_build(
        client,
        folder,
        tag,
        dockerfile="offline.Dockerfile",
        buildargs={"BASE": base.image_id},
        labels={CONTENT_LABEL: content},
        progress=progress,
    )
    return Built(tag, image_id, time.monotonic() - started, False)


def build_all(
    client: docker.DockerClient | None = None,
    progress: Progress | None = None,
    *,
    mirror: str | None = None,
) -> list[Built]:
    """Runner, Ferry, PostgreSQL and Redis images, each rebuilt only when its content changed."""
    client = client or docker.from_env(timeout=BUILD_TIMEOUT_S)
    say = progress or print
    # Ferry's image (pip and a docker build) and the datastore tree (debootstrap: mostly
    # the mirror's bandwidth and dpkg) do not wait on each other: build them side by side.
    with ThreadPoolExecutor(max_workers=2) as pool:
        server = pool.submit(build_server_image, client, say, mirror=mirror)
        base_future = pool.submit(
            build_datastore_base, docker.from_env(timeout=BUILD_TIMEOUT_S), say, mirror=mirror
        )
        built = [server.result()]
        base = base_future.result()
    built.append(build_datastore_image(client, "postgres", POSTGRES_TAG, base, say))
    built.append(build_datastore_image(client, "redis", REDIS_TAG, base, say))
    built.append(build_datastore_image(client, "proxy", PROXY_TAG, base, say))
    return built


def _short(line: str) -> str:
    return re.sub(r"\s+", " ", line)[:160]


def main(argv: list[str] | None = None) -> None:
    """`python -m worker.server_images`: build every image Ferry's deployment uses."""
    started = time.monotonic()
    try:
        built = build_all(progress=lambda line: print(_short(line), flush=True))
    except ImageBuildError as exc:
        raise SystemExit(f"error: {exc}") from None
    for item in built:
        state = "cached" if item.cached else "built"
        print(f"{item.tag}: {state} in {item.seconds:.0f}s ({item.image_id[:19]})")
    print(f"all images ready in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
