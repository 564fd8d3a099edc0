"""`loraplex adapters|tenants|experiments|drift|audit`: each command sends the admin API request
it names."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.cli_admin import add_commands, run

CASES: list[tuple[list[str], str, str, Any]] = [
    (["adapters", "list"], "GET", "/admin/v1/adapters", None),
    (["adapters", "show", "medical"], "GET", "/admin/v1/adapters/medical", None),
    (
        ["adapters", "register", "medical", "/a/b", "--alias", "canary", "--meta", "tag=v2"],
        "POST",
        "/admin/v1/adapters",
        {"name": "medical", "source": "/a/b", "metadata": {"tag": "v2"}, "alias": "canary"},
    ),
    (
        ["adapters", "validate", "s3://b/k.tgz", "--base-digest", "sha256:x"],
        "POST",
        "/admin/v1/adapters/validate",
        {"source": "s3://b/k.tgz", "base_digest": "sha256:x"},
    ),
    (
        ["adapters", "promote", "medical", "3"],
        "PUT",
        "/admin/v1/adapters/medical/aliases/stable",
        {"version": 3},
    ),
    (
        ["adapters", "unalias", "medical", "canary"],
        "DELETE",
        "/admin/v1/adapters/medical/aliases/canary",
        None,
    ),
    (
        ["adapters", "pin", "medical", "2"],
        "POST",
        "/admin/v1/adapters/medical/versions/2/pin",
        None,
    ),
    (
        ["adapters", "unpin", "medical", "2"],
        "DELETE",
        "/admin/v1/adapters/medical/versions/2/pin",
        None,
    ),
    (
        ["adapters", "retire", "medical", "2"],
        "POST",
        "/admin/v1/adapters/medical/versions/2/retire",
        None,
    ),
    (
        ["adapters", "delete", "medical", "2"],
        "DELETE",
        "/admin/v1/adapters/medical/versions/2",
        None,
    ),
    (["adapters", "residency"], "GET", "/admin/v1/residency", None),
    (
        ["tenants", "create", "acme", "--adapters", "medical, legal", "--rpm", "60"],
        "POST",
        "/admin/v1/tenants",
        {
            "name": "acme",
            "adapters": ["medical", "legal"],
            "quotas": {"requests_per_minute": 60},
        },
    ),
    (
        ["tenants", "update", "acme", "--max-concurrent", "4", "--max-tokens", "256"],
        "PATCH",
        "/admin/v1/tenants/acme",
        {"quotas": {"max_concurrent": 4, "max_tokens": 256}},
    ),
    (
        ["tenants", "update", "acme", "--max-n", "2", "--max-best-of", "3", "--tpm", "9"],
        "PATCH",
        "/admin/v1/tenants/acme",
        {"quotas": {"tokens_per_minute": 9, "max_n": 2, "max_best_of": 3}},
    ),
    (
        ["tenants", "update", "acme", "--default", "legal"],
        "PATCH",
        "/admin/v1/tenants/acme",
        {"default": "legal"},
    ),
    (
        ["tenants", "rotate-key", "acme", "--drop-previous"],
        "POST",
        "/admin/v1/tenants/acme/rotate-key",
        {"keep_previous": False},
    ),
    (["tenants", "delete", "acme"], "DELETE", "/admin/v1/tenants/acme", None),
    (["audit", "--limit", "5", "--before", "9"], "GET", "/admin/v1/audit?limit=5&before=9", None),
    (["experiments", "list"], "GET", "/admin/v1/experiments", None),
    (["experiments", "show", "ab"], "GET", "/admin/v1/experiments/ab", None),
    (["experiments", "analysis", "ab"], "GET", "/admin/v1/experiments/ab/analysis", None),
    (["experiments", "pause", "ab"], "POST", "/admin/v1/experiments/ab/pause", {}),
    (["experiments", "resume", "ab"], "POST", "/admin/v1/experiments/ab/resume", {}),
    (["experiments", "abort", "ab"], "POST", "/admin/v1/experiments/ab/abort", {}),
    (["experiments", "delete", "ab"], "DELETE", "/admin/v1/experiments/ab", None),
    (
        ["experiments", "weights", "ab", "candidate=0.2", "other=0"],
        "POST",
        "/admin/v1/experiments/ab/weights",
        {"weights": {"candidate": 0.2, "other": 0.0}},
    ),
    (
        ["experiments", "promote", "ab", "--variant", "candidate"],
        "POST",
        "/admin/v1/experiments/ab/promote",
        {"variant": "candidate"},
    ),
    (
        ["experiments", "promote", "ab"],
        "POST",
        "/admin/v1/experiments/ab/promote",
        {"variant": None},
    ),
    (["drift", "show"], "GET", "/admin/v1/drift", None),
    (
        ["drift", "reference", "acme", "--reset"],
        "POST",
        "/admin/v1/drift/acme/reference",
        {"reset": True},
    ),
    (["drift", "reference", "acme"], "POST", "/admin/v1/drift/acme/reference", {"from": "current"}),
]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args([*argv, "--admin-key", "sk-admin"])


@pytest.mark.parametrize(("argv", "method", "path", "body"), CASES, ids=lambda c: str(c))
def test_command_sends_its_request(
    argv: list[str], method: str, path: str, body: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    args = parse(argv)
    assert run(args, transport=httpx.MockTransport(handler)) == 0
    [req] = seen
    assert req.method == method
    assert req.url.raw_path.decode() == path
    assert req.headers["authorization"] == "Bearer sk-admin"
    assert req.headers["x-loraplex-actor"]
    assert (json.loads(req.content) if req.content else None) == body
    assert json.loads(capsys.readouterr().out) == {"ok": True}


def test_api_error_is_printed_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        err = {"error": {"message": "no adapter named 'x'", "code": "adapter_not_found"}}
        return httpx.Response(404, json=err)

    assert run(parse(["adapters", "show", "x"]), transport=httpx.MockTransport(handler)) == 1
    assert "404 adapter_not_found: no adapter named 'x'" in capsys.readouterr().err


def test_missing_admin_key_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["adapters", "list"])
    args.admin_key = None
    assert run(args) == 2
    assert "admin key" in capsys.readouterr().err


def capture(argv: list[str]) -> tuple[int, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"ok": True})

    return run(parse(argv), transport=httpx.MockTransport(handler)), seen


EXPERIMENT_YAML = """
name: ab
target: medical
variants:
  - {name: control, model: medical@1}
  - {name: candidate, model: medical@2}
ramp: [0.01, 0.1, 0.5]
ramp_interval_s: 600
guardrails:
  min_samples: 500
  max_latency_p95_ratio: 1.3
"""


def test_experiments_create_sends_the_yaml_definition(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text(EXPERIMENT_YAML, encoding="utf-8")
    code, [req] = capture(["experiments", "create", str(path)])
    assert code == 0
    assert (req.method, req.url.path) == ("POST", "/admin/v1/experiments")
    assert json.loads(req.content) == {
        "name": "ab",
        "target": "medical",
        "variants": [
            {"name": "control", "model": "medical@1"},
            {"name": "candidate", "model": "medical@2"},
        ],
        "ramp": [0.01, 0.1, 0.5],
        "ramp_interval_s": 600,
        "guardrails": {"min_samples": 500, "max_latency_p95_ratio": 1.3},
    }
    assert json.loads(capsys.readouterr().out) == {"ok": True}


def test_experiments_create_reads_json_from_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"name": "ab", "target": "domain:medical", "variants": []}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(body)))
    code, [req] = capture(["experiments", "create", "-"])
    assert code == 0
    assert json.loads(req.content) == body


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiments", "weights", "ab", "candidate=lots"], "must be a number"),
        (["experiments", "weights", "ab", "candidate"], "expected VARIANT=SHARE"),
        (["experiments", "weights", "ab", "=0.2"], "expected VARIANT=SHARE"),
    ],
)
def test_bad_command_lines_send_nothing(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        capture(argv)


def test_experiments_create_refuses_a_non_object(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="must be a JSON/YAML object"):
        capture(["experiments", "create", str(path)])


def test_experiment_error_is_printed_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        message = "experiment 'ab' is running; promote or abort it first"
        return httpx.Response(
            409, json={"error": {"message": message, "code": "experiment_active"}}
        )

    args = parse(["experiments", "delete", "ab"])
    assert run(args, transport=httpx.MockTransport(handler)) == 1
    assert "409 experiment_active: experiment 'ab' is running" in capsys.readouterr().err
