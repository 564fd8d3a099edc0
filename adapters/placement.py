"""Placement of requests and adapters across engines: adapter affinity first, then load.

One `Residency` per engine says what is registered there. A request for an adapter goes to the
least-loaded usable engine that already has it registered ("hit"); when none has it, it is
registered on the least-loaded engine that another gateway replica already registered it on
(the engine's own model list, read each health round), else on the least-loaded engine, ties
going to the engine with fewer registrations ("load"). Affinity yields to load: when the
coolest holder carries `spill_threshold` more requests than the coolest engine overall, the
adapter is registered there too ("spill"), so a hot adapter ends up on several engines.
Base-model requests go to the least-loaded engine.

Load of an engine = this gateway's requests in flight to it (exact, updated per request) + the
engine's own waiting queue (vLLM's `num_requests_waiting`, scraped each health round, so other
gateway replicas' traffic counts too).

An engine is usable while its last health probe passed and no request failed to reach it since
(`suspect`: set by the request path, cleared by the next good probe). The pool also answers the
aggregate questions the single-engine code asked one `Residency` (in flight, registered,
unregister everywhere, pin everywhere), so operator workflows do not care how many engines run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field

from adapters.loader import Lease, Residency, Slot
from adapters.types import AdapterVersion
from server.errors import EngineUnavailable
from server.upstream import EngineClient

PickObserver = Callable[[str], None]
"""Called with how an engine was picked: hit, load, spill or base."""


@dataclass(eq=False, slots=True)
class EngineMember:
    """One engine: its client, what is registered on it, what the watcher last saw of it."""

    url: str
    client: EngineClient
    residency: Residency
    up: bool = False
    reconciled: bool = False
    suspect: bool = False
    suspect_since: float = 0.0  # monotonic; only a probe begun later clears `suspect`
    restarts_seen: int = 0
    in_flight: int = 0
    waiting: float = 0.0
    running: float = 0.0
    reconcile_wanted: bool = False
    picks: dict[str, int] = field(default_factory=dict)
    # What the engine serves, whoever registered it (other gateway replicas too), as of the
    # last health round: placement prefers an engine that already has an adapter warm.
    served: frozenset[str] = frozenset()

    @property
    def usable(self) -> bool:
        return self.up and not self.suspect

    @property
    def load(self) -> float:
        return self.in_flight + self.waiting


class EngineLease:
    """Held while a request uses an engine (and, for an adapter, its registration there);
    `release` is idempotent (streams close late)."""

    __slots__ = ("_inner", "_released", "engine", "member", "served_name")

    def __init__(self, member: EngineMember, inner: Lease | None, served_name: str) -> None:
        self.member = member
        self.engine = member.client
        self._inner = inner
        self.served_name = served_name
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.member.in_flight -= 1
            if self._inner is not None:
                self._inner.release()


ResidencyFactory = Callable[[EngineClient], Residency]
ClientFactory = Callable[[str], EngineClient]


class EnginePool:
    """The engines a gateway sends work to, and where each adapter version is registered."""

    def __init__(
        self,
        connect: ClientFactory,
        residency: ResidencyFactory,
        urls: Iterable[str],
        *,
        base_name: str,
        budget: int,
        spill_threshold: int = 16,
        retry_after_s: int = 1,
        on_pick: PickObserver | None = None,
    ) -> None:
        self._connect = connect
        self._residency = residency
        self.base_name = base_name
        self._budget = budget
        self.spill_threshold = spill_threshold
        self.retry_after_s = retry_after_s
        self._on_pick = on_pick
        self._members: dict[str, EngineMember] = {}
        self._usable: list[EngineMember] = []  # recomputed when a member's state changes
        for url in urls:
            self.add(url)

    # -- membership ------------------------------------------------------------------------------

    def add(self, url: str) -> EngineMember:
        member = self._members.get(url)
        if member is None:
            client = self._connect(url)
            member = self._members[url] = EngineMember(url, client, self._residency(client))
            member.residency.budget = self._budget
        return member

    @property
    def budget(self) -> int:
        """Registrations per engine."""
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        self._budget = value
        for m in self._members.values():
            m.residency.budget = value

    def remove(self, url: str) -> EngineMember | None:
        """Forget an engine (discovery no longer lists it); requests on it run to their end."""
        member = self._members.pop(url, None)
        if member is not None:
            member.residency.mark_engine_lost()
            self.refresh()
        return member

    def refresh(self) -> None:
        """Recompute the usable set after a member's `up` / `suspect` changed."""
        self._usable = [m for m in self._members.values() if m.usable]

    def set_suspect(self, member: EngineMember) -> None:
        """A request could not reach `member`: skip it until its next good health probe."""
        member.suspect = True
        member.suspect_since = time.monotonic()
        self.refresh()

    @property
    def members(self) -> list[EngineMember]:
        return list(self._members.values())

    def __iter__(self) -> Iterator[EngineMember]:
        return iter(list(self._members.values()))

    def __len__(self) -> int:
        return len(self._members)

    @property
    def up(self) -> bool:
        return any(m.up for m in self._members.values())

    @property
    def ready(self) -> bool:
        """At least one engine is up with the desired adapters registered."""
        return any(m.up and m.reconciled for m in self._members.values())

    @property
    def usable_count(self) -> int:
        return len(self._usable)

    # -- request path ------------------------------------------------------------------------

    async def acquire(
        self, version: AdapterVersion | None, exclude: Collection[EngineMember] = ()
    ) -> EngineLease:
        """An engine for one request (and `version` registered on it; None: the base model)."""
        members = self._usable
        if exclude:
            members = [m for m in members if m not in exclude]
        if not members:
            raise self._not_ready()
        if version is None:
            member = members[0] if len(members) == 1 else _coolest(members)
            member.in_flight += 1
            self._observe(member, "base")
            return EngineLease(member, None, self.base_name)
        name = version.served_name
        if len(members) == 1:
            member = members[0]
            how = "hit" if member.residency.is_routable(name) else "load"
        else:
            member, how = self._place(members, name)
        member.in_flight += 1  # before awaiting: concurrent picks see this one
        try:
            inner = await member.residency.acquire(version)
        except BaseException:
            member.in_flight -= 1
            raise
        self._observe(member, how)
        return EngineLease(member, inner, name)

    def _place(self, members: list[EngineMember], name: str) -> tuple[EngineMember, str]:
        holders = [m for m in members if m.residency.is_routable(name)]
        if not holders:
            coolest = _coolest(members, spread=True)
            warm = [m for m in members if name in m.served]  # registered by another replica
            if warm:
                best = _coolest(warm)
                if best.load - coolest.load < self.spill_threshold:
                    return best, "load"
            return coolest, "load"
        best = _coolest(holders)
        if len(holders) < len(members):
            coolest = _coolest(members, spread=True)
            if best.load - coolest.load >= self.spill_threshold:
                return coolest, "spill"
        return best, "hit"

    def _not_ready(self) -> EngineUnavailable:
        return EngineUnavailable(
            "The inference engine is not ready.", retry_after_s=self.retry_after_s
        )

    def _observe(self, member: EngineMember, how: str) -> None:
        member.picks[how] = member.picks.get(how, 0) + 1
        if self._on_pick is not None:
            self._on_pick(how)

    # -- the aggregate view (operator workflows, admin, tests) --------------------------------

    def slots(self) -> list[tuple[EngineMember, Slot]]:
        return [(m, s) for m in self._members.values() for s in m.residency.slots()]

    def registered_names(self) -> list[str]:
        names: dict[str, None] = {}
        for m in self._members.values():
            names.update(dict.fromkeys(m.residency.registered_names()))
        return list(names)

    def is_registered(self, served_name: str) -> bool:
        return any(m.residency.is_registered(served_name) for m in self._members.values())

    def in_flight(self, served_name: str) -> int:
        return sum(m.residency.in_flight(served_name) for m in self._members.values())

    def leases_in_flight(self) -> int:
        return sum(m.in_flight for m in self._members.values())

    def set_pinned(self, served_name: str, pinned: bool) -> None:
        for m in self._members.values():
            m.residency.set_pinned(served_name, pinned)

    async def ensure(self, version: AdapterVersion) -> None:
        """Register on every usable engine (a pinned version is resident everywhere)."""
        members = list(self._usable)
        if not members:
            raise self._not_ready()
        await asyncio.gather(*(m.residency.ensure(version) for m in members))

    async def unregister(self, served_name: str, *, drain_timeout_s: float | None = None) -> bool:
        """Take a version off every engine once its requests there finished."""
        done = await asyncio.gather(
            *(
                m.residency.unregister(served_name, drain_timeout_s=drain_timeout_s)
                for m in list(self._members.values())
            )
        )
        return any(done)

    def mark_engine_lost(self) -> None:
        for m in self._members.values():
            m.residency.mark_engine_lost()


def _coolest(members: list[EngineMember], *, spread: bool = False) -> EngineMember:
    """The least-loaded member; ties broken by fewer registrations when placing an adapter
    (`spread`), then at random (so idle engines share new work)."""
    if spread:
        key: Callable[[EngineMember], tuple[float, int, float]] = lambda m: (  # noqa: E731
            m.load,
            len(m.residency.registered_names()),
            random.random(),  # noqa: S311
        )
    else:
        key = lambda m: (m.load, 0, random.random())  # noqa: E731,S311
    return min(members, key=key)
