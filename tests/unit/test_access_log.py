"""One structured access-log line per request; never the key or the prompt."""

from __future__ import annotations

import logging

import pytest

from tests.unit.helpers import ACME_KEY, Gateway


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "loraplex.access"]


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


@pytest.mark.parametrize("stream", [False, True])
async def test_one_line_per_request_without_secrets(
    gw: Gateway, caplog: pytest.LogCaptureFixture, stream: bool
) -> None:
    prompt = "PRIVATE-PROMPT-TEXT-42"
    with caplog.at_level(logging.DEBUG, logger="loraplex"):
        resp = await gw.chat(
            model="medical",
            stream=stream,
            messages=[{"role": "user", "content": prompt}],
            headers={"X-Request-Id": "log-test-1"},
        )
    assert resp.status_code == 200
    [line] = _access(caplog)
    fields = line.__dict__
    assert fields["request_id"] == "log-test-1"
    assert fields["tenant"] == "acme"
    assert fields["adapter"] == "medical"
    assert fields["endpoint"] == "chat"
    assert fields["stream"] is stream
    assert fields["status"] == 200
    assert fields["code"] is None
    assert fields["prompt_tokens"] == 7
    assert fields["completion_tokens"] == 3
    assert fields["duration_ms"] >= 0
    logged = _everything_logged(caplog)
    assert prompt not in logged
    assert ACME_KEY not in logged


async def test_error_requests_are_logged_with_their_code(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="loraplex"):
        await gw.chat("sk-not-a-key")
        await gw.chat(model="nope")
    first, second = _access(caplog)
    assert (first.__dict__["tenant"], first.__dict__["status"], first.__dict__["code"]) == (
        "anonymous",
        401,
        "invalid_api_key",
    )
    assert (second.__dict__["tenant"], second.__dict__["status"], second.__dict__["code"]) == (
        "acme",
        404,
        "model_not_found",
    )
    assert "sk-not-a-key" not in _everything_logged(caplog)
