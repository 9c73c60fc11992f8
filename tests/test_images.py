"""Runner and revision images, against the real local Docker engine and PyPI."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from worker.images import (
    DEFAULT_MIRROR,
    RUNNER_TAG,
    ImageBuildError,
    default_mirror,
    ensure_revision_image,
    ensure_runner_image,
    host_lock,
    normalise_requirements,
    parse_apt_mirrors,
    revision_image_tag,
    runner_image_exists,
)

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm

Types: deb
URIs: http://mirror.example.org/debian/ http://second.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

ONE_LINE = """\
# the main archive
deb-src http://src.example.org/debian bookworm main
deb [arch=amd64 signed-by=/etc/k.gpg] https://mirror.example.org/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main
"""


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    try:
        engine = docker.from_env()
        engine.ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"no Docker engine answers: {exc}")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def runner_id(client: docker.DockerClient) -> str:
    if not runner_image_exists(client, RUNNER_TAG) and (
        os.geteuid() != 0 or shutil.which("debootstrap") is None
    ):
        pytest.skip(f"{RUNNER_TAG} is missing and building it needs root and debootstrap")
    return ensure_runner_image(client, RUNNER_TAG, print)


# --- apt mirrors ------------------------------------------------------------------------


def test_mirror_from_deb822_sources_skips_security_and_source_entries() -> None:
    assert parse_apt_mirrors(DEB822) == [
        "http://mirror.example.org/debian",
        "http://second.example.org/debian",
    ]
    assert parse_apt_mirrors(DEB822, "bookworm-security") == [
        "http://deb.debian.org/debian-security"
    ]


def test_mirror_from_one_line_sources_list_ignores_options() -> None:
    assert parse_apt_mirrors(ONE_LINE) == ["https://mirror.example.org/debian"]
    assert parse_apt_mirrors("deb cdrom:[Debian]/ bookworm main\n") == []


def test_default_mirror_reads_apt_dir_and_falls_back(tmp_path: Path) -> None:
    assert default_mirror(apt_dir=tmp_path) == DEFAULT_MIRROR
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(ONE_LINE)
    assert default_mirror(apt_dir=tmp_path) == "https://mirror.example.org/debian"
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    assert default_mirror(apt_dir=tmp_path) == "http://mirror.example.org/debian"


# --- requirements -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "-e .",
        "--index-url x",
        "-r other.txt",
        "./src",
        "/srv/wheels/six-1.16.0-py2.py3-none-any.whl",
        "six-1.16.0-py2.py3-none-any.whl",
        "six==1.16.0 --hash=sha256:00",
        "six\nrequests",
        "pkg @ file:///srv/pkg",
        "pkg/sub",
        "six foo",
    ],
)
def test_requirement_validation_names_the_offending_line(line: str) -> None:
    with pytest.raises(ValueError, match="requirement") as info:
        normalise_requirements(["six==1.16.0", line])
    assert repr(line) in str(info.value)


def test_requirements_are_normalised_sorted_and_deduplicated() -> None:
    assert normalise_requirements(
        [
            "  Six == 1.16.0  ",
            "six==1.16.0",
            "# a comment",
            "",
            'Requests[Socks, security] >= 2.0 ;  python_version >= "3.8"',
            "my_pkg @ https://example.org/my_pkg-1.0.tar.gz",
        ]
    ) == [
        "my-pkg @ https://example.org/my_pkg-1.0.tar.gz",
        'requests[security,socks]>=2.0 ; python_version >= "3.8"',
        "six==1.16.0",
    ]


def test_revision_tag_depends_on_base_and_content_not_spelling() -> None:
    tag = revision_image_tag("sha256:aa", ["six==1.16.0", "attrs"])
    assert tag.startswith("ferry/revision:") and len(tag.split(":")[1]) == 16
    assert revision_image_tag("sha256:aa", ["attrs", " Six==1.16.0"]) == tag
    assert revision_image_tag("sha256:bb", ["six==1.16.0", "attrs"]) != tag
    assert revision_image_tag("sha256:aa", ["six==1.16.0"]) != tag


def test_host_lock_serialises_holders(tmp_path: Path) -> None:
    order: list[str] = []
    held = threading.Event()

    def first() -> None:
        with host_lock("ferry/x:1", tmp_path):
            held.set()
            time.sleep(0.2)
            order.append("first")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(5)
    with host_lock("ferry/x:1", tmp_path):
        order.append("second")
    thread.join()
    assert order == ["first", "second"]


# --- the runner image -------------------------------------------------------------------

PROBE = (
    "import os, sys; print(sys.version_info[:2], os.getuid(), os.getgid(), os.getcwd(),"
    " os.path.isdir('/ferry/code'), os.access('/ferry/code', os.W_OK),"
    " os.environ.get('PYTHONUNBUFFERED'))"
)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)  # a build from scratch takes a minute or two of debootstrap
def test_runner_image_runs_python_as_ferry(client: docker.DockerClient, runner_id: str) -> None:
    image = client.images.get(RUNNER_TAG)
    assert image.id == runner_id
    assert image.labels["ferry.runner"] == "1"
    assert "ferry.runner.version" in image.labels
    assert "PYTHONUNBUFFERED=1" in image.attrs["Config"]["Env"]
    assert image.attrs["Config"]["User"] == "1000:1000"

    out = client.containers.run(RUNNER_TAG, ["python3", "-c", PROBE], remove=True)
    assert out.decode().strip() == "(3, 11) 1000 1000 /ferry/code True True 1"


@pytest.mark.docker
def test_ensure_runner_image_does_not_rebuild(client: docker.DockerClient, runner_id: str) -> None:
    progress: list[str] = []
    started = time.monotonic()
    assert ensure_runner_image(client, RUNNER_TAG, progress.append) == runner_id
    assert time.monotonic() - started < 20  # a build takes minutes
    assert progress == []
    assert client.images.get(RUNNER_TAG).id == runner_id


# --- revision images --------------------------------------------------------------------


@pytest.mark.docker
def test_empty_requirements_return_the_base(client: docker.DockerClient) -> None:
    assert ensure_revision_image(client, RUNNER_TAG, []) == RUNNER_TAG
    assert ensure_revision_image(client, RUNNER_TAG, ["# nothing", " "]) == RUNNER_TAG


@pytest.mark.docker
@pytest.mark.parametrize("line", ["-e .", "--index-url x"])
def test_revision_image_rejects_options(client: docker.DockerClient, line: str) -> None:
    with pytest.raises(ValueError, match=line):
        ensure_revision_image(client, RUNNER_TAG, [line])


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_revision_image_is_built_once_and_cached(
    client: docker.DockerClient, runner_id: str
) -> None:
    requirements = ["six==1.16.0"]
    tag = revision_image_tag(runner_id, requirements)
    if runner_image_exists(client, tag):
        client.images.remove(tag)

    # Two workers asking at once: one builds, the other waits on the lock and reuses it.
    results: dict[int, str] = {}
    progress: dict[int, list[str]] = {0: [], 1: []}

    def ask(n: int) -> None:
        results[n] = ensure_revision_image(client, RUNNER_TAG, requirements, progress[n].append)

    threads = [threading.Thread(target=ask, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: tag, 1: tag}
    builds = [n for n in (0, 1) if any(line.startswith("built ") for line in progress[n])]
    assert len(builds) == 1, progress

    image = client.images.get(tag)
    assert image.labels["ferry.revision.base"] == runner_id
    assert image.labels["ferry.runner"] == "1"
    out = client.containers.run(
        tag, ["python3", "-c", "import os, six; print(six.__version__, os.getuid())"], remove=True
    )
    assert out.decode().strip() == "1.16.0 1000"

    again: list[str] = []
    started = time.monotonic()
    assert ensure_revision_image(client, RUNNER_TAG, ["six == 1.16.0"], again.append) == tag
    assert time.monotonic() - started < 20  # a build takes minutes
    assert again == []
    assert client.images.get(tag).id == image.id


@pytest.mark.docker
@pytest.mark.slow
def test_revision_build_failure_carries_pip_output(
    client: docker.DockerClient, runner_id: str
) -> None:
    with pytest.raises(ImageBuildError) as info:
        ensure_revision_image(client, RUNNER_TAG, ["ferry-no-such-package-4b1d==0.0.1"])
    assert "No matching distribution found for ferry-no-such-package-4b1d" in str(info.value)
    assert any("ferry-no-such-package-4b1d" in line for line in info.value.output)
