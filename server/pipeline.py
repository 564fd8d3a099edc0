"""The request path: read → authenticate → select adapter → forward → record.

Routes stay thin; everything a generation request goes through lives here so the order of the
steps (and which error wins) is in one place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from adapters.placement import EngineLease
from adapters.types import AdapterRef, AdapterVersion
from router.experiments import Assignment
from server.auth import Tenant
from server.deadlines import bounded_stream, within
from server.disconnects import unless_disconnected
from server.errors import (
    BadRequest,
    EngineUnavailable,
    InvalidJSON,
    LoraplexError,
    ModelNotFound,
    PayloadTooLarge,
    UpstreamError,
)
from server.experiments.service import Served
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.quotas import apply_caps, has_caps
from server.relay import FinishingResponse, RequestRecord, SSEResponse, relay_events
from server.routing import resolve_model
from server.state import GatewayState
from server.upstream import (
    UpstreamResponse,
    UpstreamStream,
    engine_message,
    prefetch_first_event,
)

ADAPTER_HEADER = "x-loraplex-adapter"
USER_HEADER = "x-loraplex-user"  # sticky experiment assignment key (else the API key)
DEFAULT_MODEL_NAMES = frozenset({"", "default"})
log = logging.getLogger("loraplex.pipeline")

ENDPOINTS: dict[str, tuple[str, type[ChatCompletionRequest] | type[CompletionRequest]]] = {
    "chat": ("/v1/chat/completions", ChatCompletionRequest),
    "completions": ("/v1/completions", CompletionRequest),
}


# How deeply a JSON body may nest (the body object is level 1). orjson parses 1024 levels but
# writes only 254, and the registry's json module and FastAPI's encoder recurse in Python: a
# deeper body would parse, then fail (500) when forwarded, stored or echoed. OpenAI bodies,
# tool and JSON schemas included, nest a few dozen levels.
MAX_JSON_DEPTH = 128


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) before reading it whole when it is over `limit`: at once
    when Content-Length says so, else as soon as the bytes read pass it (chunked, or a
    Content-Length that lied low)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):  # no sign, space, `_` or `0x`
            raise BadRequest("Invalid Content-Length header.")
        if len(declared) > 18 or int(declared) > limit:  # int() refuses > 4300 digits
            raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(raw: bytes, schema: type[BaseModel]) -> tuple[dict[str, Any], Any]:
    """JSON-decode and check the fields the gateway relies on; keep the dict for forwarding."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise _too_deep() from None
        raise InvalidJSON("Request body is not valid JSON (or not UTF-8).") from None
    if not isinstance(body, dict):
        raise InvalidJSON("Request body must be a JSON object.")
    # Counting brackets (strings' included) is a fast bound: fewer cannot nest deeper.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(body, MAX_JSON_DEPTH):
        raise _too_deep()
    try:
        parsed = schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = _param_path(first["loc"], body, missing=first["type"] == "missing")
        raise BadRequest(f"Invalid request: {param}: {first['msg']}", param=param) from None
    return body, parsed


def _too_deep() -> InvalidJSON:
    return InvalidJSON(f"Request body is nested too deeply (more than {MAX_JSON_DEPTH} levels).")


def _deeper_than(value: dict[str, Any], limit: int) -> bool:
    """Whether `value` nests more than `limit` levels (walked without recursion)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _param_path(loc: tuple[int | str, ...], body: Any, missing: bool) -> str | None:
    """The offending field as a dotted path of the request, without pydantic's union-member
    tags (`prompt.str`, `messages.0.content.list[...]` name no field the client sent)."""
    parts: list[str] = []
    node = body
    for i, p in enumerate(loc):
        if isinstance(node, dict) and isinstance(p, str):
            if p in node or (missing and i == len(loc) - 1):
                parts.append(p)
                node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
            parts.append(str(p))
            node = node[p]
    return ".".join(parts) or None


def select_adapter(
    state: GatewayState, tenant: Tenant, header: str | None, model: str | None
) -> AdapterVersion | None:
    """Header, else `model`, else the tenant default → a routable version (None: the base
    model). Unknown, forbidden and not-ready look the same, so names never leak."""
    requested = header.strip() if header is not None and header.strip() else model
    if requested is None or requested in DEFAULT_MODEL_NAMES:
        if tenant.default is None:
            raise ModelNotFound("No model was requested and this key has no default model.")
        requested = tenant.default
    if requested == state.settings.engine.served_model_name and tenant.may_use(requested):
        return None
    ref = AdapterRef.parse(requested)
    version = None
    if ref is not None and tenant.may_use(ref.name):
        version = state.registry.snapshot.resolve(ref)
    if version is None or not version.routable:
        shown = requested[:64].encode("ascii", "replace").decode()
        raise ModelNotFound(
            f"The model '{shown}' does not exist or you do not have access to it.",
            param="model",
        )
    return version


def _enter_experiment(
    state: GatewayState, tenant: Tenant, assignment: Assignment, record: RequestRecord
) -> None:
    """Count the request for its variant and remember it for feedback."""
    record.experiment, record.variant = assignment.experiment, assignment.variant
    state.experiments.memory.remember(
        record.request_id,
        Served(tenant.name, assignment.experiment, assignment.variant, time.time()),
    )


def _shadow_version(
    state: GatewayState, tenant: Tenant, model: str
) -> AdapterVersion | Literal[False] | None:
    """The shadow copy's version (None: base model), False when the tenant may not use it."""
    try:
        return select_adapter(state, tenant, None, model)
    except ModelNotFound:
        return False


async def failover(
    state: GatewayState, record: RequestRecord, version: AdapterVersion | None, exc: LoraplexError
) -> EngineLease:
    """The request's engine could not serve it and nothing reached the client: skip that
    engine until its next good probe and take another one (registering the adapter there if
    needed). Raises `exc` when there is no other engine."""
    pool = state.engines
    lease = record.lease
    if lease is None or len(pool) < 2:
        raise exc
    failed = lease.member
    pool.set_suspect(failed)
    state.reconcile_wanted.set()  # the watcher probes it now
    lease.release()
    record.lease = None
    try:
        record.lease = await pool.acquire(version, exclude=(failed,))
    except EngineUnavailable:
        raise exc from None
    state.metrics.engine_failovers.inc()
    log.warning(
        "request moved to another engine",
        extra={"request_id": record.request_id, "engine": failed.url, "error": exc.error_code},
    )
    return record.lease


async def relocate(state: GatewayState, record: RequestRecord, version: AdapterVersion) -> None:
    """The engine answered 404 for a version this gateway had registered there: something
    took it off behind our back (another gateway replica evicting it, an engine restart
    between two probes). Forget that registration and take a lease again, which registers it
    (on the best engine now) before the one retry."""
    lease = record.lease
    assert lease is not None
    lease.member.residency.mark_lost(lease.served_name)
    lease.release()
    record.lease = None
    record.lease = await state.engines.acquire(version)
    log.warning(
        "adapter registered again after the engine answered 404",
        extra={"request_id": record.request_id, "engine": lease.member.url},
    )


def upstream_failure(
    state: GatewayState, lease: EngineLease | None, adapter: str, status: int, body: bytes
) -> LoraplexError:
    """Map an engine error status without leaking engine internals (e.g. its served names)."""
    if status == 404:
        if lease is not None:  # the engine lost it behind our back: re-register now
            lease.member.reconcile_wanted = True
        state.reconcile_wanted.set()
        return ModelNotFound(f"The model '{adapter}' is not available right now.", param="model")
    if status in (400, 422):
        return BadRequest(engine_message(body))
    if status == 503:
        return _overloaded(state)
    return UpstreamError(f"The inference engine failed ({status}).")


async def generate(
    state: GatewayState, request: Request, tenant: Tenant, kind: str, record: RequestRecord
) -> Response:
    """Serve one completion or chat completion request for an authenticated tenant, within its
    concurrency limit (checked first: a flood is refused before its bodies are read) and the
    request timeout (server/deadlines.py)."""
    if tenant.quotas.max_concurrent is not None:
        record.release_slot = state.quotas.enter(tenant.name, tenant.quotas.max_concurrent)
    return await within(
        state.settings.request_timeout_s, partial(_generate, state, request, tenant, kind, record)
    )


async def _generate(
    state: GatewayState, request: Request, tenant: Tenant, kind: str, record: RequestRecord
) -> Response:
    arrived = asyncio.get_running_loop().time()
    path, schema = ENDPOINTS[kind]
    raw = await read_body(request, state.settings.max_body_bytes)
    body, parsed = parse_request(raw, schema)
    header = request.headers.get(ADAPTER_HEADER)
    model, route_headers, decision = await resolve_model(
        state, request, tenant, kind, body, header, parsed.model
    )
    if decision is not None:
        record.domain, record.confidence = decision.domain, decision.confidence
        record.fallback = decision.fallback
    requested = header.strip() if header is not None and header.strip() else model
    experiments = state.experiments.book(state.registry.snapshot)
    assignment = None
    if experiments:
        domain = decision.domain if decision is not None and not decision.fallback else None
        named = requested
        if named is None or named in DEFAULT_MODEL_NAMES:  # the default is in its alias's target
            named = tenant.default
        live = experiments.find(named, domain, tenant.name)
        if live is not None:
            user = request.headers.get(USER_HEADER) or request.headers.get("authorization", "")
            assignment = live.assign(tenant.name, user[:256], record.request_id)
    version: AdapterVersion | None = None
    if assignment is not None:
        try:
            version = select_adapter(state, tenant, None, assignment.model)
        except ModelNotFound:  # the tenant may not use that variant: serve it as it asked
            assignment = None
        else:
            _enter_experiment(state, tenant, assignment, record)
    if assignment is None:
        try:
            version = select_adapter(state, tenant, None, requested)
        except ModelNotFound:
            if decision is None:
                raise
            # A routed target (e.g. the global fallback) this tenant may not use: say so
            # without naming it, it may be another tenant's adapter.
            raise ModelNotFound(
                "No model this key may use can serve this request (model 'auto').",
                param="model",
            ) from None
    if has_caps(tenant.quotas):  # before admission: a refused request spends no budget
        apply_caps(tenant.quotas, body)
    if tenant.quotas.requests_per_minute or tenant.quotas.tokens_per_minute:
        state.quotas.admit(tenant.name, tenant.quotas)
        record.charge_tokens = partial(state.quotas.charge_tokens, tenant.name, tenant.quotas)
    record.stream = bool(parsed.stream)
    if version is None:
        label = record.adapter = state.settings.engine.served_model_name
    else:
        record.adapter, label = version.name, version.label
    record.lease = await state.engines.acquire(version)
    body["model"] = record.lease.served_name  # the same on every engine
    headers = {"X-Loraplex-Adapter": label, **route_headers}
    if record.variant is not None and assignment is not None:
        headers["X-Loraplex-Experiment"] = assignment.experiment
        headers["X-Loraplex-Variant"] = record.variant
        if assignment.shadow_variant is not None and assignment.shadow_model is not None:
            shadow = _shadow_version(state, tenant, assignment.shadow_model)
            if shadow is not False:
                state.shadow.mirror(
                    state, assignment.experiment, assignment.shadow_variant, shadow, path, body
                )

    if not parsed.stream:
        resp = await unless_disconnected(
            request.receive, _post(state, record, version, path, orjson.dumps(body))
        )
        if resp.status != 200:
            raise upstream_failure(state, record.lease, label, resp.status, resp.body)
        _record_usage(record, resp)
        return FinishingResponse(resp.body, headers, record)  # accounted once sent

    # Ask for usage so token metrics work; hide that chunk if the client did not ask for it.
    client_wants_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
    if not client_wants_usage:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    stream = await unless_disconnected(
        request.receive, _open_stream(state, record, version, path, orjson.dumps(body), label)
    )

    async def on_close() -> None:
        await stream.aclose()
        if not record.completed and record.error_code is None:
            record.status, record.error_code = 499, "client_disconnected"
        record.finish()

    events = relay_events(stream, record, drop_usage_chunk=not client_wants_usage)
    if state.settings.max_stream_duration_s is not None:
        deadline = arrived + state.settings.max_stream_duration_s
        events = bounded_stream(events, record, deadline, state.settings.engine.read_timeout_s)
    return SSEResponse(events, headers=headers, on_close=on_close)


class _Retries:
    """What a generation may still do after a failed try (nothing has reached the client):
    move once to another engine, and register an adapter the engine forgot again once."""

    __slots__ = ("moved", "record", "relocated", "several", "state", "version")

    def __init__(
        self, state: GatewayState, record: RequestRecord, version: AdapterVersion | None
    ) -> None:
        self.state, self.record, self.version = state, record, version
        self.several = len(state.engines) > 1
        self.moved = self.relocated = False

    async def lost(self, exc: EngineUnavailable) -> None:
        """The engine could not serve the request: take another one, or raise `exc`."""
        if self.moved:
            raise exc
        self.moved = True
        await failover(self.state, self.record, self.version, exc)

    async def answered(self, status: int) -> bool:
        """The engine answered an error status: whether the request was set up to try again
        (503 with another engine to go to; 404 for an adapter it should have had)."""
        if status == 503 and self.several and not self.moved:
            self.moved = True
            await failover(self.state, self.record, self.version, _overloaded(self.state))
            return True
        if status == 404 and self.version is not None and not self.relocated:
            self.relocated = True
            await relocate(self.state, self.record, self.version)
            return True
        return False


async def _post(
    state: GatewayState,
    record: RequestRecord,
    version: AdapterVersion | None,
    path: str,
    payload: bytes,
) -> UpstreamResponse:
    """A non-streaming generation, retried by `_Retries` (a connection lost mid-answer counts
    as a lost engine: the client has received nothing yet)."""
    retries = _Retries(state, record, version)
    while True:
        lease = record.lease
        assert lease is not None
        try:
            resp = await lease.engine.post(path, payload)
        except EngineUnavailable as exc:
            await retries.lost(exc)
            continue
        if resp.status == 200 or not await retries.answered(resp.status):
            return resp


async def _open_stream(
    state: GatewayState,
    record: RequestRecord,
    version: AdapterVersion | None,
    path: str,
    payload: bytes,
    label: str,
) -> UpstreamStream:
    """Open the engine stream, retried by `_Retries`. With several engines the first event is
    awaited before the response starts, so an engine lost before it moves the request instead
    of failing it; a stream is committed to its engine from its first event on."""
    retries = _Retries(state, record, version)
    while True:
        lease = record.lease
        assert lease is not None
        try:
            stream = await lease.engine.open_stream(path, payload)
            if stream.status == 200:
                if not retries.several:
                    return stream
                try:
                    return await prefetch_first_event(stream)
                except BaseException:
                    await stream.aclose()
                    raise
        except EngineUnavailable as exc:
            await retries.lost(exc)
            continue
        try:
            err_body = await stream.read_body()
        finally:
            await stream.aclose()
        if not await retries.answered(stream.status):
            raise upstream_failure(state, lease, label, stream.status, err_body)


def _overloaded(state: GatewayState) -> EngineUnavailable:
    return EngineUnavailable(
        "The inference engine is overloaded or starting.",
        retry_after_s=state.settings.engine.retry_after_s,
    )


def _record_usage(record: RequestRecord, resp: UpstreamResponse) -> None:
    try:
        parsed = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return
    if isinstance(parsed, dict):
        record.on_usage(parsed.get("usage"))
