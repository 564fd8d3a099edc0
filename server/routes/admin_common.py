"""What every admin route shares: admin-key auth, the audit actor, self-read JSON bodies."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from adapters.registry import Actor
from server.auth import hash_key
from server.pipeline import parse_request, read_body
from server.protocol import error_responses
from server.state import GatewayState, get_state

ACTOR_HEADER = "x-loraplex-actor"
Body = TypeVar("Body", bound=BaseModel)
# Every admin route: no key or an unknown one (401), a tenant key (403).
ADMIN_AUTH_ERRORS = error_responses(401, 403)


def require_admin(request: Request) -> GatewayState:
    state = get_state(request)
    state.tenants.authenticate_admin(request.headers.get("authorization"))
    return state


def actor(request: Request) -> Actor:
    """Audit identity: which admin key (digest prefix), plus a human name if the caller gave
    one in `X-Loraplex-Actor` (the CLI sends the OS user)."""
    token = (request.headers.get("authorization") or "").partition(" ")[2].strip()
    who = f"admin:{hash_key(token)[:8]}"
    named = request.headers.get(ACTOR_HEADER, "")[:64]
    if named and all(c.isascii() and (c.isalnum() or c in "-_.@ ") for c in named):
        who = f"{named} ({who})"
    return Actor(who, request.state.request_id)


async def json_body(request: Request, schema: type[Body]) -> Body:
    """Read and validate a JSON body after auth ran (FastAPI body params decode before
    dependencies, which answered unauthenticated callers 400 instead of 401)."""
    state = get_state(request)
    raw = await read_body(request, state.settings.max_body_bytes)
    parsed: Body = parse_request(raw, schema)[1]
    return parsed
