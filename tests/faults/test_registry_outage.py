"""The registry database goes away for a while (PostgreSQL stopped, immediate mode).

Serving goes on from the in-memory snapshot, admin reads of the snapshot still answer, admin
mutations and reads that need the database answer 503 `registry_unavailable` with
Retry-After (at once, no hang), the engine watcher keeps working, and everything recovers by
itself once the database is back.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.bench.procs import fake_adapter_dir
from tests.e2e.harness import report
from tests.faults.harness import (
    ADAPTER,
    Engine,
    Gateway,
    Outcome,
    call,
    check,
    gateway,
    new_id,
    run_all,
)
from tests.faults.pgcluster import PgCluster

POLL_S = 0.5
TIMEOUT_S = 1.0  # registry.timeout_s: bounds a connect, a pool wait and each statement


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def gateway_env(pg: PgCluster) -> dict[str, str]:
    return {
        "LORAPLEX_REGISTRY__URL": pg.url,
        "LORAPLEX_REGISTRY__POLL_INTERVAL_S": str(POLL_S),
        "LORAPLEX_REGISTRY__TIMEOUT_S": str(TIMEOUT_S),
    }


def mutations(gw: Gateway, suffix: str, source: str | None = None) -> dict[str, httpx.Response]:
    admin = gw.admin
    register = {}
    if source is not None:
        register["register version"] = admin.post(
            "/admin/v1/adapters", json={"name": ADAPTER, "source": source}
        )
    return {
        **register,
        "create tenant": admin.post(
            "/admin/v1/tenants", json={"name": f"late-{suffix}", "adapters": [ADAPTER]}
        ),
        "set alias": admin.put(f"/admin/v1/adapters/{ADAPTER}/aliases/canary", json={"version": 1}),
        "pin": admin.post(f"/admin/v1/adapters/{ADAPTER}/versions/1/pin"),
        "read audit": admin.get("/admin/v1/audit", params={"limit": 5}),
    }


def traffic(gw: Gateway, prefix: str, n: int = 20) -> list[Outcome]:
    calls = [
        {"rid": f"{prefix}-{i}", "model": ADAPTER if i % 2 else "base", "stream": i % 3 != 0}
        for i in range(n)
    ]
    return run_all(gw.client, calls)


def create_tenant_once_back(gw: Gateway, name: str, within_s: float) -> httpx.Response:
    """Retry creating a tenant (503 while the database is away) until it is created."""
    started = time.monotonic()
    while True:
        resp = gw.admin.post("/admin/v1/tenants", json={"name": name, "adapters": [ADAPTER]})
        if resp.status_code == 201:
            return resp
        assert resp.status_code == 503, resp.text
        assert time.monotonic() - started < within_s, "mutations did not recover"
        time.sleep(0.1)


def test_postgres_stopped(engine: Engine, pg: PgCluster, gw: Gateway, tmp_path: Path) -> None:
    engine.faults()
    prefix = new_id("registry")
    assert mutations(gw, "before")["create tenant"].status_code == 201

    pg.stop()
    down_at = time.monotonic()
    time.sleep(3 * POLL_S)  # the watcher has polled the stopped database a few times

    # Serving goes on from the snapshot.
    during = traffic(gw, prefix)
    # Admin views of the snapshot answer; the rest is a clean 503.
    assert gw.admin.get("/admin/v1/adapters").status_code == 200
    assert gw.admin.get("/admin/v1/tenants").status_code == 200
    refused = {}
    source = fake_adapter_dir(tmp_path / "v2", ADAPTER, rank=4)  # new content: a version 2
    for what, resp in mutations(gw, "during", source).items():
        assert resp.status_code == 503, (what, resp.text)
        err = resp.json()["error"]
        assert err["code"] == "registry_unavailable", (what, err)
        assert err["type"] == "server_error"
        assert resp.headers["retry-after"] == "5"
        assert resp.elapsed.total_seconds() < 1.0, (what, resp.elapsed)
        refused[what] = round(resp.elapsed.total_seconds(), 3)
    assert httpx.get(f"{gw.url}/readyz", timeout=5).status_code == 200  # still serving
    # The engine watcher still runs: an engine that lost its adapters gets them back.
    slots = gw.admin.get("/admin/v1/residency").json()["slots"]
    served = next(s["served_name"] for s in slots if s["adapter"].startswith(ADAPTER))
    httpx.post(f"{engine.url}/adapters/forget", timeout=5).raise_for_status()
    deadline = time.monotonic() + 5
    while served not in engine.models():
        assert time.monotonic() < deadline, "the watcher stopped while the registry was down"
        time.sleep(0.05)

    pg.start()
    up_at = time.monotonic()
    resp = create_tenant_once_back(gw, "back", within_s=10)
    recovered_s = time.monotonic() - up_at
    # The refused registration left nothing behind.
    versions = gw.admin.get(f"/admin/v1/adapters/{ADAPTER}").json()["versions"]
    assert [v["version"] for v in versions] == [1]
    # The new tenant's key works at once (the snapshot was reloaded).
    key = resp.json()["api_key"]
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as c:
        assert call(c, new_id("registry-back"), ADAPTER, stream=False).kind == "answer"
    after = traffic(gw, prefix + "-after")
    outcomes = [*during, *after]
    summary = check(engine, prefix, outcomes, max_attempts=1)
    assert summary["answer"] == len(outcomes)
    log = gw.log.read_text()
    assert log.count("registry database unavailable") == 1
    assert log.count("registry database reachable again") == 1
    report(
        "fault: registry database (PostgreSQL) stopped",
        outage_s=round(up_at - down_at, 2),
        served_during_outage=sum(o.kind == "answer" for o in during),
        refused_503_seconds=refused,
        mutations_recovered_after_s=round(recovered_s, 2),
    )


def test_postgres_hangs(engine: Engine, pg: PgCluster, gw: Gateway) -> None:
    """The database host hangs: connections open, statements are sent, nothing answers. Admin
    calls that need the database give up after `registry.timeout_s` (a pooled connection's
    ping, then one connect attempt) with a clean 503; serving goes on; all recovers."""
    engine.faults()
    prefix = new_id("registry-hang")
    assert gw.admin.get("/admin/v1/audit", params={"limit": 1}).status_code == 200  # pooled
    unavailable_before = gw.log.read_text().count("registry database unavailable")
    pg.freeze()
    frozen_at = time.monotonic()
    try:
        during = traffic(gw, prefix)
        refused = {}
        for what in ("create tenant", "read audit"):
            started = time.monotonic()
            if what == "create tenant":
                resp = gw.admin.post(
                    "/admin/v1/tenants", json={"name": "hung", "adapters": [ADAPTER]}, timeout=60
                )
            else:
                resp = gw.admin.get("/admin/v1/audit", params={"limit": 5}, timeout=60)
            took = time.monotonic() - started
            assert resp.status_code == 503, (what, resp.text)
            assert resp.json()["error"]["code"] == "registry_unavailable"
            assert resp.headers["retry-after"] == "5"
            assert took < 4 * TIMEOUT_S + 1, (what, took)
            refused[what] = round(took, 2)
        assert httpx.get(f"{gw.url}/readyz", timeout=5).status_code == 200
    finally:
        pg.thaw()
    thawed_at = time.monotonic()
    create_tenant_once_back(gw, "hung", within_s=10 * TIMEOUT_S)
    recovered_s = time.monotonic() - thawed_at
    after = traffic(gw, prefix + "-after")
    outcomes = [*during, *after]
    summary = check(engine, prefix, outcomes, max_attempts=1)
    assert summary["answer"] == len(outcomes)
    assert gw.log.read_text().count("registry database unavailable") == unavailable_before + 1
    report(
        "fault: registry database (PostgreSQL) hangs",
        hung_s=round(thawed_at - frozen_at, 2),
        timeout_s=TIMEOUT_S,
        served_while_hung=sum(o.kind == "answer" for o in during),
        refused_503_seconds=refused,
        mutations_recovered_after_s=round(recovered_s, 2),
    )


def test_sqlite_locked(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Another process holds SQLite's write lock: reads (and serving) go on; a mutation waits
    out the busy timeout (10 s) and then fails cleanly, and works once the lock is gone."""
    engine.faults()
    work = tmp_path_factory.mktemp("gw-sqlite")
    with gateway(work, engine.url, {"LORAPLEX_REGISTRY__POLL_INTERVAL_S": str(POLL_S)}) as gw:
        locker = sqlite3.connect(work / "gw" / "registry.db", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # the write lock; WAL readers are not blocked
            prefix = new_id("sqlite")
            during = traffic(gw, prefix, 10)
            resp = gw.admin.post("/admin/v1/tenants", json={"name": "locked", "adapters": []})
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "registry_unavailable"
            assert resp.headers["retry-after"] == "5"
            waited = resp.elapsed.total_seconds()
            assert waited < 12
        finally:
            locker.rollback()
            locker.close()
        created = gw.admin.post("/admin/v1/tenants", json={"name": "locked", "adapters": []})
        assert created.status_code == 201, created.text
        summary = check(engine, prefix, during, max_attempts=1)
        assert summary["answer"] == len(during)
    report(
        "fault: registry database (SQLite) locked by another writer",
        served_during_lock=summary["answer"],
        mutation_503_after_s=round(waited, 2),
    )
