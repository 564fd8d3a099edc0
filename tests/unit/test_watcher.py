"""The engine watcher: readiness, engine loss and return, reconcile, clean shutdown."""

from __future__ import annotations

import asyncio
import shutil

from server.errors import UpstreamError
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import (
    ACME_KEY,
    ADMIN_KEY,
    Gateway,
    assert_error,
    auth,
    metric,
    running_gateway,
    served,
    wait_until,
)

ADMIN = auth(ADMIN_KEY)


async def test_readyz_503_until_engine_up_then_200(config: Config, engine: FakeEngine) -> None:
    engine.healthy = False
    async with running_gateway(config.settings(), engine, wait_ready=False) as gw:
        resp = await gw.client.get("/readyz")
        err = assert_error(resp, 503, "engine_unavailable")
        assert "engine not reachable" in err["message"]
        assert resp.headers["retry-after"] == "3"
        assert engine.load_calls == []
        engine.healthy = True
        await gw.wait_ready(200)
        assert (await gw.client.get("/readyz")).json() == {"status": "ready"}
        versions = gw.state.registry.snapshot.versions
        assert sorted(versions) == [("broken", 1), ("finance", 1), ("legal", 1), ("medical", 1)]
        assert {n for n, _ in engine.load_calls} == {v.served_name for v in versions.values()}
        assert {v.name for v in versions.values() if v.routable} == {"legal", "medical", "finance"}
        assert versions[("broken", 1)].state == "rejected"
        assert "bad rank" in (versions[("broken", 1)].state_reason or "")
        await gw.wait_gauge("loraplex_engine_up", 1)
        assert metric(await gw.metrics(), "loraplex_engine_up") == 1


async def test_readyz_503_while_adapters_cannot_be_registered(
    config: Config, engine: FakeEngine
) -> None:
    engine.served_models_error = UpstreamError("engine /v1/models answered 500")
    async with running_gateway(config.settings(), engine, wait_ready=False) as gw:
        await wait_until(lambda: gw.state.engine_status.up, what="engine up")
        resp = await gw.client.get("/readyz")
        err = assert_error(resp, 503, "engine_unavailable")
        assert "adapters not registered" in err["message"]
        engine.served_models_error = None
        await gw.wait_ready(200)


async def test_watcher_survives_unexpected_reconcile_error(
    config: Config, engine: FakeEngine
) -> None:
    """A bug-shaped error (not a LoraplexError) must not kill the watcher for good."""

    class Boom(Exception):
        pass

    engine.served_models_error = Boom("unexpected")
    async with running_gateway(config.settings(), engine, wait_ready=False) as gw:
        await wait_until(lambda: engine.health_calls >= 3, what="watcher keeps polling")
        assert_error(await gw.client.get("/readyz"), 503, "engine_unavailable")
        engine.served_models_error = None
        await gw.wait_ready(200)


async def test_engine_loss_and_return_reconciles_desired_adapters(gw: Gateway) -> None:
    engine = gw.engine
    assert (await gw.chat(model="medical")).status_code == 200
    engine.healthy = False
    engine.restart()
    await gw.wait_ready(503)  # at once: /readyz probes the engine live
    await wait_until(
        lambda: gw.state.engine_status.restarts_seen == 1, what="watcher to see the loss"
    )
    assert gw.state.engines.registered_names() == []
    await gw.wait_gauge("loraplex_adapters_resident", 0)
    metrics = await gw.metrics()
    assert metric(metrics, "loraplex_engine_up") == 0
    assert metric(metrics, "loraplex_adapters_resident") == 0
    # While the engine is away an entitled, wanted adapter is a retryable 503, not a 404.
    resp = await gw.chat(model="medical")
    assert_error(resp, 503, "engine_unavailable")
    assert resp.headers["retry-after"] == "3"
    # Unknown and not-entitled names stay 404 whatever the engine does.
    assert_error(await gw.chat(model="finance"), 404, "model_not_found")
    assert_error(await gw.chat(model="nope"), 404, "model_not_found")
    loads_before = len(engine.load_calls)
    engine.healthy = True
    await gw.wait_ready(200)
    ready = {served(gw, n) for n in ("legal", "medical", "finance")}
    reloaded = [n for n, _ in engine.load_calls[loads_before:]]
    assert sorted(reloaded) == sorted(ready)  # once each; broken (rejected) is not wanted
    assert ready <= engine.served
    assert (await gw.chat(model="medical")).status_code == 200
    assert engine.forwarded[-1].body["model"] == served(gw, "medical")
    await gw.wait_gauge("loraplex_adapters_resident", 3)
    assert metric(await gw.metrics(), "loraplex_adapters_resident") == 3


async def test_retired_adapter_is_not_reloaded_after_engine_restart(gw: Gateway) -> None:
    medical = served(gw, "medical")
    resp = await gw.client.delete("/admin/v1/adapters/medical/aliases/stable", headers=ADMIN)
    assert resp.status_code == 200
    resp = await gw.client.post("/admin/v1/adapters/medical/versions/1/retire", headers=ADMIN)
    assert resp.status_code == 200
    assert resp.json()["state"] == "retired"
    assert gw.engine.unload_calls == [medical]
    gw.engine.healthy = False
    gw.engine.restart()
    await gw.wait_ready(503)
    await wait_until(
        lambda: gw.state.engine_status.restarts_seen == 1, what="watcher to see the loss"
    )
    loads_before = len(gw.engine.load_calls)
    gw.engine.healthy = True
    await gw.wait_ready(200)
    reloaded = {n for n, _ in gw.engine.load_calls[loads_before:]}
    assert reloaded == {served(gw, "legal"), served(gw, "finance")}
    assert_error(await gw.chat(model="medical@1"), 404, "model_not_found")


async def test_restart_adopts_what_the_engine_still_serves(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped
) -> None:
    """A gateway restart over a registry that holds the adapters file's versions: nothing is
    stored again, nothing ready is loaded again (the engine kept them); broken, rejected at its
    last registration, is tried once more as a new version."""
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    async with running_gateway(config.settings(), engine) as gw:
        snap = gw.state.registry.snapshot
        assert sorted(snap.versions) == [
            ("broken", 1),
            ("broken", 2),
            ("finance", 1),
            ("legal", 1),
            ("medical", 1),
        ]
        assert [n for n, _ in engine.load_calls] == [snap.versions[("broken", 2)].served_name]
        assert sorted(gw.state.engines.registered_names()) == sorted(bootstrapped.served)
        resp = await gw.client.get("/v1/models", headers=auth(ACME_KEY))
        assert [m["id"] for m in resp.json()["data"]] == ["base", "legal", "medical"]
        assert (await gw.chat(model="legal")).status_code == 200
        assert engine.load_calls[1:] == []


async def test_shutdown_is_prompt_when_reconcile_was_just_requested(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped
) -> None:
    """Regression: wait_for() on 3.11 swallowed the watcher's cancel when it raced with the
    reconcile event, and the lifespan exit then waited forever for the watcher."""
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")  # quick starts
    engine.served |= bootstrapped.served
    settings = config.settings(engine={"health_interval_s": 30.0}, adapters_file=None)

    async def cycle() -> None:
        async with running_gateway(settings, engine) as gw:
            gw.state.reconcile_wanted.set()
            await asyncio.sleep(0)

    for _ in range(5):
        task = asyncio.create_task(cycle())
        done, _ = await asyncio.wait({task}, timeout=10)  # a hang, not a slow machine
        assert task in done, "lifespan shutdown hung"
        task.result()
        assert engine.closed
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "engine-watcher"]


async def test_readyz_probes_the_engine_live_and_the_watcher_does_not_spin(gw: Gateway) -> None:
    engine = gw.engine
    engine.healthy = False
    # No watcher round has run yet: readiness still drops on the very next probe.
    assert_error(await gw.client.get("/readyz"), 503, "engine_unavailable")
    await wait_until(lambda: not gw.state.engine_status.up, what="watcher to see the loss")
    calls = engine.health_calls
    await asyncio.sleep(0.2)  # ~10 rounds at the fixture's 0.02 s interval, not thousands
    assert engine.health_calls - calls < 40
