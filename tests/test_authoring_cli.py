"""`ferry init`, `deploy`, `run`, `logs` and `dev` against a real API server and worker."""

from __future__ import annotations

import asyncio
import io
import json
import zipfile

from typer.testing import CliRunner

from ferry.cli import app
from tests.engine_helpers import running_worker

FAILING = """

def boom(why):
    raise RuntimeError(f"boom: {why}")
"""
BOOM_MANIFEST = """
      - name: boom
        inputs: [{name: why, type: string}]
"""


def _invoke(api, tmp_path, *args: str, url: str | None = None):
    env = {
        "FERRY_URL": url or str(api.client.make_url("")),
        "FERRY_TOKEN": api.token,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "COLUMNS": "200",
    }
    return asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def _ok(api, tmp_path, *args: str):
    result = await asyncio.wait_for(_invoke(api, tmp_path, *args), 90)
    assert result.exit_code == 0, (args, result.output)
    return result


async def test_init_deploy_run_logs_redeploy(api, tmp_path, settings, pool, redis):
    folder = tmp_path / "hello"
    await _ok(api, tmp_path, "init", str(folder))
    assert {p.name for p in folder.iterdir()} == {"ferry.yaml", "main.py", ".ferryignore"}
    (folder / "main.py").write_text((folder / "main.py").read_text() + "\n# edited\n")
    again = await _ok(api, tmp_path, "init", str(folder))
    assert "kept ferry.yaml, main.py, .ferryignore" in again.output
    assert (folder / "main.py").read_text().endswith("# edited\n")
    (folder / ".gitignore").write_text("data/\n")
    (folder / "data").mkdir()
    (folder / "data" / "big.bin").write_bytes(b"x" * 1000)
    (folder / "notes.log").write_text("ignored by .ferryignore\n")

    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        first = await _ok(api, tmp_path, "deploy", str(folder), "--project", "demo")
        assert "revision 1 uploaded" in first.output and "service hello created" in first.output
        assert "hello is ready" in first.output

        same = await _ok(api, tmp_path, "deploy", str(folder), "--project", "demo")
        assert "unchanged" in same.output and "uploaded" not in same.output
        status, page = await api.get("/api/v1/packages", params={"name": "hello"})
        assert [p["latest_revision"] for p in page["items"]] == [1]

        ran = await _ok(api, tmp_path, "run", "hello", "greet", "-i", "who=ferry", "-i", "times=2")
        assert json.loads(ran.stdout) == {"greeting": "hello ferry"}

        status, executions = await api.get("/api/v1/executions")
        execution_id = executions["items"][0]["id"]
        logged = await _ok(api, tmp_path, "logs", execution_id, "-f")
        assert logged.stdout.splitlines()[:2] == ["hello ferry (1/2)", "hello ferry (2/2)"]

        with_logs = await _ok(
            api, tmp_path, "run", "hello", "greet", "--input", '{"who": "you"}', "--logs"
        )
        assert "hello you (1/1)" in with_logs.stderr
        assert json.loads(with_logs.stdout) == {"greeting": "hello you"}

        bad = await _invoke(api, tmp_path, "run", "hello", "greet", "-i", "who=5")
        assert bad.exit_code == 1 and "input.who" in bad.output

        missing = await _invoke(api, tmp_path, "run", "nope", "greet")
        assert missing.exit_code == 1 and "no service named 'nope'" in missing.output

        # A second function: a new revision, the service rolled over to it.
        (folder / "main.py").write_text((folder / "main.py").read_text() + FAILING)
        manifest = (folder / "ferry.yaml").read_text()
        marker = "          - {name: greeting, type: string}\n"
        (folder / "ferry.yaml").write_text(manifest.replace(marker, marker + BOOM_MANIFEST))
        second = await _ok(api, tmp_path, "deploy", str(folder), "--project", "demo")
        assert "revision 2 uploaded" in second.output and "service hello updated" in second.output
        # Done means rolled out: no replica of the replaced code still takes executions.
        status, services = await api.get("/api/v1/services", params={"name": "hello"})
        service = services["items"][0]
        status, report = await api.get(f"/api/v1/services/{service['id']}/status")
        taking = [r for r in report["replicas"] if r["status"] in ("starting", "ready")]
        assert taking and all(r["generation"] == service["generation"] for r in taking), report

        failed = await _invoke(api, tmp_path, "run", "hello", "boom", "-i", "why=testing")
        assert failed.exit_code == 1
        assert "execution failed (exception)" in failed.output
        assert "boom: testing" in failed.output

        queued = await _ok(api, tmp_path, "run", "hello", "greet", "-i", "who=later", "--no-wait")
        execution_id = queued.stdout.strip()
        status, body = await api.get(f"/api/v1/executions/{execution_id}/wait?timeout=30")
        assert body["status"] == "success" and body["output"] == {"greeting": "hello later"}

    # What was uploaded: neither the .gitignore'd folder nor the .ferryignore'd log.
    package_id = page["items"][0]["id"]
    response = await api.client.get(
        f"/api/v1/packages/{package_id}/codebase",
        headers={"Authorization": f"Bearer {api.token}"},
    )
    names = zipfile.ZipFile(io.BytesIO(await response.read())).namelist()
    assert sorted(names) == [".ferryignore", ".gitignore", "ferry.yaml", "main.py"]


async def test_deploy_names_manifest_problems_before_uploading(api, tmp_path):
    folder = tmp_path / "broken"
    await _ok(api, tmp_path, "init", str(folder))
    text = (folder / "ferry.yaml").read_text()
    (folder / "ferry.yaml").write_text(text.replace("entry_point: main.py", "entry_pont: main.py"))
    result = await _invoke(api, tmp_path, "deploy", str(folder))
    assert result.exit_code == 2
    assert "manifest.modules[0].entry_pont" in result.output
    assert "did you mean 'entry_point'" in result.output

    (folder / "ferry.yaml").write_text(text.replace("entry_point: main.py", "entry_point: app.py"))
    result = await _invoke(api, tmp_path, "deploy", str(folder))
    assert result.exit_code == 2 and "manifest.modules[0].entry_point" in result.output

    (folder / "ferry.yaml").write_text(text.replace("max_replicas: 2", "max_replicaz: 2"))
    result = await _invoke(api, tmp_path, "deploy", str(folder))
    assert result.exit_code == 2, result.output
    assert "manifest.service.runtime.max_replicaz" in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    result = await _invoke(api, tmp_path, "deploy", str(empty))
    assert result.exit_code == 2 and "no ferry.yaml" in result.output

    status, page = await api.get("/api/v1/packages")
    assert page["items"] == []


async def test_deploy_refuses_an_archive_over_the_limits(api, tmp_path, settings):
    folder = tmp_path / "heavy"
    await _ok(api, tmp_path, "init", str(folder))
    limit = settings.max_archive_files
    (folder / "many").mkdir()
    for index in range(limit + 1):
        (folder / "many" / f"{index}.txt").write_text("x")
    result = await _invoke(api, tmp_path, "deploy", str(folder))
    assert result.exit_code == 2, result.output
    assert f"limit of {limit}" in result.output
    status, page = await api.get("/api/v1/packages")
    assert page["items"] == []


async def test_unreachable_ferry_is_one_line(api, tmp_path):
    result = await _invoke(api, tmp_path, "run", "hello", "greet", url="http://127.0.0.1:9/")
    assert result.exit_code == 1
    assert "cannot reach http://127.0.0.1:9" in result.output
    assert "Traceback" not in result.output


async def test_dev_runs_without_a_server(tmp_path):
    folder = tmp_path / "local"
    runner = CliRunner()
    env = {"FERRY_URL": "http://127.0.0.1:9", "XDG_CONFIG_HOME": str(tmp_path)}
    made = runner.invoke(app, ["init", str(folder)], env=env)
    assert made.exit_code == 0, made.output
    result = await asyncio.to_thread(
        runner.invoke, app, ["dev", "greet", "--dir", str(folder), "-i", "who=dev"], env=env
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"greeting": "hello dev"}
    assert "hello dev (1/1)" in result.stderr

    bad = await asyncio.to_thread(
        runner.invoke, app, ["dev", "greet", "--dir", str(folder), "-i", "times=x"], env=env
    )
    assert bad.exit_code == 2
    assert "input.times" in bad.output and "input.who" in bad.output


async def test_resource_commands_by_name(api, tmp_path):
    folder = tmp_path / "hello"
    await _ok(api, tmp_path, "init", str(folder))
    await _ok(api, tmp_path, "deploy", str(folder), "--project", "demo", "--wait", "0")

    listed = await _ok(api, tmp_path, "projects", "list", "--json")
    assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["demo"]
    await _ok(api, tmp_path, "projects", "use", "demo")
    config = (tmp_path / "config" / "ferry" / "config.toml").read_text()
    assert 'project = "demo"' in config

    services = await _ok(api, tmp_path, "services", "list", "--json")
    [service] = [json.loads(line) for line in services.stdout.splitlines()]
    assert service["name"] == "hello" and service["runtime"]["min_replicas"] == 1
    got = await _ok(api, tmp_path, "services", "get", "hello")
    assert json.loads(got.stdout)["id"] == service["id"]
    table = await _ok(api, tmp_path, "services", "list")
    assert "hello" in table.stdout and service["id"] in table.stdout
    paused = await _ok(api, tmp_path, "services", "pause", "hello")
    assert "paused" in paused.output
    await _ok(api, tmp_path, "services", "resume", "hello")
    status = await _ok(api, tmp_path, "services", "status", "hello", "--json")
    assert json.loads(status.stdout)["desired_replicas"] >= 0

    packages = await _ok(api, tmp_path, "packages", "list")
    assert "hello" in packages.stdout
    revisions = await _ok(api, tmp_path, "packages", "revisions", "hello", "--json")
    assert [json.loads(line)["revision"] for line in revisions.stdout.splitlines()] == [1]
    target = tmp_path / "code.zip"
    await _ok(api, tmp_path, "packages", "download", "hello", "-o", str(target))
    assert "ferry.yaml" in zipfile.ZipFile(target).namelist()

    (tmp_path / "input.json").write_text('{"who": "file", "times": 2}')
    queued = await _ok(
        api,
        tmp_path,
        "run",
        "hello",
        "greet",
        "--input",
        f"@{tmp_path / 'input.json'}",
        "-i",
        "times=3",
        "--no-wait",
    )
    execution_id = queued.stdout.strip()
    status_code, body = await api.get(f"/api/v1/executions/{execution_id}")
    assert body["input"] == {"who": "file", "times": 3}
    filtered = await _ok(
        api, tmp_path, "executions", "list", "--service", "hello", "--function", "greet", "--json"
    )
    assert [json.loads(line)["id"] for line in filtered.stdout.splitlines()] == [execution_id]
    stopped = await _ok(api, tmp_path, "executions", "terminate", execution_id)
    assert "terminated" in stopped.output
    again = await _ok(api, tmp_path, "executions", "rerun", execution_id)
    status_code, body = await api.get(f"/api/v1/executions/{again.stdout.strip()}")
    assert body["rerun_of"] == execution_id

    await _ok(
        api,
        tmp_path,
        "triggers",
        "create",
        "every-hour",
        "--project",
        "demo",
        "--service",
        "hello",
        "--function",
        "greet",
        "--cron",
        "0 0 * * * *",
        "--input",
        '{"who": "cron"}',
    )
    paused = await _ok(api, tmp_path, "triggers", "pause", "every-hour")
    assert json.loads(paused.stdout)["active"] is False
    await _ok(api, tmp_path, "triggers", "resume", "every-hour")

    published = await _ok(api, tmp_path, "publish", "item", "created", "--id", "i-1")
    assert published.stdout.strip()

    created = await _ok(api, tmp_path, "tokens", "create", "ci", "--project", "demo")
    assert created.stdout.strip()
    tokens = await _ok(api, tmp_path, "tokens", "list", "--json")
    [ci] = [json.loads(line) for line in tokens.stdout.splitlines() if '"ci"' in line]
    await _ok(api, tmp_path, "tokens", "revoke", ci["id"])

    login = await _ok(api, tmp_path, "login", _url(api), "--token", api.token)
    assert "logged in" in login.output
    refused = await _invoke(api, tmp_path, "login", _url(api), "--token", "wrong")
    assert refused.exit_code == 1 and "401" in refused.output

    missing = await _invoke(api, tmp_path, "services", "get", "nope")
    assert missing.exit_code == 1 and "no service named 'nope'" in missing.output


def _url(api) -> str:
    return str(api.client.make_url(""))


async def test_deploy_says_why_replicas_cannot_start(api, tmp_path, settings, pool, redis):
    folder = tmp_path / "broken"
    await _ok(api, tmp_path, "init", str(folder))
    (folder / "main.py").write_text("raise RuntimeError('no config here')\n")
    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        result = await _invoke(api, tmp_path, "deploy", str(folder), "--wait", "60")
        assert result.exit_code == 1, result.output
        assert "a replica of broken failed to start" in result.output
        assert "no config here" in result.output
        status = await _invoke(api, tmp_path, "services", "status", "broken")
        assert status.exit_code == 1 and "no config here" in status.output


def test_help_shows_no_bool_type_beside_flags():
    import typer

    def paths(command, path: tuple[str, ...]):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from paths(sub, (*path, name))

    seen = list(paths(typer.main.get_command(app), ()))
    assert ("triggers", "list") in seen and ("pipelines", "execute") in seen
    for path in seen:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (path, result.output)
        assert "--help" in result.output, path
        assert "<bool>" not in result.output, (path, result.output)
