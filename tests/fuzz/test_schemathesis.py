"""Schema-driven fuzzing of the whole HTTP surface (issue 8, "Bad input"; docs/reliability.md).

schemathesis generates requests from the gateway's own OpenAPI document: valid ones
(positive), ones that break the schema (negative), and its coverage phase's boundary values,
missing and wrong-typed fields and undeclared methods. They go in-process to the ASGI app over
a fake engine; every operation gets a fresh gateway in the same state (the unit tests'
bootstrapped registry, an experiment `ab` on `medical`, one request served in it to rate).
Realistic values (adapter, tenant and experiment names, versions, models, adapter sources,
API keys) are mixed into the generated path parameters, bodies and headers, so requests get
past the 401s and 404s into the handlers; admin and tenant keys are swapped now and then.

Checked on every response: no 5xx (nor an exception out of the app), every non-2xx in exactly
the error shape with an `application/json` content type and no control character in its
message, no control character in any header value, and status code, content type and body
as the document declares them for the operation. The run's request count and time are
printed at the end (tests/fuzz/conftest.py); the last test asserts at least 10 000 requests.
`LORAPLEX_FUZZ_EXAMPLES` (per operation) and `LORAPLEX_FUZZ_SEED` change the run.

Adapter sources are sandboxed: local paths resolve under a per-gateway directory (with a few
real adapters in it); remote sources answer `source_not_found` without a connection.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import Case as AnyCase
from schemathesis import CheckContext, GenerationMode, Response
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from adapters.errors import SourceNotFound
from adapters.sources import AdapterSource, LocalSource, SourceSettings, parse_source
from server.app import create_app
from server.settings import Settings
from tests.fuzz.tally import TALLY
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import ACME_KEY, ADMIN_KEY, BETA_KEY, ERROR_KEYS, NODEFAULT_KEY

EXAMPLES = int(os.environ.get("LORAPLEX_FUZZ_EXAMPLES", "170"))
MIN_REQUESTS = 10_000

schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], database="none"
)
schema.config.seed = int(os.environ.get("LORAPLEX_FUZZ_SEED", "8"))

Case = AnyCase[Any]
GENERATION = ("/v1/chat/completions", "/v1/completions")
ADAPTERS = ["legal", "medical", "finance", "broken", "extra", "base"]
MODELS = ["legal", "medical@1", "legal@stable", "finance", "base", "auto", "default", "ghost"]
TENANTS = ["acme", "beta", "nodefault"]
SERVED_ID = "fuzz-served-request"  # a request served in experiment `ab`, to rate
SOURCES = [
    "/adapters/extra",
    "file:///adapters/extra",
    "/adapters/bin-only",
    "/adapters/empty",
    "/adapters/missing",
    "/adapters/../../etc",
    "https://adapters.example/extra.tar.gz",
    "s3://bucket/extra/",
]
TENANT_KEYS = (BETA_KEY, NODEFAULT_KEY, ADMIN_KEY, "sk-unknown", "")
ADMIN_KEYS = (ACME_KEY, "sk-unknown", "")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _path_values(path: str, name: str) -> list[Any]:
    if name == "version":
        return [1, 2]
    if name == "alias":
        return ["stable", "canary"]
    if name == "tenant" or path.startswith("/admin/v1/tenants/"):
        return TENANTS
    if path.startswith("/admin/v1/experiments/"):
        return ["ab"]
    if path.startswith("/admin/v1/adapters/"):
        return ADAPTERS
    return []


def _body_values(path: str) -> dict[str, list[Any]]:
    variants = [{"name": "control", "model": "legal@1"}, {"name": "candidate", "model": "base"}]
    if path in GENERATION:
        return {
            "model": MODELS,
            "stream": [True, False],
            "stream_options": [{"include_usage": True}],
            "max_tokens": [1, 16, 2**31, -1],
        }
    by_path: dict[str, dict[str, list[Any]]] = {
        "/admin/v1/adapters": {"name": ADAPTERS, "source": SOURCES, "alias": ["stable", "next"]},
        "/admin/v1/adapters/validate": {"source": SOURCES},
        "/admin/v1/adapters/{name}/aliases/{alias}": {"version": [1, 2]},
        "/admin/v1/tenants": {
            "name": ["gamma", "acme"],
            "adapters": [["legal"], ["legal", "medical"]],
            "default": ["legal"],
        },
        "/admin/v1/tenants/{name}": {"adapters": [["legal", "medical"]], "default": ["medical"]},
        "/admin/v1/experiments": {
            "name": ["cd", "ab"],
            "target": ["legal", "medical", "domain:legal"],
            "variants": [variants],
        },
        "/admin/v1/experiments/{name}/weights": {"weights": [{"candidate": 0.3}]},
        "/admin/v1/experiments/{name}/promote": {"variant": ["control", "candidate"]},
        "/admin/v1/drift/{tenant}/reference": {"from": ["current"], "reset": [True]},
        "/v1/feedback": {"request_id": [SERVED_ID], "rating": ["up"]},
    }
    return by_path.get(path, {})


def _with_key(case: Case, key: str) -> None:
    case.headers["Authorization"] = f"Bearer {key}" if key else ""


def _realistic(case: Case) -> bool:
    """Mix realistic values into `case`: each path parameter and listed body field is replaced
    with probability 0.7, the API key (the right kind until now) with 0.3; True if anything
    changed. The draws are seeded from the case itself: no extra Hypothesis draws (they cost
    more than a request), and the same case always maps the same."""
    seed = repr((case.operation.label, case.path_parameters, case.body, case.query))
    rng = random.Random(zlib.crc32(seed.encode("utf-8", "surrogatepass")))  # noqa: S311
    path = case.operation.path
    changed = False
    if isinstance(case.path_parameters, dict):
        for name in list(case.path_parameters):
            values = _path_values(path, name)
            if values and rng.random() < 0.7:
                case.path_parameters[name] = rng.choice(values)
                changed = True
    if isinstance(case.body, dict):
        for name, values in _body_values(path).items():
            if rng.random() < 0.7:
                case.body[name] = rng.choice(values)
                changed = True
    if rng.random() < 0.3:
        _with_key(case, rng.choice(ADMIN_KEYS if path.startswith("/admin/") else TENANT_KEYS))
        changed = True
    return changed


@schemathesis.check
def error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Errors are `{"error": {message, type, param, code}}`, JSON, without control characters
    (a client's bytes are never echoed raw); no header value carries one either."""
    for name, values in response.headers.items():
        for value in values:
            assert not CONTROL.search(value), f"control character in header {name}: {value!r}"
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), f"error content type {content_type!r}"
    payload = orjson.loads(response.content)
    assert isinstance(payload, dict), payload
    assert set(payload) == {"error"}, payload
    err = payload["error"]
    assert isinstance(err, dict), payload
    assert set(err) == ERROR_KEYS, payload
    assert isinstance(err["message"], str), payload
    assert err["message"], payload
    assert not CONTROL.search(err["message"]), f"control character in message: {payload}"
    assert isinstance(err["type"], str), payload
    assert isinstance(err["code"], str), payload
    assert err["param"] is None or isinstance(err["param"], str), payload
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    error_shape,
]


def sandboxed(root: Path) -> Callable[[str, SourceSettings], AdapterSource]:
    """The real source parser (its refusals are fuzzed too), with local paths moved under
    `root` (and kept there), and remote sources that hold nothing (no connection is made)."""

    def factory(uri: str, source_settings: SourceSettings) -> AdapterSource:
        source = parse_source(uri, source_settings)
        if not isinstance(source, LocalSource):
            raise SourceNotFound(f"{uri[:64]!r}: nothing there (the fuzz run has no network)")
        return LocalSource(root / source.path.relative_to(source.path.anchor), (root,))

    return factory


@dataclass
class FuzzGateway:
    app: FastAPI
    client: asgi.ASGIClient


@pytest.fixture
def gateway(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> Iterator[FuzzGateway]:
    """A gateway for one operation's examples, served on schemathesis's ASGI event loop."""
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    sources = tmp_path / "sources"
    for name in ("extra", "bin-only", "empty"):
        shutil.copytree(config.adapter_dirs[name], sources / "adapters" / name)
    small = {"max_archive_bytes": 1 << 20, "max_extracted_bytes": 1 << 20}
    app = create_app(
        config.settings(adapters_file=None, registry=small), engine_factory=lambda s: engine
    )
    client = asgi.get_client(cast(Any, app))
    try:
        with client:
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the gateway did not get ready"
                time.sleep(0.01)
            app.state.loraplex.lifecycle._sources._factory = sandboxed(sources)
            _prepare(client)
            yield FuzzGateway(app, client)
    finally:
        asgi.shutdown_lifespans()


def _prepare(client: asgi.ASGIClient) -> None:
    """Experiment `ab` on `medical` (control medical@1, candidate the base model), and one
    request served in it under a known id."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    resp = client.post(
        "/admin/v1/experiments",
        json={
            "name": "ab",
            "target": "medical",
            "variants": [
                {"name": "control", "model": "medical@1"},
                {"name": "candidate", "model": "base"},
            ],
            "weights": {"candidate": 0.5},
        },
        headers=admin,
    )
    assert resp.status_code == 201, resp.text
    resp = client.post(
        "/v1/chat/completions",
        json={"model": "medical", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {ACME_KEY}", "X-Request-Id": SERVED_ID},
    )
    assert resp.status_code == 200, resp.text
    assert "x-loraplex-variant" in resp.headers, resp.headers


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_http_surface(case: Case, gateway: FuzzGateway) -> None:
    """Each generated case is sent as generated (with the right kind of key), then again with
    realistic values mixed in when that changes it."""
    TALLY.cases += 1
    _with_key(case, ADMIN_KEY if case.path.startswith("/admin/") else ACME_KEY)
    _send(case, gateway)
    if _realistic(case):
        _send(case, gateway)


def _send(case: Case, gateway: FuzzGateway) -> None:
    try:
        response = case.call(session=gateway.client, app=gateway.app)
    except Exception as exc:  # the app raised (Starlette re-raises after answering 500)
        raise AssertionError(f"the app raised {exc!r}") from exc
    TALLY.count(case.operation.label, response.status_code)
    case.validate_response(response, checks=CHECKS)


def test_request_count() -> None:
    """Runs after the fuzz test (file order); meaningful only when every operation ran."""
    if len(TALLY.operations) < len(list(schema.get_all_operations())):
        pytest.skip("not every operation was fuzzed in this run")
    assert TALLY.requests >= MIN_REQUESTS, TALLY.summary()
