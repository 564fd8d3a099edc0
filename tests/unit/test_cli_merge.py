"""`loraplex adapters merge`: argument parsing, version lookup through the admin API, the merge
command it runs, and the registration it asks for. The admin API is an httpx MockTransport and
the tools-venv merge a fake runner (the real one runs in tests/e2e/test_merge.py)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.validate import digest_adapter
from server import cli_admin
from server.cli_merge import add_merge_command, parse_from, run_merge
from tests.synthetic import make_adapter, make_base


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loraplex")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default="http://gateway")
    adapters = sub.add_parser("adapters")
    add_merge_command(adapters.add_subparsers(dest="action", required=True), common)
    return parser.parse_args(["adapters", "merge", *argv])


class FakeAdmin:
    """The two admin routes merge uses, answering from a dict of adapter views."""

    def __init__(self, adapters: dict[str, dict[str, Any]]) -> None:
        self.adapters = adapters
        self.registered: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "GET" and path.startswith("/admin/v1/adapters/"):
            found = self.adapters.get(path.rsplit("/", 1)[1])
            if found is None:
                error = {"message": "no adapter", "code": "adapter_not_found"}
                return httpx.Response(404, json={"error": error})
            return httpx.Response(200, json=found)
        if request.method == "POST" and path == "/admin/v1/adapters":
            body = json.loads(request.content)
            self.registered.append(body)
            return httpx.Response(201, json={"name": body["name"], "version": 1})
        return httpx.Response(405)


class FakeRunner:
    """Stands in for the tools venv: copies the first input to --out, or fails as told."""

    def __init__(self, returncode: int = 0, stderr: str = "") -> None:
        self.calls: list[list[str]] = []
        self.returncode, self.stderr = returncode, stderr

    def __call__(self, cmd: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(cmd))
        if self.returncode == 0:
            first = Path(cmd[-2].rpartition(":")[0])
            shutil.copytree(first, cmd[cmd.index("--out") + 1])
        return subprocess.CompletedProcess(list(cmd), self.returncode, "{}", self.stderr)


def _view(name: str, path: Path, *, state: str = "ready") -> dict[str, Any]:
    version = {"version": 1, "state": state, "digest": digest_adapter(path), "source": str(path)}
    return {"name": name, "aliases": {"stable": 1}, "versions": [version]}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[FakeAdmin, Path]:
    base, digest = make_base(tmp_path / "base")
    a = make_adapter(tmp_path, "a", digest, fill=1)
    b = make_adapter(tmp_path, "b", digest, fill=2)
    return FakeAdmin({"a": _view("a", a), "b": _view("b", b)}), base


def _run(admin: FakeAdmin, argv: list[str], runner: FakeRunner) -> int:
    with httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(admin)) as client:
        return run_merge(_parse(argv), client, runner)


def test_merge_resolves_runs_and_registers(
    setup: tuple[FakeAdmin, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin, base = setup
    runner = FakeRunner()
    argv = ["mix", "--from", "a@1:0.7", "--from", "b@stable:0.3", "--alias", "canary"]
    argv += ["--base-config", str(base / "config.json"), "--merged-dir", str(tmp_path / "m")]
    assert _run(admin, argv, runner) == 0
    (cmd,) = runner.calls
    assert cmd[1:3] == ["-m", "adapters.tools.merge"]
    assert cmd[-2:] == [f"{tmp_path / 'a'}:0.7", f"{tmp_path / 'b'}:0.3"]
    i = cmd.index("--combination")
    assert cmd[i : i + 2] == ["--combination", "cat"]
    (body,) = admin.registered
    out = Path(cmd[cmd.index("--out") + 1])
    assert body["source"] == str(out)
    assert out.parent == tmp_path / "m"
    assert body["alias"] == "canary"
    assert body["metadata"]["merged_from"] == ["a@1", "b@1"]
    assert body["metadata"]["weights"] == [0.7, 0.3]
    assert body["metadata"]["combination"] == "cat"
    assert json.loads(capsys.readouterr().out) == {"name": "mix", "version": 1}
    # the same recipe again: the merged directory is reused, only the registration is repeated
    assert _run(admin, argv, runner) == 0
    assert len(runner.calls) == 1
    assert len(admin.registered) == 2


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (["a@1:1", "nope:1"], "404"),
        (["a@1:1", "b@canary:1"], "no alias 'canary'"),
        (["a@1:1", "b@7:1"], "no version 7"),
        (["a@1:1"], "at least two"),
    ],
)
def test_lookup_failures_run_nothing(
    setup: tuple[FakeAdmin, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sources: list[str],
    message: str,
) -> None:
    admin, base = setup
    runner = FakeRunner()
    argv = ["mix", "--base-config", str(base), "--merged-dir", str(tmp_path / "m")]
    for s in sources:
        argv += ["--from", s]
    assert _run(admin, argv, runner) in (1, 2)
    assert message in capsys.readouterr().err
    assert runner.calls == []
    assert admin.registered == []


def test_changed_files_and_unready_versions_are_refused(
    setup: tuple[FakeAdmin, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin, base = setup
    argv = ["mix", "--from", "a:1", "--from", "b:1", "--merged-dir", str(tmp_path / "m")]
    argv += ["--base-config", str(base)]
    (tmp_path / "b" / "adapter_config.json").write_text("{}")
    assert _run(admin, argv, FakeRunner()) == 1
    assert "no longer match" in capsys.readouterr().err
    admin.adapters["b"]["versions"][0]["state"] = "rejected"
    assert _run(admin, argv, FakeRunner()) == 1
    assert "is rejected" in capsys.readouterr().err
    assert admin.registered == []


def test_a_refused_merge_exits_2_and_registers_nothing(
    setup: tuple[FakeAdmin, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin, base = setup
    runner = FakeRunner(2, "merge refused: the cat result would have rank 24\n")
    argv = ["mix", "--from", "a:1", "--from", "b:1", "--merged-dir", str(tmp_path / "m")]
    argv += ["--base-config", str(base)]
    assert _run(admin, argv, runner) == 2
    assert "rank 24" in capsys.readouterr().err
    assert admin.registered == []


def test_from_syntax() -> None:
    assert parse_from("a:0.5") == ("a", "stable", 0.5)
    assert parse_from("a@3:-1") == ("a", "3", -1.0)
    assert parse_from("a@canary:2") == ("a", "canary", 2.0)
    for bad in ("a", "a@1", "a:x", "a:inf", "@1:1"):
        with pytest.raises(Exception, match="NAME"):
            parse_from(bad)


def test_admin_cli_dispatches_merge(
    setup: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Through `loraplex adapters merge` (cli_admin): a lookup failure stops before merging."""
    admin, _ = setup
    parser = argparse.ArgumentParser(prog="loraplex")
    cli_admin.add_commands(parser.add_subparsers(dest="command", required=True))
    argv = ["adapters", "merge", "mix", "--from", "a:1", "--from", "nope:1", "--admin-key", "k"]
    args = parser.parse_args(argv)
    assert cli_admin.run(args, transport=httpx.MockTransport(admin)) == 1
    assert "look up: 404 adapter_not_found" in capsys.readouterr().err
    assert admin.registered == []
