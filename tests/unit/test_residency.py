"""Engine residency (adapters/loader.py) over the fake engine: budget and LRU eviction, pins,
leases and drain, single-flight registration, reconcile after an engine restart."""

from __future__ import annotations

import asyncio

import pytest

from adapters.loader import AdapterCapacity, Lease, Residency
from adapters.types import AdapterVersion
from server.errors import AdapterLoadFailed, EngineUnavailable
from tests.unit.fakes import FakeEngine, ver
from tests.unit.helpers import wait_until

Events = list[tuple[str, str]]


def residency(
    engine: FakeEngine, budget: int, drain_timeout_s: float = 1.0
) -> tuple[Residency, Events]:
    events: Events = []
    res = Residency(
        engine,
        budget,
        drain_timeout_s=drain_timeout_s,
        retry_after_s=7,
        observer=lambda name, event, _s: events.append((name, event)),
    )
    return res, events


async def use(res: Residency, *versions: AdapterVersion) -> None:
    """One short request on each version, in order."""
    for v in versions:
        (await res.acquire(v)).release()


def loaded(engine: FakeEngine) -> list[str]:
    return [name for name, _ in engine.load_calls]


A, B, C, D = ver("a"), ver("b"), ver("c"), ver("d")


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Residency(FakeEngine(), 0)


async def test_registers_once_under_the_served_name_then_hits() -> None:
    engine = FakeEngine()
    res, events = residency(engine, 2)
    lease = await res.acquire(A)
    assert lease.served_name == A.served_name == "a@1-" + A.digest[7:17]
    assert engine.load_calls == [(A.served_name, A.path)]
    assert A.served_name in engine.served
    assert res.in_flight(A.served_name) == 1
    again = await res.acquire(A)
    assert res.in_flight(A.served_name) == 2
    lease.release()
    again.release()
    assert res.in_flight(A.served_name) == 0
    assert res.is_registered(A.served_name)
    assert len(engine.load_calls) == 1
    assert events == [("a", "miss"), ("a", "load"), ("a", "hit")]


async def test_lru_eviction_order_within_the_budget() -> None:
    engine = FakeEngine()
    res, events = residency(engine, 2)
    await use(res, A, B, A)  # B is now the least recently used
    await use(res, C)
    assert engine.unload_calls == [B.served_name]
    assert sorted(res.registered_names()) == sorted([A.served_name, C.served_name])
    await use(res, B)  # A is now the LRU one (C was used after it)
    assert engine.unload_calls == [B.served_name, A.served_name]
    assert loaded(engine) == [A.served_name, B.served_name, C.served_name, B.served_name]
    assert [e for _, e in events].count("evict") == 2
    assert len(res.registered_names()) == 2


async def test_pinned_version_is_never_evicted() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 2)
    pinned = ver("p", pinned=True)
    await use(res, pinned, A, B, C)
    assert pinned.served_name not in engine.unload_calls
    assert engine.unload_calls == [A.served_name, B.served_name]
    assert res.is_registered(pinned.served_name)
    # Pinning at runtime protects a registered version the same way; unpinning releases it.
    res.set_pinned(C.served_name, True)
    res.drain_timeout_s = 0.05
    with pytest.raises(AdapterCapacity):
        await res.acquire(D)
    res.set_pinned(C.served_name, False)
    await use(res, D)
    assert engine.unload_calls[-1] == C.served_name


async def test_busy_versions_are_not_evicted_and_capacity_is_a_503_after_the_wait() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 1, drain_timeout_s=0.05)
    lease = await res.acquire(A)
    with pytest.raises(AdapterCapacity) as caught:
        await res.acquire(B)
    exc = caught.value
    assert isinstance(exc, EngineUnavailable)
    assert (exc.status, exc.error_code) == (503, "adapter_capacity")
    assert exc.headers["Retry-After"] == "7"
    assert engine.unload_calls == []
    assert res.is_registered(A.served_name)
    assert not res.is_registered(B.served_name)
    assert loaded(engine) == [A.served_name]
    lease.release()


async def test_waiting_acquire_proceeds_when_the_busy_version_is_released() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 1, drain_timeout_s=5.0)
    lease = await res.acquire(A)
    waiting = asyncio.create_task(res.acquire(B))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    assert engine.unload_calls == []
    lease.release()
    async with asyncio.timeout(2):
        got = await waiting
    assert got.served_name == B.served_name
    assert engine.unload_calls == [A.served_name]
    got.release()


async def test_all_pinned_is_capacity() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 2, drain_timeout_s=0.02)
    await use(res, ver("p", pinned=True), ver("q", pinned=True))
    with pytest.raises(AdapterCapacity):
        await res.acquire(A)
    assert engine.unload_calls == []


async def test_concurrent_first_acquires_share_one_registration() -> None:
    engine = FakeEngine()
    engine.load_gate = asyncio.Event()
    res, events = residency(engine, 2)
    tasks = [asyncio.create_task(res.acquire(A)) for _ in range(10)]
    await wait_until(lambda: len(engine.load_calls) == 1, what="the registration to start")
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in tasks)
    engine.load_gate.set()
    leases = await asyncio.gather(*tasks)
    assert engine.load_calls == [(A.served_name, A.path)]
    assert res.in_flight(A.served_name) == 10
    for lease in leases:
        lease.release()
    assert res.in_flight(A.served_name) == 0
    assert [e for _, e in events].count("load") == 1
    assert [e for _, e in events].count("miss") == 10


async def test_failed_registration_is_shared_by_the_waiters_and_forgotten() -> None:
    engine = FakeEngine()
    engine.load_gate = asyncio.Event()
    engine.refuse("a", "engine refused the adapter: bad rank")
    res, events = residency(engine, 2)
    tasks = [asyncio.create_task(res.acquire(A)) for _ in range(5)]
    await wait_until(lambda: len(engine.load_calls) == 1, what="the registration to start")
    engine.load_gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(engine.load_calls) == 1
    assert all(isinstance(r, AdapterLoadFailed) for r in results), results
    assert len({id(r) for r in results}) == 1  # the loader's own error, not five retries
    assert res.slots() == []
    assert not res.is_registered(A.served_name)
    assert ("a", "load_error") in events
    # Forgotten: the next request tries again (and succeeds once the engine accepts it).
    del engine.load_failures["a"]
    await use(res, A)
    assert len(engine.load_calls) == 2
    assert res.is_registered(A.served_name)


async def test_cancelled_loader_lets_a_waiter_register() -> None:
    engine = FakeEngine()
    engine.load_gate = asyncio.Event()
    res, _ = residency(engine, 2)
    first = asyncio.create_task(res.acquire(A))
    await wait_until(lambda: len(engine.load_calls) == 1, what="the registration to start")
    second = asyncio.create_task(res.acquire(A))
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    engine.load_gate.set()
    async with asyncio.timeout(2):
        lease = await second
    assert res.is_registered(A.served_name)
    assert res.in_flight(A.served_name) == 1
    lease.release()


async def test_unregister_waits_for_in_flight_leases() -> None:
    engine = FakeEngine()
    res, events = residency(engine, 2, drain_timeout_s=5.0)
    lease = await res.acquire(A)
    task = asyncio.create_task(res.unregister(A.served_name))
    await asyncio.sleep(0.02)
    assert not task.done()
    assert engine.unload_calls == []
    assert res.is_registered(A.served_name)
    lease.release()
    async with asyncio.timeout(2):
        assert await task is True
    assert engine.unload_calls == [A.served_name]
    assert res.slots() == []
    assert ("a", "unload") in events
    assert await res.unregister(A.served_name) is False  # nothing left to unregister


async def test_unregister_drain_times_out_then_unloads() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 2, drain_timeout_s=5.0)
    lease = await res.acquire(A)
    async with asyncio.timeout(2):
        assert await res.unregister(A.served_name, drain_timeout_s=0.05) is True
    assert engine.unload_calls == [A.served_name]
    assert not res.is_registered(A.served_name)
    lease.release()  # late: harmless
    lease.release()


async def test_acquire_during_drain_waits_and_registers_again() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 2, drain_timeout_s=5.0)
    lease = await res.acquire(A)
    unregister = asyncio.create_task(res.unregister(A.served_name))
    await asyncio.sleep(0.01)
    late = asyncio.create_task(res.acquire(A))
    await asyncio.sleep(0.01)
    assert not late.done()
    lease.release()
    async with asyncio.timeout(2):
        await unregister
        second = await late
    assert engine.unload_calls == [A.served_name]
    assert loaded(engine) == [A.served_name, A.served_name]
    assert res.is_registered(A.served_name)
    second.release()


async def test_release_is_idempotent() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 2)
    first = await res.acquire(A)
    second = await res.acquire(A)
    first.release()
    first.release()
    assert res.in_flight(A.served_name) == 1
    second.release()
    assert res.in_flight(A.served_name) == 0
    assert isinstance(first, Lease)


async def test_reconcile_after_engine_restart_registers_pinned_then_recent_up_to_budget() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 3)
    pinned = ver("p", pinned=True)
    await use(res, pinned, A, B)  # recency: p, a, b
    engine.restart()
    res.mark_engine_lost()
    assert res.registered_names() == []
    res.budget = 2
    known = {v.served_name: v for v in (pinned, A, B)}
    done = await res.reconcile(known, [pinned])
    assert done == [pinned.served_name, B.served_name]  # pinned first, then the most recent
    assert loaded(engine)[3:] == [pinned.served_name, B.served_name]
    assert sorted(res.registered_names()) == sorted(done)
    # A was dropped from the warm set; its next request registers it again.
    await use(res, A)
    assert res.is_registered(A.served_name)


async def test_reconcile_adopts_what_the_engine_still_serves() -> None:
    engine = FakeEngine()
    engine.served |= {A.served_name, "unknown@1-0000000000"}
    res, events = residency(engine, 3)
    done = await res.reconcile({A.served_name: A, B.served_name: B}, [])
    assert done == []
    assert engine.load_calls == []
    assert res.registered_names() == [A.served_name]  # not the name the registry doesn't know
    await use(res, A)
    assert engine.load_calls == []
    assert events == [("a", "hit")]


async def test_reconcile_forgets_versions_no_longer_known() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 3)
    await use(res, A, B)
    engine.restart()
    res.mark_engine_lost()
    await res.reconcile({A.served_name: A}, [])  # B was retired meanwhile
    assert [n for n, _ in engine.load_calls[2:]] == [A.served_name]
    assert [s.version.name for s in res.slots()] == ["a"]


async def test_reconcile_survives_a_failed_re_registration() -> None:
    engine = FakeEngine()
    res, _ = residency(engine, 3)
    await use(res, A, B)
    engine.restart()
    res.mark_engine_lost()
    engine.refuse("a")
    done = await res.reconcile({v.served_name: v for v in (A, B)}, [])
    assert done == [B.served_name]
    assert not res.is_registered(A.served_name)


async def test_unload_failure_still_frees_the_slot() -> None:
    """An engine that fails to unload: the gateway stops routing to it and moves on."""
    engine = FakeEngine()
    engine.unload_failure = EngineUnavailable("engine away")
    res, _ = residency(engine, 1)
    await use(res, A, B)
    assert engine.unload_calls == [A.served_name]
    assert res.registered_names() == [B.served_name]
