"""In-memory adapter catalog: which adapters exist, which the operator wants loaded, which are.

The engine (vLLM) keeps its own residency LRU between disk, CPU cache and GPU slots; this
catalog only tracks *registration* on the engine, so that a request is routed to an adapter only
while the engine knows it, and so that an engine restart can be repaired (`reconcile`).
The persistent, versioned registry replaces the storage part of this later; the load/unload
protocol with the engine stays here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from server.errors import BadRequest, Conflict, LoraplexError, NotFound

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class UnknownAdapter(NotFound):
    code = "adapter_not_found"


class AdapterConflict(Conflict):
    code = "adapter_conflict"


class InvalidAdapter(BadRequest):
    code = "invalid_adapter"


class EngineAdapterAPI(Protocol):
    """The part of the engine client the catalog needs (vLLM's runtime LoRA API)."""

    async def load_adapter(self, engine_name: str, path: str) -> None: ...

    async def unload_adapter(self, engine_name: str) -> None: ...

    async def served_models(self) -> set[str]: ...


@dataclass(slots=True)
class AdapterEntry:
    name: str
    path: str
    desired: bool = True
    loaded: bool = False
    loaded_at: float | None = None
    last_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    # Why a refused newcomer was forgotten; handed to callers that waited on the same load.
    failure: BaseException | None = field(default=None, repr=False)

    @property
    def engine_name(self) -> str:
        return self.name

    @property
    def state(self) -> str:
        if self.loaded:
            return "loaded"
        if self.last_error:
            return "failed"
        return "loading" if self.desired else "unloaded"


LoadObserver = Callable[[str, str, float], None]
"""Called as (adapter, result, seconds) after each engine load or unload attempt."""


def check_adapter_dir(path: str) -> None:
    """Cheap structural check before asking the engine (full validation: registry issue)."""
    p = Path(path)
    if not p.is_absolute():
        raise InvalidAdapter("adapter path must be absolute")
    if not p.is_dir():
        raise InvalidAdapter("adapter path is not a directory on the engine host")
    if (p / "adapter_model.bin").exists() and not (p / "adapter_model.safetensors").exists():
        raise InvalidAdapter("pickle adapter weights (.bin) are refused; use safetensors")
    missing = [f for f in ADAPTER_FILES if not (p / f).is_file()]
    if missing:
        raise InvalidAdapter(f"adapter directory lacks {', '.join(missing)}")


class AdapterCatalog:
    """Adapters known to the gateway and their registration state on the engine."""

    def __init__(
        self,
        engine: EngineAdapterAPI,
        base_model: str,
        observer: LoadObserver | None = None,
    ) -> None:
        self._engine = engine
        self.base_model = base_model
        self._entries: dict[str, AdapterEntry] = {}
        self._observer = observer
        self._reconcile_lock = asyncio.Lock()

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> AdapterEntry | None:
        return self._entries.get(name)

    def is_routable(self, name: str) -> bool:
        """The base model is always routable; an adapter only while the engine has it."""
        if name == self.base_model:
            return True
        entry = self._entries.get(name)
        return entry is not None and entry.loaded

    def declare(self, name: str, path: str) -> AdapterEntry:
        """Record an adapter the operator wants loaded (loaded later by `reconcile`)."""
        self._check_name(name)
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = AdapterEntry(name=name, path=path)
        elif entry.path != path:
            if entry.desired or entry.loaded:
                raise AdapterConflict(f"adapter {name!r} is already registered with another path")
            entry.path = path  # unloaded earlier: the name is free to point elsewhere
        entry.desired = True
        return entry

    async def load(self, name: str, path: str) -> AdapterEntry:
        """Register `name` on the engine; concurrent calls for one name share one engine call."""
        check_adapter_dir(path)
        is_new = name not in self._entries
        entry = self.declare(name, path)
        async with entry.lock:
            forgotten = self._entries.get(name) is not entry
            if not forgotten:
                if entry.loaded:
                    return entry
                try:
                    await self._load_locked(entry)
                except BaseException as exc:
                    if is_new:  # a refused newcomer is forgotten, not retried forever
                        entry.failure = exc
                        self._entries.pop(name, None)
                    raise
        if forgotten:
            # The load we waited on failed and dropped this entry: share its outcome instead
            # of loading an entry the catalog no longer holds (cancelled: try again ourselves).
            if isinstance(entry.failure, Exception):
                raise entry.failure
            return await self.load(name, path)
        return entry

    async def unload(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownAdapter(f"no adapter named {name!r}")
        async with entry.lock:
            entry.desired = False
            if entry.loaded:
                started = time.perf_counter()
                # Mark unroutable first so no new request is sent to a name being removed.
                entry.loaded = False
                try:
                    await self._engine.unload_adapter(entry.engine_name)
                except Exception:
                    entry.loaded = True
                    entry.desired = True
                    self._observe(name, "unload_error", started)
                    raise
                self._observe(name, "unloaded", started)
            entry.last_error = None
        return entry

    async def reconcile(self) -> list[str]:
        """Make the engine hold every desired adapter (after start or an engine restart)."""
        async with self._reconcile_lock:
            served = await self._engine.served_models()
            loaded_now: list[str] = []
            for entry in list(self._entries.values()):
                async with entry.lock:
                    if not entry.desired:
                        continue
                    if entry.engine_name in served:
                        entry.loaded = True
                        continue
                    entry.loaded = False
                    try:
                        await self._load_locked(entry)
                    except LoraplexError:
                        continue  # recorded in entry.last_error; other adapters still load
                    loaded_now.append(entry.name)
            return loaded_now

    def mark_engine_lost(self) -> None:
        """The engine went away: nothing is registered on it any more."""
        for entry in self._entries.values():
            entry.loaded = False

    async def _load_locked(self, entry: AdapterEntry) -> None:
        started = time.perf_counter()
        try:
            await self._engine.load_adapter(entry.engine_name, entry.path)
        except LoraplexError as exc:
            entry.last_error = str(exc)
            self._observe(entry.name, "error", started)
            raise
        entry.loaded = True
        entry.loaded_at = time.time()
        entry.last_error = None
        self._observe(entry.name, "loaded", started)

    def _observe(self, name: str, result: str, started: float) -> None:
        if self._observer is not None:
            self._observer(name, result, time.perf_counter() - started)

    def _check_name(self, name: str) -> None:
        if name == self.base_model:
            raise AdapterConflict(f"{name!r} is the base model's name")
        if (
            not name
            or len(name) > 64
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
        ):
            raise InvalidAdapter("adapter names use 1-64 characters from [A-Za-z0-9._-]")
