"""`ferry pipelines` and `ferry pipeline-executions` against a real API server, with a worker
running the nodes as local processes."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml
from typer.testing import CliRunner

from ferry.cli import app
from tests.conftest import echo_archive
from tests.engine_helpers import running_worker

WORDS_MANIFEST = {
    "name": "words",
    "modules": [
        {
            "name": "main",
            "entry_point": "main.py",
            "functions": [
                {
                    "name": "split",
                    "inputs": [{"name": "text", "type": "string"}],
                    "outputs": [{"name": "words", "type": "list[string]"}],
                },
                {
                    "name": "shout",
                    "inputs": [
                        {"name": "word", "type": "string"},
                        {"name": "suffix", "type": "string", "default": ""},
                    ],
                    "outputs": [{"name": "word", "type": "string"}],
                },
                {
                    "name": "join",
                    "inputs": [
                        {"name": "words", "type": "list[string]"},
                        {"name": "sep", "type": "string", "default": " "},
                    ],
                    "outputs": [{"name": "text", "type": "string"}],
                },
                {
                    "name": "flaky",
                    "inputs": [
                        {"name": "text", "type": "string"},
                        {"name": "marker", "type": "string"},
                    ],
                    "outputs": [{"name": "text", "type": "string"}],
                },
                {
                    "name": "nap",
                    "inputs": [{"name": "seconds", "type": "number"}],
                    "outputs": [],
                },
            ],
        }
    ],
}

WORDS_CODE = """
import os
import time


def split(text):
    print("splitting", text, flush=True)
    return text.split()


def shout(word, suffix=""):
    print("shouting", word, flush=True)
    return word.upper() + suffix


def join(words, sep=" "):
    return sep.join(words)


def flaky(text, marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("not this time")
    return text


def nap(seconds):
    time.sleep(seconds)
"""

SHOUT = {
    "name": "shout",
    "description": "split a text, shout each word, join them again",
    "variables": [{"name": "suffix", "type": "json", "default": "!"}],
    "nodes": [
        {"id": "split", "type": "function", "service": "words", "function": "split"},
        {
            "id": "shout",
            "type": "function",
            "service": "words",
            "function": "shout",
            "input": {"suffix": {"variable": "suffix"}},
        },
        {"id": "gather", "type": "merge"},
        {"id": "join", "type": "function", "service": "words", "function": "join"},
    ],
    "connections": [
        {"source": {"node": "split", "port": "words"}, "target": {"node": "shout", "port": "word"}},
        {
            "source": {"node": "shout", "port": "word"},
            "target": {"node": "gather", "port": "words"},
        },
        {
            "source": {"node": "gather", "port": "words"},
            "target": {"node": "join", "port": "words"},
        },
    ],
}


def _invoke(api, *args: str):
    env = {"FERRY_URL": str(api.client.make_url("")), "FERRY_TOKEN": api.token, "COLUMNS": "200"}
    return asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def _cli(api, *args: str, code: int = 0):
    result = await asyncio.wait_for(_invoke(api, *args), 90)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture
async def words(api, project) -> dict:
    status, package = await api.upload(project["id"], echo_archive(WORDS_MANIFEST, WORDS_CODE))
    assert status == 201, package
    status, service = await api.post(
        "/api/v1/services",
        # One attempt: a function that raises fails its node at once.
        {"project": project["id"], "name": "words", "package": package["id"], "max_attempts": 1},
    )
    assert status == 201, service
    return service


def _write(tmp_path, name: str, body: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return str(path)


async def _create(api, project, tmp_path, body: dict) -> str:
    path = _write(tmp_path, f"{body['name']}.yaml", body)
    created = await _cli(api, "pipelines", "create", "-f", path, "--project", project["id"])
    return created.stdout.strip()


async def test_define_list_get_update_install_delete(api, project, words, tmp_path):
    pipeline_id = await _create(api, project, tmp_path, SHOUT)
    status, stored = await api.get(f"/api/v1/pipelines/{pipeline_id}")
    assert status == 200, stored
    assert stored["name"] == "shout" and stored["version"] == 1 and not stored["installed"]
    assert {n["service"] for n in stored["nodes"] if n["type"] == "function"} == {words["id"]}
    assert [c["fanout"] for c in stored["connections"]] == [True, False, False]

    listed = await _cli(api, "pipelines", "list", "--project", project["id"])
    assert pipeline_id in listed.stdout and "shout" in listed.stdout

    shown = await _cli(api, "pipelines", "get", "shout")
    rows = {line.split("│")[1].strip(): line for line in shown.stdout.splitlines() if "│" in line}
    assert "words" in rows["split"] and "start" in rows["split"]
    assert "merge" in rows["gather"]
    assert "sink" in rows["join"]
    assert "split.words" in rows["split.words"] and "shout.word" in rows["split.words"]
    assert "yes" in rows["split.words"]  # fan-out
    by_id = await _cli(api, "pipelines", "get", pipeline_id, "--json")
    assert json.loads(by_id.stdout)["id"] == pipeline_id

    changed = {**SHOUT, "settings": {"fanout_cap": 5}}
    await _cli(api, "pipelines", "update", "shout", "-f", _write(tmp_path, "v2.yaml", changed))
    status, stored = await api.get(f"/api/v1/pipelines/{pipeline_id}")
    assert stored["version"] == 2 and stored["settings"]["fanout_cap"] == 5
    first = await _cli(api, "pipelines", "get", "shout", "--version", "1", "--json")
    assert json.loads(first.stdout)["settings"]["fanout_cap"] != 5

    await _cli(api, "pipelines", "install", "shout")
    status, stored = await api.get(f"/api/v1/pipelines/{pipeline_id}")
    assert stored["installed"] is True
    await _cli(api, "pipelines", "uninstall", pipeline_id)
    status, stored = await api.get(f"/api/v1/pipelines/{pipeline_id}")
    assert stored["installed"] is False

    await _cli(api, "pipelines", "delete", "shout")
    status, _ = await api.get(f"/api/v1/pipelines/{pipeline_id}")
    assert status == 404
    missing = await _cli(api, "pipelines", "get", "shout", code=1)
    assert "no pipeline named shout" in missing.stderr


async def test_a_trigger_runs_a_pipeline(api, project, words, tmp_path):
    pipeline_id = await _create(api, project, tmp_path, SHOUT)
    made = await _cli(
        api, "triggers", "create", "nightly", "--project", project["id"], "--pipeline", "shout",
        "--cron", "0 3 * * *", "--input", '{"text": "good night"}', "--inactive",
    )  # fmt: skip
    trigger = json.loads(made.stdout)
    assert trigger["operation"] == {"type": "pipeline", "pipeline": pipeline_id}

    await _cli(api, "pipelines", "install", "shout")
    status, trigger = await api.get(f"/api/v1/triggers/{trigger['id']}")
    assert trigger["active"] is True
    await _cli(api, "pipelines", "uninstall", "shout")
    status, trigger = await api.get(f"/api/v1/triggers/{trigger['id']}")
    assert trigger["active"] is False
    await _cli(api, "triggers", "delete", trigger["id"])
    both = await _cli(
        api, "triggers", "create", "x", "--project", project["id"], "--pipeline", "shout",
        "--service", "words", "--function", "split", "--cron", "* * * * *", code=2,
    )  # fmt: skip
    assert "--pipeline" in both.stderr


async def test_bad_definitions_name_the_field(api, project, words, tmp_path):
    wrong = json.loads(json.dumps(SHOUT))
    wrong["nodes"][1]["function"] = "whisper"
    path = _write(tmp_path, "wrong.yaml", wrong)
    refused = await _cli(api, "pipelines", "create", "-f", path, "--project", project["id"], code=1)
    assert "error 422" in refused.stderr and "nodes[1].function" in refused.stderr
    status, page = await api.get(f"/api/v1/pipelines?project={project['id']}")
    assert page["items"] == []

    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("nodes: [unclosed")
    broken = await _cli(api, "pipelines", "create", "-f", str(not_yaml), code=2)
    assert "neither YAML nor JSON" in broken.stderr
    absent = await _cli(api, "pipelines", "create", "-f", str(tmp_path / "absent.yaml"), code=2)
    assert "cannot read" in absent.stderr

    for option in (["--input", "{not json"], ["--input", "[1]"], ["--var", "novalue"]):
        bad = await _cli(api, "pipelines", "execute", "shout", *option, code=2)
        assert option[0] in bad.stderr
    resume = await _cli(api, "pipeline-executions", "resume", "x", code=2)
    assert "--from-failed" in resume.stderr


async def test_execute_follow_logs_statistics(api, project, words, tmp_path, settings, pool, redis):
    pipeline_id = await _create(api, project, tmp_path, SHOUT)
    not_installed = await _cli(api, "pipelines", "execute", "shout", code=1)
    assert "error 409" in not_installed.stderr
    await _cli(api, "pipelines", "install", "shout")
    (tmp_path / "input.json").write_text(json.dumps({"text": "hello pipelines"}))

    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        followed = await _cli(
            api,
            "pipelines",
            "execute",
            "shout",
            "--input",
            f"@{tmp_path / 'input.json'}",
            "--var",
            'suffix="?"',
            "--follow",
        )
        assert json.loads(followed.stdout) == {"join": {"text": "HELLO? PIPELINES?"}}
        table = {
            line.split("│")[1].strip(): line for line in followed.stderr.splitlines() if "│" in line
        }
        assert "success" in table["join"] and "2 success" in table["shout"]

        waited = await _cli(
            api, "pipelines", "execute", "shout", "--input", '{"text": "a b c"}', "--wait"
        )
        assert json.loads(waited.stdout) == {"join": {"text": "A! B! C!"}}

    status, page = await api.get(f"/api/v1/pipeline-executions?pipeline={pipeline_id}")
    assert [run["status"] for run in page["items"]] == ["success", "success"]
    run_id = next(r["id"] for r in page["items"] if r["variables"].get("suffix") == "?")

    listed = await _cli(api, "pipeline-executions", "list", "--pipeline", "shout")
    assert run_id in listed.stdout
    shown = await _cli(api, "pipeline-executions", "get", run_id)
    assert "HELLO? PIPELINES?" in shown.stdout and "gather" in shown.stdout

    logged = await _cli(api, "pipeline-executions", "logs", run_id)
    lines = logged.stdout.splitlines()
    assert any(line.startswith("[split ") and "splitting hello pipelines" in line for line in lines)
    shouted = sorted(line.split("] ", 1)[1] for line in lines if line.startswith("[shout "))
    assert shouted == ["shouting hello", "shouting pipelines"]
    followed_log = await _cli(api, "pipeline-executions", "logs", run_id, "-f")
    assert sorted(followed_log.stdout.splitlines()) == sorted(lines)

    stats = await _cli(api, "pipelines", "statistics", "shout")
    assert "2 success" in stats.stdout
    rows = {line.split("│")[1].strip(): line for line in stats.stdout.splitlines() if "│" in line}
    assert "5 success" in rows["shout"] and "2 success" in rows["join"]


async def test_failure_resume_and_terminate(api, project, words, tmp_path, settings, pool, redis):
    marker = tmp_path / "marker"
    fragile = {
        "name": "fragile",
        "nodes": [
            {"id": "first", "type": "function", "service": "words", "function": "shout"},
            {
                "id": "second",
                "type": "function",
                "service": "words",
                "function": "flaky",
                "input": {"marker": str(marker)},
            },
        ],
        "connections": [
            {
                "source": {"node": "first", "port": "word"},
                "target": {"node": "second", "port": "text"},
            }
        ],
    }
    sleepy = {
        "name": "sleepy",
        "nodes": [
            {
                "id": "nap",
                "type": "function",
                "service": "words",
                "function": "nap",
                "input": {"seconds": 60.0},
            }
        ],
    }
    capped = {**SHOUT, "name": "capped", "settings": {"fanout_cap": 1}}
    for body in (fragile, sleepy, capped):
        await _create(api, project, tmp_path, body)
        await _cli(api, "pipelines", "install", body["name"])

    async with running_worker(settings, pool, redis, runtime="process", worker_id="w"):
        failed = await _cli(
            api, "pipelines", "execute", "fragile", "--input", '{"word": "hi"}', "--wait", code=1
        )
        assert "failed at node second: RuntimeError: not this time" in failed.stderr
        status, page = await api.get("/api/v1/pipeline-executions?status=failed")
        (run,) = page["items"]
        assert run["error"]["node"] == "second"
        shown = await _cli(api, "pipeline-executions", "get", run["id"])
        assert "failed at node second: RuntimeError: not this time" in shown.stdout

        resumed = await _cli(
            api, "pipeline-executions", "resume", run["id"], "--from-failed", "--follow"
        )
        assert json.loads(resumed.stdout) == {"second": {"text": "HI"}}
        assert "success" in resumed.stderr
        status, run = await api.get(f"/api/v1/pipeline-executions/{run['id']}")
        first = next(n for n in run["nodes"] if n["node"] == "first")
        assert first["executions"]["success"] == 1  # its output was reused, not recomputed

        started = await _cli(api, "pipelines", "execute", "sleepy")
        run_id = started.stdout.strip()
        await _cli(api, "pipeline-executions", "terminate", run_id)
        status, run = await api.get(f"/api/v1/pipeline-executions/{run_id}/wait?timeout=60")
        assert run["status"] == "terminated"
        shown = await _cli(api, "pipeline-executions", "get", run_id)
        assert "terminated" in shown.stdout

        over = await _cli(
            api, "pipelines", "execute", "capped", "--input", '{"text": "two words"}', "--follow",
            code=1,
        )  # fmt: skip
        assert "failed at node shout: fan-out of 2 elements" in over.stderr
        assert "exceeds fanout_cap 1" in over.stderr
        wrong = await _cli(api, "pipelines", "execute", "capped", "--input", '{"text": 5}', code=1)
        assert "error 422" in wrong.stderr and "input.text" in wrong.stderr
