"""AdapterCatalog: single-flight loads, unload ordering, reconcile, validation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.catalog import (
    AdapterCatalog,
    AdapterConflict,
    InvalidAdapter,
    UnknownAdapter,
    check_adapter_dir,
)
from server.errors import AdapterLoadFailed, EngineUnavailable, UpstreamError
from tests.unit.conftest import make_adapter_dir
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import wait_until

Ops = list[tuple[str, str]]


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, str]:
    return {n: str(make_adapter_dir(tmp_path, n)) for n in ("a", "b", "c")}


@pytest.fixture
def ops() -> Ops:
    return []


@pytest.fixture
def catalog(engine: FakeEngine, ops: Ops) -> AdapterCatalog:
    return AdapterCatalog(engine, "base", lambda name, result, s: ops.append((name, result)))


async def test_concurrent_loads_share_one_engine_call(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str], ops: Ops
) -> None:
    engine.load_gate = asyncio.Event()
    tasks = [asyncio.create_task(catalog.load("a", dirs["a"])) for _ in range(10)]
    await wait_until(lambda: len(engine.load_calls) == 1, what="first engine call")
    await asyncio.sleep(0)  # give the others every chance to call the engine too
    assert not catalog.is_routable("a")
    pending = catalog.get("a")
    assert pending is not None
    assert pending.state == "loading"
    engine.load_gate.set()
    entries = await asyncio.gather(*tasks)
    assert engine.load_calls == [("a", dirs["a"])]
    assert all(e is entries[0] for e in entries)
    assert entries[0].loaded
    assert entries[0].state == "loaded"
    assert catalog.is_routable("a")
    assert ops == [("a", "loaded")]


async def test_concurrent_loads_of_a_refused_newcomer_share_the_failure(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    engine.load_gate = asyncio.Event()
    engine.refuse("a")
    tasks = [asyncio.create_task(catalog.load("a", dirs["a"])) for _ in range(5)]
    await wait_until(lambda: len(engine.load_calls) == 1, what="first engine call")
    engine.load_gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, AdapterLoadFailed) for r in results), results
    assert len(engine.load_calls) == 1
    assert catalog.get("a") is None
    assert not catalog.is_routable("a")
    assert "a" not in engine.served


async def test_waiter_retries_when_the_shared_load_was_cancelled(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    engine.load_gate = asyncio.Event()
    first = asyncio.create_task(catalog.load("a", dirs["a"]))
    await wait_until(lambda: len(engine.load_calls) == 1, what="first engine call")
    second = asyncio.create_task(catalog.load("a", dirs["a"]))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    engine.load_gate.set()
    entry = await asyncio.wait_for(second, 3)
    assert entry.loaded
    assert catalog.get("a") is entry
    assert catalog.is_routable("a")
    assert len(engine.load_calls) == 2


async def test_different_names_load_in_parallel(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    engine.load_gate = asyncio.Event()
    tasks = [asyncio.create_task(catalog.load(n, dirs[n])) for n in ("a", "b", "c")]
    await wait_until(lambda: len(engine.load_calls) == 3, what="three engine calls")
    engine.load_gate.set()
    await asyncio.gather(*tasks)
    assert all(catalog.is_routable(n) for n in ("a", "b", "c"))


async def test_load_of_loaded_adapter_is_a_no_op(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    first = await catalog.load("a", dirs["a"])
    second = await catalog.load("a", dirs["a"])
    assert first is second
    assert len(engine.load_calls) == 1


async def test_refused_newcomer_is_forgotten(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str], ops: Ops
) -> None:
    engine.refuse("a")
    with pytest.raises(AdapterLoadFailed):
        await catalog.load("a", dirs["a"])
    assert catalog.get("a") is None
    assert catalog.entries() == []
    assert ops == [("a", "error")]
    # A later reconcile does not retry it.
    await catalog.reconcile()
    assert len(engine.load_calls) == 1


async def test_refused_declared_adapter_is_kept_with_its_error(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    engine.refuse("a", "engine refused the adapter: rank too large")
    catalog.declare("a", dirs["a"])
    assert await catalog.reconcile() == []
    entry = catalog.get("a")
    assert entry is not None
    assert entry.state == "failed"
    assert entry.last_error is not None
    assert "rank too large" in entry.last_error
    assert not catalog.is_routable("a")
    # Fixed on the engine side: the next reconcile loads it and clears the error.
    del engine.load_failures["a"]
    assert await catalog.reconcile() == ["a"]
    assert entry.state == "loaded"
    assert entry.last_error is None


async def test_unload_marks_unroutable_before_the_engine_call(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str], ops: Ops
) -> None:
    await catalog.load("a", dirs["a"])
    engine.unload_gate = asyncio.Event()
    task = asyncio.create_task(catalog.unload("a"))
    await wait_until(lambda: engine.unload_calls == ["a"], what="engine unload call")
    # The engine has not answered yet, but no new request may be routed to `a` any more.
    assert not catalog.is_routable("a")
    engine.unload_gate.set()
    entry = await task
    assert entry.state == "unloaded"
    assert not entry.desired
    assert not catalog.is_routable("a")
    assert "a" not in engine.served
    assert ops == [("a", "loaded"), ("a", "unloaded")]


async def test_failed_unload_restores_routability(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str], ops: Ops
) -> None:
    await catalog.load("a", dirs["a"])
    engine.unload_failure = UpstreamError("engine failed to unload the adapter (500)")
    with pytest.raises(UpstreamError):
        await catalog.unload("a")
    entry = catalog.get("a")
    assert entry is not None
    assert entry.loaded
    assert entry.desired
    assert catalog.is_routable("a")
    assert ops[-1] == ("a", "unload_error")


async def test_unload_unknown_raises(catalog: AdapterCatalog) -> None:
    with pytest.raises(UnknownAdapter) as info:
        await catalog.unload("nope")
    assert info.value.status == 404
    assert info.value.error_code == "adapter_not_found"


async def test_unload_of_never_loaded_adapter_skips_the_engine(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    catalog.declare("a", dirs["a"])
    entry = await catalog.unload("a")
    assert engine.unload_calls == []
    assert entry.state == "unloaded"


async def test_reconcile_after_engine_loss_reloads_desired_only(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    for n in ("a", "b", "c"):
        await catalog.load(n, dirs[n])
    await catalog.unload("c")
    engine.restart()
    catalog.mark_engine_lost()
    assert not any(catalog.is_routable(n) for n in ("a", "b", "c"))
    assert catalog.is_routable("base")
    engine.load_calls.clear()
    assert sorted(await catalog.reconcile()) == ["a", "b"]
    assert sorted(n for n, _ in engine.load_calls) == ["a", "b"]
    assert catalog.is_routable("a")
    assert catalog.is_routable("b")
    assert not catalog.is_routable("c")


async def test_reconcile_adopts_adapters_the_engine_already_has(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    catalog.declare("a", dirs["a"])
    engine.served.add("a")
    assert await catalog.reconcile() == []
    assert engine.load_calls == []
    assert catalog.is_routable("a")


async def test_reconcile_with_engine_down_raises_and_changes_nothing(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    catalog.declare("a", dirs["a"])
    engine.healthy = False
    with pytest.raises(EngineUnavailable):
        await catalog.reconcile()
    assert engine.load_calls == []
    assert not catalog.is_routable("a")


async def test_one_failing_adapter_does_not_block_reconcile(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    for n in ("a", "b", "c"):
        catalog.declare(n, dirs[n])
    engine.refuse("b")
    assert await catalog.reconcile() == ["a", "c"]
    assert [e.state for e in catalog.entries()] == ["loaded", "failed", "loaded"]


def test_base_model_is_always_routable(catalog: AdapterCatalog) -> None:
    assert catalog.is_routable("base")
    assert not catalog.is_routable("other")


@pytest.mark.parametrize("name", ["", "has space", "slash/name", "x" * 65, "ünï", "a\nb", "a;b"])
def test_invalid_names_rejected(catalog: AdapterCatalog, dirs: dict[str, str], name: str) -> None:
    with pytest.raises(InvalidAdapter):
        catalog.declare(name, dirs["a"])
    assert catalog.entries() == []


@pytest.mark.parametrize("name", ["a", "legal-v2", "x.y_z", "A" * 64, "0"])
def test_valid_names_accepted(catalog: AdapterCatalog, dirs: dict[str, str], name: str) -> None:
    assert catalog.declare(name, dirs["a"]).name == name


def test_base_model_name_is_a_conflict(catalog: AdapterCatalog, dirs: dict[str, str]) -> None:
    with pytest.raises(AdapterConflict):
        catalog.declare("base", dirs["a"])


def test_redeclare_same_path_ok_other_path_conflict(
    catalog: AdapterCatalog, dirs: dict[str, str]
) -> None:
    first = catalog.declare("a", dirs["a"])
    assert catalog.declare("a", dirs["a"]) is first
    with pytest.raises(AdapterConflict):
        catalog.declare("a", dirs["b"])


def test_entries_sorted_by_name(catalog: AdapterCatalog, dirs: dict[str, str]) -> None:
    for n in ("c", "a", "b"):
        catalog.declare(n, dirs[n])
    assert [e.name for e in catalog.entries()] == ["a", "b", "c"]


def test_check_adapter_dir(tmp_path: Path) -> None:
    good = make_adapter_dir(tmp_path, "good")
    check_adapter_dir(str(good))
    with pytest.raises(InvalidAdapter, match="absolute"):
        check_adapter_dir("relative/path")
    with pytest.raises(InvalidAdapter, match="not a directory"):
        check_adapter_dir(str(tmp_path / "missing"))
    with pytest.raises(InvalidAdapter, match="bin"):
        check_adapter_dir(str(make_adapter_dir(tmp_path, "pickle", weights="adapter_model.bin")))
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidAdapter, match=r"adapter_config\.json"):
        check_adapter_dir(str(tmp_path / "no-config"))


async def test_load_validates_the_directory_before_the_engine(
    catalog: AdapterCatalog, engine: FakeEngine, tmp_path: Path
) -> None:
    with pytest.raises(InvalidAdapter):
        await catalog.load("a", str(tmp_path / "missing"))
    assert engine.load_calls == []
    assert catalog.get("a") is None


async def test_unloaded_name_may_be_loaded_from_another_path(
    catalog: AdapterCatalog, engine: FakeEngine, dirs: dict[str, str]
) -> None:
    await catalog.load("a", dirs["a"])
    await catalog.unload("a")
    entry = await catalog.load("a", dirs["b"])
    assert entry.path == dirs["b"]
    assert entry.loaded
    assert catalog.is_routable("a")
    assert "a" in engine.served
