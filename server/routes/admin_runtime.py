"""`GET /admin/v1/runtime`: the gateway process's own resources, for leak checks.

Fault tests and the soak run compare these numbers before and after a scenario: a request
that ends (fully, with an error, or by a client disconnect) must leave no asyncio task, file
descriptor or engine connection behind. Admin key only; reading it costs a directory listing
of /proc/self/fd and a walk over the event loop's tasks, so it is not for high-rate scraping.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request

from server.routes.admin_common import ADMIN_AUTH_ERRORS, require_admin
from server.state import get_state

router = APIRouter(
    prefix="/admin/v1",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=ADMIN_AUTH_ERRORS,
)


@router.get("/runtime")
async def runtime(request: Request) -> dict[str, Any]:
    """Tasks on the event loop (this request's own included), open fds, RSS, engine
    connections (idle in the pool / in use), engine retries by reason, leases in flight."""
    state = get_state(request)
    clients = [m.client for m in state.engines]
    # The engines' clients share one connection pool: its figures once; retries summed.
    pool_stats = getattr(clients[0], "pool_stats", None) if clients else None
    retried: Counter[str] = Counter()
    for client in clients:
        retried.update(getattr(client, "retried", None) or {})
    return {
        "pid": os.getpid(),
        "tasks": len(asyncio.all_tasks()),
        "open_fds": _count_fds(),
        "rss_bytes": _rss_bytes(),
        "engine_connections": pool_stats() if callable(pool_stats) else None,
        "engine_retries": dict(retried),
        "leases_in_flight": sum(s.refs for _, s in state.engines.slots()),
    }


def _count_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return None


def _rss_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")
