"""The engine watcher: health, queue depth and adapter reconciliation of every engine, engine
discovery, and following other replicas' registry changes.

One task per gateway runs `watch_engines`. Each round probes every engine at once; an engine
that (re)appears gets its pinned and recently used adapters registered again, one that goes
away loses its registrations here (requests then place its adapters elsewhere, on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from urllib.parse import urlsplit, urlunsplit

from adapters.placement import EngineMember
from adapters.registry import SYSTEM, RegistryUnavailable
from adapters.types import VersionState
from server.errors import LoraplexError
from server.routes.admin_drift import sync_drift
from server.settings import EngineSettings
from server.state import GatewayState

log = logging.getLogger("loraplex.engine")


async def watch_engines(state: GatewayState, bootstrap: dict[str, str]) -> None:
    """Track every engine; register the bootstrap adapters once one is up; follow the
    registry; re-resolve the engines' DNS name when discovery is on."""
    settings = state.settings
    interval = settings.engine.health_interval_s
    next_poll = next_discovery = 0.0
    while True:
        # Consume the wake-up flag every round: left set, the wait below would spin.
        wanted = state.reconcile_wanted.is_set()
        state.reconcile_wanted.clear()
        if settings.engine.discovery_dns and time.monotonic() >= next_discovery:
            next_discovery = time.monotonic() + settings.engine.discovery_interval_s
            try:
                await discover(state)
            except Exception:  # a bug must not stop the watcher for good
                log.exception("engine discovery crashed")
        members = state.engines.members
        probed_at = time.monotonic()
        ups = await asyncio.gather(*(m.client.health() for m in members))
        if bootstrap and any(ups):
            for member, up in zip(members, ups, strict=True):
                member.up = member.up or up  # the smoke generation needs a usable engine
            state.engines.refresh()
            await register_bootstrap(state, bootstrap)
            bootstrap = {}
        rounds = await asyncio.gather(
            *(
                watch_one(state, m, up, wanted, probed_at)
                for m, up in zip(members, ups, strict=True)
            ),
            return_exceptions=True,
        )
        for member, outcome in zip(members, rounds, strict=True):
            if isinstance(outcome, Exception):  # a bug must not stop the watcher for good
                log.error("engine round failed", exc_info=outcome, extra={"engine": member.url})
        state.engines.refresh()
        if time.monotonic() >= next_poll:
            next_poll = time.monotonic() + settings.registry.poll_interval_s
            await follow_registry(state)
        update_gauges(state)
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that races with
        # the event being set, and the lifespan's `await watcher` then never returns.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await state.reconcile_wanted.wait()


async def watch_one(
    state: GatewayState, member: EngineMember, up: bool, wanted: bool, probed_at: float
) -> None:
    """One engine's round: note its load, reconcile it when it (re)appeared or lost adapters.
    A probe begun before a request failed on the engine does not clear that suspicion."""
    wanted = wanted or member.reconcile_wanted
    member.reconcile_wanted = False
    if up:
        load = await member.client.load()
        if load is not None:
            member.waiting, member.running = load.waiting, load.running
        try:
            member.served = frozenset(await member.client.served_models())
        except Exception as exc:  # the next probe (or reconcile) tells what is wrong
            log.debug(
                "engine model list unavailable", extra={"engine": member.url, "error": str(exc)}
            )
        else:
            if member.up and member.reconciled and not wanted:
                wanted = engine_lost_adapters(member)
    if up and (not member.up or not member.reconciled or wanted):
        member.up = True
        try:
            await reconcile_engine(state, member)
            member.reconciled = True
        except LoraplexError as exc:
            log.warning(
                "adapter reconcile failed", extra={"engine": member.url, "error": exc.message}
            )
            member.reconciled = False
        except Exception:  # a bug must not stop the watcher (and readiness) for good
            log.exception("adapter reconcile crashed", extra={"engine": member.url})
            member.reconciled = False
    elif not up and member.up:
        log.warning("engine is down", extra={"engine": member.url})
        member.restarts_seen += 1
        member.residency.mark_engine_lost()
        member.reconciled = False
    member.up = up
    if up and member.suspect_since < probed_at:
        member.suspect = False


def engine_lost_adapters(member: EngineMember) -> bool:
    """An engine restarted between two health probes never looked down (tests/faults): what
    it serves lacks something registered on it, so reconcile it."""
    missing = set(member.residency.registered_names()) - member.served
    if missing:
        log.warning(
            "engine lost registered adapters (restarted?)",
            extra={"engine": member.url, "count": len(missing)},
        )
    return bool(missing)


async def register_bootstrap(state: GatewayState, adapters: dict[str, str]) -> None:
    for name, source in adapters.items():
        try:
            # The file says what `name` means now: its content becomes `stable`.
            version, created = await state.lifecycle.register(name, source, SYSTEM, alias="stable")
        except LoraplexError as exc:
            log.error(
                "bootstrap adapter refused",
                extra={"adapter": name, "code": exc.error_code, "error": exc.message},
            )
            continue
        log.info("bootstrap adapter", extra={"adapter": version.label, "new": created})


async def reconcile_engine(state: GatewayState, member: EngineMember) -> None:
    snap = state.registry.snapshot
    known = {v.served_name: v for v in snap.versions.values() if v.routable}
    await member.residency.reconcile(known, [v for v in known.values() if v.pinned])


async def follow_registry(state: GatewayState) -> None:
    """Another replica changed the registry: apply pins and drop what is no longer routable.

    The database may be away for a while (the registry logs when an outage starts and ends):
    requests keep the last snapshot, and this never raises, since it runs inside the engine
    watcher, which must keep tracking the engines meanwhile."""
    try:
        changed = await state.registry.refresh_if_changed()
        if changed:
            await sync_drift(state)  # another replica may have set or reset a drift reference
    except RegistryUnavailable:
        return  # polled again next round
    except Exception:
        log.exception("registry refresh failed")
        return
    if not changed:
        return
    versions = state.registry.snapshot.versions
    for member in state.engines:
        for slot in member.residency.slots():
            version = versions.get((slot.version.name, slot.version.version))
            if version is None or version.state in (VersionState.RETIRED, VersionState.REJECTED):
                state.background(member.residency.unregister(slot.version.served_name))
            elif version.routable:
                member.residency.set_pinned(version.served_name, version.pinned)
                if version.pinned and not slot.registered and member.usable:
                    member.reconcile_wanted = True  # pinned elsewhere: register here too
            # registered / validated: a registration is running its smoke generation.


async def discover(state: GatewayState) -> None:
    """Resolve the engines' DNS name: new addresses join, vanished ones leave the pool."""
    engine = state.settings.engine
    assert engine.discovery_dns is not None
    try:
        urls = await resolve_engine_urls(engine, engine.discovery_dns)
    except OSError as exc:  # keep the engines we have: DNS may be back next round
        log.warning(
            "engine discovery failed", extra={"dns_name": engine.discovery_dns, "error": str(exc)}
        )
        return
    if not urls:
        log.warning("engine discovery found no engine", extra={"dns_name": engine.discovery_dns})
        return
    current = {m.url for m in state.engines}
    for url in sorted(urls - current):
        log.info("engine joined", extra={"engine": url})
        state.engines.add(url)
    for url in sorted(current - urls):
        log.warning("engine left", extra={"engine": url})
        state.engines.remove(url)
        state.metrics.forget_engine(url)


async def resolve_engine_urls(engine: EngineSettings, name: str) -> set[str]:
    """Every address of `name` as an engine URL with the scheme and port of `engine.url`."""
    parts = urlsplit(engine.url)
    port = engine.port
    infos = await asyncio.get_running_loop().getaddrinfo(
        name, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    urls = set()
    for family, *_, sockaddr in infos:
        host = str(sockaddr[0])
        netloc = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        urls.add(urlunsplit((parts.scheme, netloc, "", "", "")))
    return urls


def update_gauges(state: GatewayState) -> None:
    m = state.metrics
    pool = state.engines
    m.engine_up.set(1 if pool.up else 0)
    m.engines_up.set(sum(1 for e in pool if e.up))
    m.adapters_resident.set(len(pool.registered_names()))
    for e in pool:
        m.engine_in_flight.labels(e.url).set(e.in_flight)
        m.engine_queue_waiting.labels(e.url).set(e.waiting)
    counts = dict.fromkeys((s.value for s in VersionState), 0)
    for v in state.registry.snapshot.versions.values():
        counts[v.state.value] += 1
    for name, n in counts.items():
        m.adapter_versions.labels(name).set(n)
