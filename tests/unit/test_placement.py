"""Placement across engines (adapters/placement.py) over fake engines and real residencies:
adapter affinity, least load, spill, base requests, exclusion, the aggregate view; and the
queue depth scraped from an engine's /metrics (server/upstream.py, parse_engine_load)."""

from __future__ import annotations

import pytest

from adapters.loader import Residency
from adapters.placement import EngineLease, EngineMember, EnginePool
from adapters.types import AdapterVersion
from server.errors import AdapterLoadFailed, EngineUnavailable
from server.upstream import EngineClient, EngineLoad, parse_engine_load
from tests.unit.fakes import FakeEngine, ver

A, B, C = "http://engine-a:8000", "http://engine-b:8000", "http://engine-c:8000"


class Pool:
    """An EnginePool over fake engines (one per URL), every member up, picks recorded."""

    def __init__(
        self, *urls: str, budget: int = 4, spill_threshold: int = 16, up: bool = True
    ) -> None:
        self.fakes: dict[str, FakeEngine] = {}
        self.observed: list[str] = []
        self.pool = EnginePool(
            self._connect,
            lambda client: Residency(client, budget, drain_timeout_s=0.5, retry_after_s=5),
            urls,
            base_name="base",
            budget=budget,
            spill_threshold=spill_threshold,
            retry_after_s=5,
            on_pick=self.observed.append,
        )
        if up:
            for m in self.pool:
                m.up = True
            self.pool.refresh()

    def _connect(self, url: str) -> EngineClient:
        fake = self.fakes[url] = FakeEngine()
        return fake

    def __getitem__(self, url: str) -> EngineMember:
        [member] = [m for m in self.pool if m.url == url]
        return member

    async def use(self, version: AdapterVersion | None) -> EngineMember:
        """One short request: the engine it went to."""
        lease = await self.pool.acquire(version)
        lease.release()
        return lease.member


# -- affinity ---------------------------------------------------------------------------------


async def test_registered_version_goes_to_its_holder_even_when_others_are_as_idle() -> None:
    p = Pool(A, B)
    legal = ver("legal")
    await p[B].residency.ensure(legal)  # registered on B only
    for _ in range(5):
        assert await p.use(legal) is p[B]
    assert p.observed == ["hit"] * 5
    assert p[B].picks == {"hit": 5}
    assert p[A].picks == {}
    assert p.fakes[A].load_calls == []
    assert [n for n, _ in p.fakes[B].load_calls] == [legal.served_name]  # the ensure only


async def test_first_request_registers_then_later_ones_hit() -> None:
    p = Pool(A, B)
    legal = ver("legal")
    first = await p.use(legal)
    second = await p.use(legal)
    assert second is first
    assert p.observed == ["load", "hit"]
    assert first.picks == {"load": 1, "hit": 1}
    assert first.residency.is_registered(legal.served_name)
    other = p[B] if first is p[A] else p[A]
    assert not other.residency.is_registered(legal.served_name)
    assert p.fakes[other.url].load_calls == []


async def test_unplaced_version_goes_to_the_least_loaded_engine() -> None:
    p = Pool(A, B, C)
    p[A].waiting = 3.0
    p[C].waiting = 1.0
    held = await p.pool.acquire(ver("other"))  # this gateway's in-flight request counts too
    assert held.member is p[B]  # B: 0, C: 1, A: 3
    assert p[B].in_flight == 1
    legal = await p.use(ver("legal"))
    assert legal is p[C]  # B and C both carry 1: C has fewer registrations
    held.release()
    assert p[B].in_flight == 0
    assert p.observed == ["load", "load"]


async def test_ties_go_to_the_engine_with_fewer_registrations() -> None:
    for _ in range(20):  # the last tie-break is random: it must never decide here
        p = Pool(A, B, C)
        await p[A].residency.ensure(ver("x"))
        await p[A].residency.ensure(ver("y"))
        await p[C].residency.ensure(ver("z"))
        assert await p.use(ver("new")) is p[B]
        assert await p.use(ver("newer")) in (p[B], p[C])  # now 1 each on B and C
        assert p[A].residency.registered_names() == [ver("x").served_name, ver("y").served_name]


async def test_new_adapters_spread_over_idle_engines() -> None:
    p = Pool(A, B)
    names = [f"adapter{i}" for i in range(6)]
    for name in names:
        await p.use(ver(name))
    assert len(p[A].residency.registered_names()) == 3
    assert len(p[B].residency.registered_names()) == 3
    assert sorted(p.pool.registered_names()) == sorted(ver(n).served_name for n in names)


async def test_unplaced_version_prefers_an_engine_another_replica_registered_it_on() -> None:
    """Not registered by this gateway anywhere, but an engine already serves it (another
    gateway replica registered it there): placed there, though it has more registrations."""
    p = Pool(A, B, spill_threshold=4)
    legal = ver("legal")
    await p[B].residency.ensure(ver("x"))
    p[B].served = frozenset({legal.served_name})
    p[B].waiting = 3.0  # 3 more than A: below the threshold
    assert await p.use(legal) is p[B]
    assert p.observed == ["load"]
    assert p[B].residency.is_registered(legal.served_name)


async def test_warm_engine_loses_to_load_past_the_threshold() -> None:
    p = Pool(A, B, spill_threshold=4)
    legal = ver("legal")
    p[B].served = frozenset({legal.served_name})
    p[B].waiting = 4.0
    assert await p.use(legal) is p[A]
    assert p.observed == ["load"]


# -- spill ------------------------------------------------------------------------------------


async def test_spill_when_the_holder_carries_threshold_more_than_the_coolest() -> None:
    p = Pool(A, B, spill_threshold=16)
    legal = ver("legal")
    await p[A].residency.ensure(legal)
    p[A].waiting = 15.0  # 15 more than B: below the threshold
    assert await p.use(legal) is p[A]
    assert p.observed == ["hit"]
    p[A].waiting = 16.0  # exactly the threshold
    assert await p.use(legal) is p[B]
    assert p.observed == ["hit", "spill"]
    assert p[B].picks == {"spill": 1}
    assert p[B].residency.is_registered(legal.served_name)
    assert p[A].residency.is_registered(legal.served_name)  # still there too
    assert p.pool.registered_names() == [legal.served_name]
    # Both hold it now: the cooler holder is a hit, not another spill.
    assert await p.use(legal) is p[B]
    assert p.observed == ["hit", "spill", "hit"]


async def test_spill_counts_this_gateways_requests_in_flight() -> None:
    p = Pool(A, B, spill_threshold=2)
    legal = ver("legal")
    await p[A].residency.ensure(legal)
    leases = [await p.pool.acquire(legal), await p.pool.acquire(legal)]
    assert [lease.member for lease in leases] == [p[A], p[A]]  # loads 0 then 1 vs B's 0
    assert p[A].in_flight == 2
    third = await p.pool.acquire(legal)  # A carries 2 more than B: spill
    assert third.member is p[B]
    assert p.observed == ["hit", "hit", "spill"]
    assert p.pool.in_flight(legal.served_name) == 3
    for lease in (*leases, third):
        lease.release()
    assert p.pool.leases_in_flight() == 0
    assert p.pool.in_flight(legal.served_name) == 0


async def test_no_spill_when_every_engine_holds_it_already() -> None:
    p = Pool(A, B, spill_threshold=1)
    legal = ver("legal")
    for m in (p[A], p[B]):
        await m.residency.ensure(legal)
    p[A].waiting = 50.0
    assert await p.use(legal) is p[B]
    assert p.observed == ["hit"]


# -- base model, leases -------------------------------------------------------------------------


async def test_base_requests_go_to_the_least_loaded_engine() -> None:
    p = Pool(A, B)
    await p[B].residency.ensure(ver("legal"))  # affinity plays no part for the base
    p[B].waiting = 2.0
    lease = await p.pool.acquire(None)
    assert isinstance(lease, EngineLease)
    assert lease.member is p[A]
    assert lease.engine is p.fakes[A]
    assert lease.served_name == "base"
    assert p[A].in_flight == 1
    second = await p.pool.acquire(None)  # A: 1 in flight, B: 2 waiting
    assert second.member is p[A]
    third = await p.pool.acquire(None)  # A: 2, B: 2 -> either
    assert p.observed == ["base", "base", "base"]
    assert p[A].picks.get("base", 0) + p[B].picks.get("base", 0) == 3
    for held in (lease, second, third):
        held.release()
    assert p[A].in_flight == p[B].in_flight == 0
    assert p.fakes[A].load_calls == []


async def test_lease_release_is_idempotent() -> None:
    p = Pool(A)
    legal = ver("legal")
    lease = await p.pool.acquire(legal)
    assert lease.member.in_flight == 1
    assert p.pool.in_flight(legal.served_name) == 1
    lease.release()
    lease.release()
    assert lease.member.in_flight == 0
    assert p.pool.in_flight(legal.served_name) == 0
    base = await p.pool.acquire(None)
    base.release()
    base.release()
    assert p[A].in_flight == 0


async def test_single_engine_hit_and_load() -> None:
    p = Pool(A)
    legal = ver("legal")
    assert await p.use(legal) is p[A]
    assert await p.use(legal) is p[A]
    assert p.observed == ["load", "hit"]


async def test_failed_registration_restores_in_flight() -> None:
    p = Pool(A, B)
    p.fakes[A].refuse("bad")
    p.fakes[B].refuse("bad")
    with pytest.raises(AdapterLoadFailed, match="bad rank"):
        await p.pool.acquire(ver("bad"))
    assert p[A].in_flight == p[B].in_flight == 0
    assert p.observed == []  # nothing was picked


# -- usable engines -----------------------------------------------------------------------------


async def test_excluded_engine_is_skipped() -> None:
    p = Pool(A, B)
    legal = ver("legal")
    await p[A].residency.ensure(legal)
    lease = await p.pool.acquire(legal, exclude=(p[A],))
    assert lease.member is p[B]
    assert p.observed == ["load"]  # B did not hold it: registered there
    assert p[B].residency.is_registered(legal.served_name)
    lease.release()
    base = await p.pool.acquire(None, exclude=[p[B]])
    assert base.member is p[A]
    base.release()


async def test_suspect_engine_is_skipped_until_cleared() -> None:
    p = Pool(A, B)
    legal = ver("legal")
    await p[A].residency.ensure(legal)
    p.pool.set_suspect(p[A])
    assert p[A].suspect
    assert not p[A].usable
    assert p.pool.usable_count == 1
    assert await p.use(legal) is p[B]
    assert await p.use(None) is p[B]
    p[A].suspect = False  # what the watcher does on a good probe
    p.pool.refresh()
    assert p.pool.usable_count == 2
    p[B].waiting = 1.0
    assert await p.use(None) is p[A]


async def test_engine_not_up_is_skipped() -> None:
    p = Pool(A, B)
    p[A].up = False
    p.pool.refresh()
    for _ in range(3):
        assert await p.use(ver("legal")) is p[B]
    assert p.pool.up  # B is
    assert not p.pool.ready  # nobody reconciled yet
    p[B].reconciled = True
    assert p.pool.ready


async def test_no_usable_engine_is_engine_unavailable() -> None:
    p = Pool(A, B)
    p.pool.set_suspect(p[A])
    with pytest.raises(EngineUnavailable) as excinfo:
        await p.pool.acquire(ver("legal"), exclude=(p[B],))
    assert excinfo.value.error_code == "engine_unavailable"
    assert excinfo.value.status == 503
    assert excinfo.value.headers == {"Retry-After": "5"}
    p.pool.set_suspect(p[B])
    for version in (ver("legal"), None):
        with pytest.raises(EngineUnavailable):
            await p.pool.acquire(version)
    with pytest.raises(EngineUnavailable):
        await p.pool.ensure(ver("legal"))
    assert p[A].in_flight == p[B].in_flight == 0
    assert p.fakes[A].load_calls == p.fakes[B].load_calls == []
    assert p.observed == []


async def test_members_start_down() -> None:
    p = Pool(A, B, up=False)
    assert len(p.pool) == 2
    assert not p.pool.up
    assert p.pool.usable_count == 0
    with pytest.raises(EngineUnavailable):
        await p.pool.acquire(None)


# -- the aggregate view -------------------------------------------------------------------------


async def test_aggregates_over_engines() -> None:
    p = Pool(A, B)
    legal, medical = ver("legal"), ver("medical")
    await p[A].residency.ensure(legal)
    await p[B].residency.ensure(legal)
    await p[B].residency.ensure(medical)
    assert p.pool.is_registered(legal.served_name)
    assert p.pool.is_registered(medical.served_name)
    assert not p.pool.is_registered(ver("finance").served_name)
    assert sorted(p.pool.registered_names()) == sorted([legal.served_name, medical.served_name])
    assert len(p.pool.registered_names()) == 2  # distinct names
    assert sorted((m.url, s.version.name) for m, s in p.pool.slots()) == [
        (A, "legal"),
        (B, "legal"),
        (B, "medical"),
    ]
    held = [await p.pool.acquire(legal, exclude=(p[B],)), await p.pool.acquire(legal)]
    assert p.pool.in_flight(legal.served_name) == 2
    assert p.pool.leases_in_flight() == 2
    for lease in held:
        lease.release()

    p.pool.set_pinned(legal.served_name, True)
    assert all(s.pinned for _, s in p.pool.slots() if s.version.name == "legal")
    assert not any(s.pinned for _, s in p.pool.slots() if s.version.name == "medical")
    p.pool.set_pinned(legal.served_name, False)
    assert not any(s.pinned for _, s in p.pool.slots())

    assert await p.pool.unregister(legal.served_name)
    assert not p.pool.is_registered(legal.served_name)
    assert p.fakes[A].unload_calls == [legal.served_name]
    assert p.fakes[B].unload_calls == [legal.served_name]
    assert p.pool.registered_names() == [medical.served_name]
    assert not await p.pool.unregister(legal.served_name)  # nowhere any more


async def test_ensure_registers_on_every_usable_engine() -> None:
    p = Pool(A, B, C)
    p.pool.set_suspect(p[C])
    legal = ver("legal", pinned=True)
    await p.pool.ensure(legal)
    assert p[A].residency.is_registered(legal.served_name)
    assert p[B].residency.is_registered(legal.served_name)
    assert not p[C].residency.is_registered(legal.served_name)
    assert p.fakes[C].load_calls == []
    assert p.pool.in_flight(legal.served_name) == 0
    assert p.observed == []  # not a request: no pick
    await p.pool.ensure(legal)  # again: nothing more to do
    assert len(p.fakes[A].load_calls) == len(p.fakes[B].load_calls) == 1


async def test_budget_is_per_engine_and_applies_to_every_member() -> None:
    p = Pool(A, B, budget=3)
    assert p.pool.budget == 3
    assert all(m.residency.budget == 3 for m in p.pool)
    p.pool.budget = 1
    assert p.pool.budget == 1
    assert [m.residency.budget for m in p.pool] == [1, 1]
    joined = p.pool.add(C)  # a newcomer gets the current budget
    assert joined.residency.budget == 1
    assert p.pool.add(C) is joined  # adding a known URL keeps the member
    assert len(p.pool) == 3
    # With a budget of 1 each engine holds one version: a second one on A evicts the first.
    await p[A].residency.ensure(ver("x"))
    await p[A].residency.ensure(ver("y"))
    assert p[A].residency.registered_names() == [ver("y").served_name]
    assert p.fakes[A].unload_calls == [ver("x").served_name]


async def test_remove_forgets_the_engine_and_its_registrations() -> None:
    p = Pool(A, B)
    legal = ver("legal")
    await p[A].residency.ensure(legal)
    held = await p.pool.acquire(legal)
    member = p[A]
    assert held.member is member
    removed = p.pool.remove(A)
    assert removed is member
    assert not member.residency.is_registered(legal.served_name)  # marked lost
    assert [m.url for m in p.pool] == [B]
    assert p.pool.usable_count == 1
    assert not p.pool.is_registered(legal.served_name)
    assert p.pool.remove(A) is None
    # A request already on the removed engine runs to its end.
    held.release()
    assert member.in_flight == 0
    assert await p.use(legal) is p[B]
    assert p.observed == ["hit", "load"]


async def test_mark_engine_lost_everywhere() -> None:
    p = Pool(A, B)
    await p[A].residency.ensure(ver("x"))
    await p[B].residency.ensure(ver("y"))
    p.pool.mark_engine_lost()
    assert p.pool.registered_names() == []
    assert len(p.pool.slots()) == 2  # recency kept for the reconcile


# -- queue depth from vLLM's /metrics -----------------------------------------------------------

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="base"} 3.0
vllm:num_requests_running{model_name="base",engine="1"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="base"} 4.0
vllm:num_requests_waiting{model_name="base",engine="1"} 2.5
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="base"} 9.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="base"} 0.25
# HELP vllm:num_preemptions_total Cumulative number of preemptions.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{model_name="base"} 7.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 11.0
"""


def test_parse_engine_load_sums_label_sets() -> None:
    load = parse_engine_load(VLLM_METRICS)
    assert load == EngineLoad(waiting=6.5, running=4.0)


def test_parse_engine_load_without_labels_and_crlf() -> None:
    text = "vllm:num_requests_waiting 2\r\nvllm:num_requests_running 1\r\n"
    assert parse_engine_load(text) == EngineLoad(waiting=2.0, running=1.0)


def test_parse_engine_load_one_series_only() -> None:
    text = 'vllm:num_requests_waiting{model_name="base"} 5.0\n'
    assert parse_engine_load(text) == EngineLoad(waiting=5.0, running=0.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\n",
        'vllm:num_requests_swapped{model_name="base"} 9.0\nprocess_open_fds 12.0\n',
        'vllm:num_requests_waiting{model_name="base"} not-a-number\n',
        "<html>502 Bad Gateway</html>",
    ],
    ids=["empty", "help-only", "other-series", "bad-value", "not-metrics"],
)
def test_parse_engine_load_without_the_series_is_none(text: str) -> None:
    assert parse_engine_load(text) is None
