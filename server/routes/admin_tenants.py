"""Operator API for tenants (create, entitle, quotas, rotate keys, delete) and the audit log.

Keys are generated here and returned once; the registry stores only their sha256 digests.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from adapters.registry import Quotas, TenantNotFound, TenantRecord
from adapters.types import NAME_RE
from server.auth import hash_key
from server.errors import BadRequest
from server.protocol import MAX_INT32, error_responses, openapi_body
from server.routes.admin_common import ADMIN_AUTH_ERRORS, actor, json_body, require_admin
from server.state import GatewayState, get_state

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ADMIN_AUTH_ERRORS,
)


class QuotasBody(BaseModel):
    """A tenant's whole quota set: a field left out (or null) is unlimited (docs/api.md)."""

    model_config = ConfigDict(extra="forbid")
    max_adapters: int | None = Field(None, ge=0)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1, description="requests in flight at once")
    max_tokens: int | None = Field(None, ge=1, description="cap on max_tokens of a request")
    max_n: int | None = Field(None, ge=1, description="cap on n of a request")
    max_best_of: int | None = Field(None, ge=1, description="cap on best_of of a request")


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE.pattern)
    adapters: list[str] = Field(default_factory=list, max_length=1000)
    default: str | None = None
    quotas: QuotasBody = Field(default_factory=QuotasBody)


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapters: list[str] | None = Field(None, max_length=1000)
    default: str | None = None
    quotas: QuotasBody | None = None


class RotateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep_previous: bool = Field(
        True, description="the current key keeps working until the next rotation"
    )


def _view(t: TenantRecord) -> dict[str, Any]:
    return {
        "name": t.name,
        "adapters": sorted(t.adapters),
        "default": t.default,
        "quotas": t.quotas.as_dict(),
        "keys": [d[:12] for d in t.key_digests],
    }


def _tenant(state: GatewayState, name: str) -> TenantRecord:
    found = state.registry.snapshot.tenants.get(name)
    if found is None:
        raise TenantNotFound(f"no tenant named {name[:64]!r}")
    return found


def _checked(record: TenantRecord) -> TenantRecord:
    limit = record.quotas.max_adapters
    if limit is not None and len(record.adapters) > limit:
        raise BadRequest(
            f"tenant {record.name!r} may have at most {limit} adapters (max_adapters quota)",
            param="adapters",
            code="quota_max_adapters",
        )
    if record.default is not None and record.default.partition("@")[0] not in record.adapters:
        raise BadRequest("the default model must be one of the tenant's adapters", param="default")
    for name in record.adapters:
        if not NAME_RE.match(name):
            raise BadRequest(f"invalid adapter name {name[:64]!r}", param="adapters")
    return record


def _new_key() -> str:
    return "sk-lp-" + secrets.token_urlsafe(32)


@router.get("/tenants")
async def list_tenants(request: Request) -> dict[str, Any]:
    tenants = get_state(request).registry.snapshot.tenants
    return {"object": "list", "data": [_view(tenants[n]) for n in sorted(tenants)]}


@router.post(
    "/tenants",
    status_code=201,
    openapi_extra=openapi_body(TenantCreate),
    responses=error_responses(400, 409, 413, 503),
)
async def create_tenant(request: Request) -> dict[str, Any]:
    """Create a tenant with a fresh API key, shown only in this response."""
    body = await json_body(request, TenantCreate)
    key = _new_key()
    record = _checked(
        TenantRecord(
            body.name,
            (hash_key(key),),
            frozenset(body.adapters),
            body.default,
            Quotas(**body.quotas.model_dump()),
        )
    )
    await get_state(request).registry.put_tenant(record, actor(request), create=True)
    return {**_view(record), "api_key": key}


@router.get("/tenants/{name}", responses=error_responses(404))
async def get_tenant(name: str, request: Request) -> dict[str, Any]:
    return _view(_tenant(get_state(request), name))


@router.patch(
    "/tenants/{name}",
    openapi_extra=openapi_body(TenantPatch),
    responses=error_responses(400, 404, 413, 503),
)
async def update_tenant(name: str, request: Request) -> dict[str, Any]:
    """Change entitlements, default model or quotas (fields left out stay as they are)."""
    state = get_state(request)
    body = await json_body(request, TenantPatch)
    current = _tenant(state, name)
    fields = body.model_fields_set
    record = _checked(
        TenantRecord(
            name,
            current.key_digests,
            frozenset(body.adapters) if body.adapters is not None else current.adapters,
            body.default if "default" in fields else current.default,
            Quotas(**body.quotas.model_dump()) if body.quotas is not None else current.quotas,
        )
    )
    await state.registry.put_tenant(record, actor(request), create=False)
    return _view(record)


@router.post(
    "/tenants/{name}/rotate-key",
    openapi_extra=openapi_body(RotateRequest),
    responses=error_responses(400, 404, 413, 503),
)
async def rotate_key(name: str, request: Request) -> dict[str, Any]:
    """Issue a new key; the previous one stays valid until the next rotation if asked."""
    state = get_state(request)
    body = await json_body(request, RotateRequest)
    current = _tenant(state, name)
    key = _new_key()
    keep = current.key_digests[:1] if body.keep_previous else ()
    record = TenantRecord(
        name, (hash_key(key), *keep), current.adapters, current.default, current.quotas
    )
    await state.registry.put_tenant(record, actor(request), create=False)
    return {**_view(record), "api_key": key}


@router.delete("/tenants/{name}", responses=error_responses(404, 503))
async def delete_tenant(name: str, request: Request) -> dict[str, Any]:
    before = await get_state(request).registry.delete_tenant(name, actor(request))
    return {**_view(before), "deleted": True}


@router.get("/audit", responses=error_responses(400, 503))
async def audit(
    request: Request,
    limit: int = Query(100, ge=1, le=1000),
    before: int | None = Query(None, ge=1, le=MAX_INT32, description="entries older than this id"),
) -> dict[str, Any]:
    """Newest first; page with `before=<last id>`."""
    entries = await get_state(request).registry.audit_entries(limit, before)
    return {
        "object": "list",
        "data": [
            {
                "id": e.id,
                "at": e.at,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "before": e.before,
                "after": e.after,
                "request_id": e.request_id,
            }
            for e in entries
        ],
    }
