"""Operator API for adapters under /admin/v1: register, validate, versions, aliases, pins,
retire, delete, engine residency. Admin key only (tenant keys get 403); every mutation writes
an audit entry (read it at /admin/v1/audit)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse

from adapters.registry import VersionNotFound
from adapters.types import ALIAS_RE, NAME_RE, AdapterVersion
from server.errors import Conflict
from server.protocol import MAX_INT32, error_responses, openapi_body
from server.routes.admin_common import ADMIN_AUTH_ERRORS, actor, json_body, require_admin
from server.state import get_state

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ADMIN_AUTH_ERRORS,
)

NAME = NAME_RE.pattern
ALIAS = ALIAS_RE.pattern
# A version number in a path: a positive 32-bit integer like the registry's column (a larger
# one is a 400, not a database overflow).
Version = Annotated[int, Path(ge=1, le=MAX_INT32)]


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME, description="adapter name; versions are numbered per name")
    source: str = Field(
        min_length=1,
        max_length=4096,
        description="absolute directory, file://, http(s):// archive or s3://bucket/key",
    )
    base_digest: str | None = Field(None, description="sha256:<hex> of the base it was trained on")
    metadata: dict[str, Any] = Field(default_factory=dict)
    alias: str | None = Field(None, pattern=ALIAS, description="alias to point at it once ready")


class ValidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=4096)
    base_digest: str | None = None


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=MAX_INT32)


class VersionView(BaseModel):
    name: str
    version: int
    label: str
    served_name: str
    state: str
    state_reason: str | None
    digest: str
    base_digest: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    source: str
    path: str
    created_at: float
    pinned: bool
    aliases: list[str]
    metadata: dict[str, Any]
    registered_on_engine: bool  # on at least one engine
    registered_on: list[str]  # the engines (URLs) it is registered on
    in_flight: int


class AdapterView(BaseModel):
    name: str
    aliases: dict[str, int]
    versions: list[VersionView]


class AdapterListView(BaseModel):
    object: str = "list"
    data: list[AdapterView]


def _view(request: Request, v: AdapterVersion) -> VersionView:
    state = get_state(request)
    return VersionView(
        name=v.name,
        version=v.version,
        label=v.label,
        served_name=v.served_name,
        state=v.state.value,
        state_reason=v.state_reason,
        digest=v.digest,
        base_digest=v.base_digest,
        rank=v.rank,
        alpha=v.alpha,
        target_modules=list(v.target_modules),
        size_bytes=v.size_bytes,
        source=v.source_uri,
        path=v.path,
        created_at=v.created_at,
        pinned=v.pinned,
        aliases=state.registry.snapshot.aliases_pointing_at(v.name, v.version),
        metadata=v.metadata,
        registered_on_engine=state.engines.is_registered(v.served_name),
        registered_on=[m.url for m in state.engines if m.residency.is_registered(v.served_name)],
        in_flight=state.engines.in_flight(v.served_name),
    )


def _adapter(request: Request, name: str) -> AdapterView:
    snap = get_state(request).registry.snapshot
    versions = snap.versions_of(name)
    if not versions:
        raise VersionNotFound(f"no adapter named {name[:64]!r}")
    return AdapterView(
        name=name, aliases=snap.aliases_of(name), versions=[_view(request, v) for v in versions]
    )


def _version(request: Request, name: str, version: int) -> AdapterVersion:
    found = get_state(request).registry.snapshot.versions.get((name, version))
    if found is None:
        raise VersionNotFound(f"no adapter version {name[:64]}@{version}")
    return found


@router.get("/adapters", response_model=AdapterListView)
async def list_adapters(request: Request) -> AdapterListView:
    snap = get_state(request).registry.snapshot
    return AdapterListView(data=[_adapter(request, n) for n in snap.names()])


@router.post(
    "/adapters",
    status_code=201,
    response_model=VersionView,
    openapi_extra=openapi_body(RegisterRequest),
    responses={
        200: {"description": "a ready version with the same content already existed"},
        **error_responses(400, 409, 413, 422, 502, 503),
    },
)
async def register_adapter(request: Request) -> Any:
    """Fetch, validate against the served base, smoke-test on the engine, then mark ready."""
    body = await json_body(request, RegisterRequest)
    reserved = {get_state(request).settings.engine.served_model_name, "auto", "default"}
    if body.name in reserved:
        raise Conflict(f"{body.name!r} is reserved (base model or routing name)", param="name")
    version, created = await get_state(request).lifecycle.register(
        body.name,
        body.source,
        actor(request),
        base_digest=body.base_digest,
        metadata=body.metadata,
        alias=body.alias,
    )
    view = _view(request, version)
    return JSONResponse(view.model_dump(mode="json"), status_code=201 if created else 200)


@router.post(
    "/adapters/validate",
    openapi_extra=openapi_body(ValidateRequest),
    responses=error_responses(400, 413, 422, 502),
)
async def validate_adapter(request: Request) -> dict[str, Any]:
    """Every static check, without registering (nothing is stored, nothing reaches the engine)."""
    body = await json_body(request, ValidateRequest)
    found = await get_state(request).lifecycle.inspect(body.source, body.base_digest)
    f = found.facts
    return {
        "valid": True,
        "digest": f.digest,
        "rank": f.rank,
        "alpha": f.alpha,
        "target_modules": list(f.target_modules),
        "size_bytes": f.size_bytes,
        "tensor_count": f.tensor_count,
        "declared_base_digest": f.declared_base_digest,
    }


@router.get("/adapters/{name}", response_model=AdapterView, responses=error_responses(404))
async def get_adapter(name: str, request: Request) -> AdapterView:
    return _adapter(request, name)


@router.get(
    "/adapters/{name}/versions/{version}",
    response_model=VersionView,
    responses=error_responses(400, 404),
)
async def get_version(name: str, version: Version, request: Request) -> VersionView:
    return _view(request, _version(request, name, version))


@router.post(
    "/adapters/{name}/versions/{version}/validate",
    response_model=VersionView,
    responses=error_responses(400, 404, 409, 413, 422, 502, 503),
)
async def revalidate_version(name: str, version: Version, request: Request) -> VersionView:
    v = await get_state(request).lifecycle.revalidate(name, version, actor(request))
    return _view(request, v)


@router.put(
    "/adapters/{name}/aliases/{alias}",
    openapi_extra=openapi_body(AliasRequest),
    responses=error_responses(400, 404, 409, 413, 503),
)
async def move_alias(name: str, alias: str, request: Request) -> dict[str, Any]:
    """Point `name@alias` at a ready version; new requests resolve to it at once, requests
    already resolved finish on the version they started with."""
    body = await json_body(request, AliasRequest)
    before, after = await get_state(request).registry.set_alias(
        name, alias[:32], body.version, actor(request)
    )
    return {"name": name, "alias": alias, "before": before, "version": after}


@router.delete("/adapters/{name}/aliases/{alias}", responses=error_responses(400, 404, 409, 503))
async def delete_alias(name: str, alias: str, request: Request) -> dict[str, Any]:
    before, _ = await get_state(request).registry.set_alias(name, alias[:32], None, actor(request))
    return {"name": name, "alias": alias, "before": before, "version": None}


@router.post(
    "/adapters/{name}/versions/{version}/pin",
    response_model=VersionView,
    responses=error_responses(400, 404, 409, 422, 503),
)
async def pin_version(name: str, version: Version, request: Request) -> VersionView:
    v = await get_state(request).lifecycle.set_pinned(name, version, True, actor(request))
    return _view(request, v)


@router.delete(
    "/adapters/{name}/versions/{version}/pin",
    response_model=VersionView,
    responses=error_responses(400, 404, 409, 503),
)
async def unpin_version(name: str, version: Version, request: Request) -> VersionView:
    v = await get_state(request).lifecycle.set_pinned(name, version, False, actor(request))
    return _view(request, v)


@router.post(
    "/adapters/{name}/versions/{version}/retire",
    response_model=VersionView,
    responses=error_responses(400, 404, 409, 503),
)
async def retire_version(name: str, version: Version, request: Request) -> VersionView:
    v = await get_state(request).lifecycle.retire(name, version, actor(request))
    return _view(request, v)


@router.delete(
    "/adapters/{name}/versions/{version}",
    response_model=VersionView,
    responses=error_responses(400, 404, 409, 503),
)
async def delete_version(name: str, version: Version, request: Request) -> VersionView:
    v = await get_state(request).lifecycle.delete(name, version, actor(request))
    return _view(request, v)


@router.get("/residency")
async def residency(request: Request) -> dict[str, Any]:
    """What the gateway has registered on each engine, least recently used first
    (`budget`: registrations per engine; `registered`: distinct versions on any engine)."""
    pool = get_state(request).engines
    return {
        "budget": pool.budget,
        "registered": len(pool.registered_names()),
        "slots": [
            {
                "engine": member.url,
                "adapter": s.version.label,
                "served_name": s.version.served_name,
                "registered": s.registered,
                "in_flight": s.refs,
                "pinned": s.pinned,
            }
            for member, s in pool.slots()
        ],
    }


@router.get("/engine")
async def engine_status(request: Request) -> dict[str, Any]:
    state = get_state(request)
    local = state.local_engine
    return {
        "url": state.settings.engine.url,
        "mode": state.settings.engine.mode,
        "up": state.engine_status.up,
        "ready": state.ready,
        "pid": local.pid if local else None,
        "starts": local.starts if local else None,
        "engines": [
            {
                "url": m.url,
                "up": m.up,
                "ready": m.up and m.reconciled,
                "suspect": m.suspect,
                "in_flight": m.in_flight,
                "queue_waiting": m.waiting,
                "queue_running": m.running,
                "registered": m.residency.registered_names(),
                "restarts_seen": m.restarts_seen,
                "picks": dict(m.picks),
            }
            for m in state.engines
        ],
    }
