"""No key and no prompt text in the logs at the default level (info).

Everything any logger writes while a few requests run — answers, streams and every kind of
error, admin calls that create and rotate keys, engine errors that echo the prompt — goes
through the gateway's own handler and JSON formatter (as `loraplex serve` configures them),
and the text is scanned for every key and prompt string involved.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from server.logs import JsonFormatter, LoopBatchingHandler
from tests.unit.fakes import Answer, StreamScript, stream_chunks
from tests.unit.helpers import ACME_KEY, ACME_OLD_KEY, ADMIN_KEY, BETA_KEY, Gateway, auth

PROMPT = "PRIVATE-PROMPT-7f3a-do-not-log"
SYSTEM = "PRIVATE-SYSTEM-PROMPT-91c2"
WRONG_KEY = "sk-WRONG-key-but-still-secret-55e1"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """All log output at the default level (info), formatted as in production."""
    out = io.StringIO()
    handler = LoopBatchingHandler(out)
    handler.setFormatter(JsonFormatter())
    gateway_logger, root = logging.getLogger("loraplex"), logging.getLogger()
    saved = (gateway_logger.level, gateway_logger.propagate, root.level)
    gateway_logger.setLevel(logging.INFO)
    gateway_logger.propagate = False
    gateway_logger.addHandler(handler)
    root.setLevel(logging.INFO)  # third-party loggers (aiohttp, sqlalchemy, httpx, asyncio)
    root.addHandler(handler)
    try:
        yield out
    finally:
        handler.flush()
        gateway_logger.removeHandler(handler)
        root.removeHandler(handler)
        gateway_logger.setLevel(saved[0])
        gateway_logger.propagate = saved[1]
        root.setLevel(saved[2])


def chat_body(**extra: object) -> bytes:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    return orjson.dumps({"messages": messages, **extra})


async def test_no_key_or_prompt_reaches_the_logs(gw: Gateway, captured: io.StringIO) -> None:
    post = gw.client.post
    path = "/v1/chat/completions"
    admin = auth(ADMIN_KEY)
    statuses = []

    async def chat(key: str, **extra: object) -> None:
        resp = await post(path, content=chat_body(**extra), headers=auth(key))
        statuses.append(resp.status_code)

    await chat(ACME_KEY, model="medical")  # answered
    await chat(ACME_OLD_KEY, model="legal", stream=True)  # streamed
    await chat(BETA_KEY, model="medical")  # not entitled: 404
    await chat(WRONG_KEY)  # unknown key: 401
    await chat(ADMIN_KEY)  # the admin key on /v1: 401
    gw.engine.answers.append(Answer(status=400, body=orjson.dumps({"message": f"bad {PROMPT}"})))
    await chat(ACME_KEY, model="medical")  # engine refusal echoing the prompt: 400
    gw.engine.answers.append(Answer(status=500, body=f"Traceback ... {PROMPT}".encode()))
    await chat(ACME_KEY, model="medical")  # engine failure echoing the prompt: 502
    gw.engine.streams_script.append(
        StreamScript(
            events=[*stream_chunks("m", ["a"], False)[:1], f'{{"error": "{PROMPT}"}}'.encode()]
        )
    )
    await chat(ACME_KEY, model="medical", stream=True)  # engine error mid-stream
    gw.engine.streams_script.append(StreamScript(events=stream_chunks("m", ["a"], False)[:1]))
    await chat(ACME_KEY, model="medical", stream=True)  # stream cut short
    bad_json = f'{{"messages": [{{"content": "{PROMPT}"'.encode()
    statuses.append((await gw.post_raw(path, bad_json)).status_code)  # malformed JSON: 400
    bad_field = orjson.dumps({"messages": PROMPT, "max_tokens": PROMPT})
    statuses.append((await gw.post_raw(path, bad_field)).status_code)  # wrong types: 400
    huge = orjson.dumps({"messages": [{"role": "user", "content": PROMPT * 10_000}]})
    statuses.append((await gw.post_raw(path, huge)).status_code)  # too large: 413
    statuses.append(
        (await gw.post_raw(path, chat_body(model=f"{PROMPT}@x"))).status_code
    )  # prompt-like model name: 404

    # Admin calls that create and rotate keys (the keys are in the responses, not the logs).
    made = await post(
        "/admin/v1/tenants", json={"name": "gamma", "adapters": ["medical"]}, headers=admin
    )
    new_key = made.json()["api_key"]
    rotated = await post(
        "/admin/v1/tenants/gamma/rotate-key", json={"keep_previous": False}, headers=admin
    )
    rotated_key = rotated.json()["api_key"]
    await chat(new_key, model="medical")  # the revoked key: 401
    await chat(rotated_key, model="medical")
    statuses.append((await gw.client.get("/admin/v1/tenants", headers=auth(ACME_KEY))).status_code)
    statuses.append((await gw.client.get("/admin/v1/audit", headers=auth(WRONG_KEY))).status_code)

    assert statuses == [
        200,
        200,
        404,
        401,
        401,
        400,
        502,
        200,
        200,
        400,
        400,
        413,
        404,
        401,
        200,
        403,
        401,
    ]
    logging.getLogger("loraplex").handlers[-1].flush()
    text = captured.getvalue()
    lines = text.splitlines()
    assert sum('"logger":"loraplex.access"' in line for line in lines) >= 15  # it did log
    for secret in (
        ACME_KEY,
        ACME_OLD_KEY,
        BETA_KEY,
        ADMIN_KEY,
        WRONG_KEY,
        new_key,
        rotated_key,
        PROMPT,
        SYSTEM,
        "PRIVATE-",
    ):
        assert secret not in text, f"{secret!r} logged:\n" + "\n".join(
            line for line in lines if secret in line
        )
