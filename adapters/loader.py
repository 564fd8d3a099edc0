"""Engine residency: which adapter versions are registered on the engine, and for how long.

vLLM moves registered adapters between disk, its CPU cache and its active LoRA slots by
itself (`--max-loras`, `--max-cpu-loras`); that LRU is not re-implemented here. What the
gateway owns is the engine's *registration list*: bounded by a budget, least-recently-used
unpinned versions are unregistered to make room, a version with requests in flight is never
unregistered (leases count them; eviction and retirement wait for the drain), concurrent first
requests share one registration, and after an engine restart pinned and recently used versions
are registered again (`reconcile`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from adapters.types import AdapterVersion
from server.errors import EngineUnavailable, LoraplexError

log = logging.getLogger("loraplex.residency")


class EngineAdapterAPI(Protocol):
    """The part of the engine client residency needs (vLLM's runtime LoRA API)."""

    async def load_adapter(self, engine_name: str, path: str) -> None: ...

    async def unload_adapter(self, engine_name: str) -> None: ...

    async def served_models(self) -> set[str]: ...


class AdapterCapacity(EngineUnavailable):
    """Every registered adapter is pinned or busy: retry shortly."""

    code = "adapter_capacity"


ResidencyObserver = Callable[[str, str, float], None]
"""Called as (adapter name, event, seconds): load, load_error, unload, evict, hit, miss."""


@dataclass(slots=True)
class Slot:
    version: AdapterVersion
    registered: bool = False
    refs: int = 0
    pinned: bool = False
    last_used: float = field(default_factory=time.monotonic)
    loading: asyncio.Future[None] | None = None
    draining: bool = False


class Lease:
    """Held while a request uses a version; `release` is idempotent (streams close late)."""

    __slots__ = ("_released", "_residency", "slot")

    def __init__(self, residency: Residency, slot: Slot) -> None:
        self._residency = residency
        self.slot = slot
        self._released = False

    @property
    def served_name(self) -> str:
        return self.slot.version.served_name

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._residency._release(self.slot)


class Residency:
    """Registration of adapter versions on one engine."""

    def __init__(
        self,
        engine: EngineAdapterAPI,
        budget: int,
        *,
        drain_timeout_s: float = 30.0,
        retry_after_s: int = 1,
        observer: ResidencyObserver | None = None,
    ) -> None:
        if budget < 1:
            raise ValueError("the registration budget must be at least 1")
        self._engine = engine
        self.budget = budget
        self.drain_timeout_s = drain_timeout_s
        self.retry_after_s = retry_after_s
        self._observer = observer
        self._slots: OrderedDict[str, Slot] = OrderedDict()  # LRU first
        self._space = asyncio.Lock()  # one registration/eviction at a time
        self._changed = asyncio.Event()  # a lease was released or a slot freed

    # -- views -----------------------------------------------------------------------------------

    def slots(self) -> list[Slot]:
        return list(self._slots.values())

    def registered_names(self) -> list[str]:
        return [n for n, s in self._slots.items() if s.registered]

    def is_registered(self, served_name: str) -> bool:
        slot = self._slots.get(served_name)
        return slot is not None and slot.registered

    def is_routable(self, served_name: str) -> bool:
        """Registered and not being taken off: a lease on it needs no engine call."""
        slot = self._slots.get(served_name)
        return slot is not None and slot.registered and not slot.draining

    def in_flight(self, served_name: str) -> int:
        slot = self._slots.get(served_name)
        return 0 if slot is None else slot.refs

    # -- request path ------------------------------------------------------------------------

    async def acquire(self, version: AdapterVersion) -> Lease:
        """A lease on `version`, registering it first if needed (one engine call per version)."""
        name = version.served_name
        slot = self._slots.get(name)
        if slot is not None and slot.registered and not slot.draining:
            slot.refs += 1
            slot.last_used = time.monotonic()
            self._slots.move_to_end(name)
            self._observe(version.name, "hit", 0.0)
            return Lease(self, slot)
        self._observe(version.name, "miss", 0.0)
        while True:
            slot = self._slots.get(name)
            if slot is None or slot.draining:
                if slot is not None and slot.draining:
                    await self._wait_changed(self.drain_timeout_s)
                    continue
                slot = self._slots[name] = Slot(version, pinned=version.pinned)
            if slot.registered:
                slot.refs += 1
                slot.last_used = time.monotonic()
                self._slots.move_to_end(name)
                return Lease(self, slot)
            if slot.loading is None:
                slot.loading = asyncio.get_running_loop().create_future()
                loading = slot.loading
                try:
                    await self._register(slot)
                except BaseException as exc:
                    if self._slots.get(name) is slot and not slot.registered:
                        del self._slots[name]
                    if isinstance(exc, Exception):
                        loading.set_exception(exc)
                        loading.exception()  # waiters re-raise it; don't warn if there are none
                    else:
                        loading.cancel()
                    raise
                finally:
                    slot.loading = None
                loading.set_result(None)
            else:
                try:
                    await asyncio.shield(slot.loading)
                except asyncio.CancelledError:
                    if slot.loading is not None and not slot.loading.cancelled():
                        raise  # we were cancelled, not the loader
                    continue  # the loader was cancelled: try ourselves

    def _release(self, slot: Slot) -> None:
        slot.refs -= 1
        slot.last_used = time.monotonic()
        if slot.refs == 0:
            self._changed.set()

    # -- operator actions ----------------------------------------------------------------------

    async def ensure(self, version: AdapterVersion) -> None:
        """Register without holding a lease (smoke test, warm-up)."""
        (await self.acquire(version)).release()

    def set_pinned(self, served_name: str, pinned: bool) -> None:
        slot = self._slots.get(served_name)
        if slot is not None:
            slot.pinned = pinned

    async def unregister(self, served_name: str, *, drain_timeout_s: float | None = None) -> bool:
        """Take a version off the engine after its in-flight requests finish (or time out).
        New requests for it wait and then register it again only if they still resolve to it."""
        slot = self._slots.get(served_name)
        if slot is None:
            return False
        async with self._space:
            slot.draining = True
            try:
                await self._drain(
                    slot, self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
                )
                if slot.registered:
                    await self._unload(slot, "unload")
            finally:
                slot.draining = False
                if self._slots.get(served_name) is slot and not slot.registered:
                    del self._slots[served_name]
                self._changed.set()
        return True

    async def reconcile(
        self, known: Mapping[str, AdapterVersion], pinned: Iterable[AdapterVersion]
    ) -> list[str]:
        """After an engine (or gateway) start: adopt the versions the engine still serves
        (`known`: served name → routable version), then register again what it lost and the
        pinned versions (pinned first, then most recently used) up to the budget."""
        served = await self._engine.served_models()
        lost: list[AdapterVersion] = []
        for name, slot in list(self._slots.items()):
            slot.registered = name in served
            if not slot.registered and slot.refs == 0 and slot.loading is None:
                del self._slots[name]
                if name in known:
                    lost.append(slot.version)
        for name in served:
            version = known.get(name)
            if version is not None and name not in self._slots:
                self._slots[name] = Slot(version, registered=True, pinned=version.pinned)
                self._slots.move_to_end(name, last=False)  # adopted: least recently used
        recency = {v.served_name: i for i, v in enumerate(lost)}  # lost: LRU first
        warm = {v.served_name: v for v in [*pinned, *lost] if v.served_name in known}
        order = sorted(warm.values(), key=lambda v: (not v.pinned, -recency.get(v.served_name, -1)))
        done = []
        for version in order[: self.budget]:
            if self.is_registered(version.served_name):
                continue
            try:
                await self.ensure(version)
            except LoraplexError as exc:
                log.warning(
                    "re-registration failed", extra={"adapter": version.label, "error": exc.message}
                )
                continue
            done.append(version.served_name)
        return done

    def mark_lost(self, served_name: str) -> None:
        """The engine no longer has this version (it answered 404): the next lease registers
        it again; in-flight leases keep their slot."""
        slot = self._slots.get(served_name)
        if slot is not None and slot.loading is None:
            slot.registered = False
            self._changed.set()

    def mark_engine_lost(self) -> None:
        """The engine went away: nothing is registered on it any more (recency is kept)."""
        for slot in self._slots.values():
            slot.registered = False
        self._changed.set()

    # -- internals -------------------------------------------------------------------------------

    async def _register(self, slot: Slot) -> None:
        async with self._space:
            await self._make_room(slot)
            started = time.perf_counter()
            try:
                await self._engine.load_adapter(slot.version.served_name, slot.version.path)
            except Exception:
                self._observe(slot.version.name, "load_error", time.perf_counter() - started)
                raise
            slot.registered = True
            slot.last_used = time.monotonic()
            self._observe(slot.version.name, "load", time.perf_counter() - started)

    async def _make_room(self, newcomer: Slot) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while sum(s.registered for s in self._slots.values()) >= self.budget:
            victim = next(
                (
                    s
                    for s in self._slots.values()  # least recently used first
                    if s.registered and s.refs == 0 and not s.pinned and s is not newcomer
                ),
                None,
            )
            if victim is not None:
                await self._unload(victim, "evict")
                if victim.refs == 0 and victim.loading is None:
                    self._slots.pop(victim.version.served_name, None)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AdapterCapacity(
                    "Every adapter slot of the engine is pinned or busy; retry shortly.",
                    retry_after_s=self.retry_after_s,
                )
            await self._wait_changed(remaining)

    async def _unload(self, slot: Slot, event: str) -> None:
        started = time.perf_counter()
        slot.registered = False  # unroutable before the engine call: no new lease races in
        try:
            await self._engine.unload_adapter(slot.version.served_name)
        except LoraplexError as exc:
            # Unknown to the engine already is fine; anything else: it may still hold it.
            log.warning(
                "unload failed", extra={"adapter": slot.version.label, "error": exc.message}
            )
        self._observe(slot.version.name, event, time.perf_counter() - started)

    async def _drain(self, slot: Slot, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while slot.refs > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "drain timed out", extra={"adapter": slot.version.label, "in_flight": slot.refs}
                )
                return
            await self._wait_changed(remaining)

    async def _wait_changed(self, timeout_s: float) -> None:
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass

    def _observe(self, name: str, event: str, seconds: float) -> None:
        if self._observer is not None:
            self._observer(name, event, seconds)
