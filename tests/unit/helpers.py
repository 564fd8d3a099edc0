"""Shared assertions and the in-process gateway harness used by the unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from fastapi import FastAPI
from starlette.types import Message, Scope

from adapters.types import AdapterRef, AdapterVersion
from server.app import create_app
from server.settings import Settings
from server.state import GatewayState
from tests.promtext import metric as metric  # re-exported for the unit tests
from tests.unit.fakes import FakeEngine

ADMIN_KEY = "sk-test-admin"
ACME_KEY = "sk-test-acme"
ACME_OLD_KEY = "sk-test-acme-previous"
BETA_KEY = "sk-test-beta"
NODEFAULT_KEY = "sk-test-nodefault"

ERROR_KEYS = {"message", "type", "param", "code"}
_UNSET = object()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error_payload(
    payload: Any, code: str, *, param: object = _UNSET, type_: str | None = None
) -> dict[str, Any]:
    """The one error-shape check: `{"error": {"message", "type", "param", "code"}}` exactly,
    for JSON error responses and for errors carried in an SSE event alike."""
    assert isinstance(payload, dict)
    assert set(payload) == {"error"}, payload
    err = payload["error"]
    assert isinstance(err, dict)
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str)
    assert err["message"]
    assert isinstance(err["type"], str)
    assert err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert isinstance(err["code"], str)
    assert err["code"] == code, err
    if param is not _UNSET:
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


def assert_error(
    resp: httpx.Response,
    status: int,
    code: str,
    *,
    param: object = _UNSET,
    type_: str | None = None,
) -> dict[str, Any]:
    """An error response: status, JSON content type, and the error shape."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    return assert_error_payload(resp.json(), code, param=param, type_=type_)


def sse_data(text: str) -> list[str]:
    """Split an SSE body into its `data:` payloads, checking the framing is `data: x\\n\\n`."""
    assert text.endswith("\n\n"), text[-200:]
    payloads = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block, block
        payloads.append(block[len("data: ") :])
    return payloads


async def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 3.0, what: str = "condition"
) -> None:
    """Poll a condition with short sleeps (no fixed waits in tests)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Gateway:
    """One running app (lifespan entered) with its fake engine and an httpx client."""

    app: FastAPI
    engine: FakeEngine
    client: httpx.AsyncClient
    settings: Settings

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state.loraplex
        return state

    async def metrics(self) -> str:
        resp = await self.client.get("/metrics")
        assert resp.status_code == 200
        return resp.text

    def gauge(self, name: str, **labels: str) -> float:
        """A metric's current value, read in-process (None reads as 0)."""
        value = self.state.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def wait_gauge(self, name: str, value: float, **labels: str) -> None:
        """The watcher updates gauges at the end of its round: wait for that round."""
        await wait_until(lambda: self.gauge(name, **labels) == value, what=f"{name} == {value}")

    async def wait_ready(self, status: int = 200, timeout_s: float = 3.0) -> None:
        """Poll /readyz until it answers `status` (200: ready, 503: not ready)."""
        deadline = time.monotonic() + timeout_s
        while (await self.client.get("/readyz")).status_code != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"/readyz did not turn {status}")
            await asyncio.sleep(0.005)

    async def chat(
        self,
        key: str = ACME_KEY,
        headers: dict[str, str] | None = None,
        **body: Any,
    ) -> httpx.Response:
        payload: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **body}
        return await self.client.post(
            "/v1/chat/completions", json=payload, headers={**auth(key), **(headers or {})}
        )

    async def post_raw(
        self, path: str, content: bytes, key: str = ACME_KEY, **headers: str
    ) -> httpx.Response:
        return await self.client.post(
            path,
            content=content,
            headers={**auth(key), "Content-Type": "application/json", **headers},
        )


def version(gw: Gateway, model: str) -> AdapterVersion:
    """The version `model` (`name`, `name@3`, `name@alias`) resolves to in the gateway now."""
    ref = AdapterRef.parse(model)
    assert ref is not None, model
    found = gw.state.registry.snapshot.resolve(ref)
    assert found is not None, f"{model} resolves to nothing"
    return found


def served(gw: Gateway, model: str) -> str:
    """The engine-side name of the version `model` resolves to (`name@N-<digest prefix>`)."""
    return version(gw, model).served_name


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings,
    engine: FakeEngine,
    *,
    wait_ready: bool = True,
    raise_app_exceptions: bool = True,
    ready_timeout_s: float = 10.0,
) -> AsyncIterator[Gateway]:
    app = create_app(settings, engine_factory=lambda s: engine)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            gw = Gateway(app, engine, client, settings)
            if wait_ready:  # a ceiling for a busy machine, not a wait
                await gw.wait_ready(timeout_s=ready_timeout_s)
                engine.forwarded.clear()  # bootstrap smoke generations are not test traffic
            yield gw


class ASGIClient:
    """One request driven straight through the ASGI app (httpx's ASGITransport buffers the
    whole response); records every message the app sends, can simulate a disconnect."""

    def __init__(
        self,
        gw: Gateway,
        body: bytes,
        *,
        path: str = "/v1/chat/completions",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.gw = gw
        self.body = body
        self.sent: list[Message] = []
        self.disconnect = asyncio.Event()
        if headers is None:
            headers = [
                (b"authorization", f"Bearer {ACME_KEY}".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        self.scope: Scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},  # what uvicorn sends
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test"), *headers],
            "client": ("127.0.0.1", 50000),
            "server": ("test", 80),
        }

    async def _receive(self) -> Message:
        if self.body:
            body, self.body = self.body, b""
            return {"type": "http.request", "body": body, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        self.sent.append(message)

    def run(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._call())

    async def _call(self) -> None:
        await self.gw.app(self.scope, self._receive, self._send)

    @property
    def status(self) -> int:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        status: int = start["status"]
        return status

    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body" and m["body"]]
