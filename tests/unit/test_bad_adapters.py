"""The bad-adapter table (tests/adapter_factory.py) through the whole static pipeline:
materialize -> inspect_adapter -> check_against_base, from a synthetic adapter and, when
`.cache/demo` holds a build, from a real demo adapter (whose manifest digests are checked too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.archive import ArchiveLimits
from adapters.sources import SourceResolver, SourceSettings, parse_source
from adapters.validate import (
    BaseModelInfo,
    ValidationLimits,
    check_against_base,
    digest_adapter,
    inspect_adapter,
)
from server.errors import LoraplexError
from tests.adapter_factory import BAD_ADAPTERS, BadCase, Caps, make_adapter, write_base

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(tmp_path: Path) -> BaseModelInfo:
    return BaseModelInfo.from_dir(write_base(tmp_path / "base"))


@pytest.fixture
def good(tmp_path: Path, base: BaseModelInfo) -> Path:
    return make_adapter(tmp_path / "good", base_digest=base.digest)


# ---- the bad-adapter table: the full pipeline (materialize -> inspect -> base check) ----------


def pipeline(uri: str, cache: Path, base: BaseModelInfo, caps: Caps) -> str:
    """The stage at which `uri` was refused, or "accepted"."""
    limits = ArchiveLimits(caps.max_archive_bytes, caps.max_extracted_bytes)
    settings = SourceSettings(cache_dir=cache, limits=limits)
    try:
        path = SourceResolver(settings).materialize_sync(parse_source(uri, settings)).path
    except LoraplexError as exc:
        return f"source:{exc.error_code}"
    try:
        facts = inspect_adapter(path, ValidationLimits(caps.max_rank, caps.max_adapter_bytes))
    except LoraplexError as exc:
        return f"inspect:{exc.error_code}"
    try:
        check_against_base(facts, base)
    except LoraplexError as exc:
        return f"base:{exc.error_code}"
    return "accepted"


def test_good_adapter_passes_the_pipeline(tmp_path: Path, good: Path, base: BaseModelInfo) -> None:
    assert pipeline(str(good), tmp_path / "cache", base, Caps()) == "accepted"


@pytest.mark.parametrize("case", BAD_ADAPTERS, ids=lambda c: c.name)
def test_bad_adapter_table(tmp_path: Path, good: Path, base: BaseModelInfo, case: BadCase) -> None:
    source = case.make(good, tmp_path / "bad")
    assert pipeline(str(source), tmp_path / "cache", base, Caps()) == f"{case.stage}:{case.code}"


def test_table_codes_are_distinct_per_kind() -> None:
    """Every rejection code the issue asks for appears in the table."""
    codes = {c.code for c in BAD_ADAPTERS}
    wanted = {
        "adapter_pickle_refused",
        "adapter_rank_too_high",
        "adapter_shape_mismatch",
        "adapter_base_mismatch",
        "adapter_config_missing",
        "archive_unsafe",
        "adapter_too_large",
        "adapter_header_corrupt",
        "archive_too_large",
    }
    assert wanted <= codes


# ---- a real demo adapter (built by `loraplex demo prepare`; skipped before the first build) --


def demo_manifest() -> dict[str, Any] | None:
    manifests = sorted(
        (REPO / ".cache" / "demo").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime
    )
    return json.loads(manifests[-1].read_text()) if manifests else None


DEMO = demo_manifest()
needs_demo = pytest.mark.skipif(DEMO is None, reason="no demo build in .cache/demo yet")


@needs_demo
def test_demo_adapters_digest_and_validate() -> None:
    assert DEMO is not None
    base = BaseModelInfo.from_dir(DEMO["base"]["path"])
    assert base.digest == DEMO["base"]["digest"]
    for entry in DEMO["adapters"]:
        assert digest_adapter(entry["path"]) == entry["digest"]
        facts = inspect_adapter(entry["path"], ValidationLimits(max_rank=16))
        assert (facts.rank, facts.alpha) == (entry["rank"], entry["alpha"])
        assert list(facts.target_modules) == sorted(entry["target_modules"])
        if facts.declared_base_digest is None:  # a demo built before the sidecar existed
            check_against_base(facts, base, declared_base_digest=entry["base_digest"])
        else:
            check_against_base(facts, base)


@needs_demo
@pytest.mark.parametrize("case", BAD_ADAPTERS, ids=lambda c: c.name)
def test_bad_adapter_table_from_a_demo_adapter(tmp_path: Path, case: BadCase) -> None:
    assert DEMO is not None
    good = Path(DEMO["adapters"][0]["path"])
    base = BaseModelInfo.from_dir(DEMO["base"]["path"])
    caps = Caps(max_adapter_bytes=8 << 20, max_extracted_bytes=64 << 20)
    source = case.make(good, tmp_path / "bad", caps)
    assert pipeline(str(source), tmp_path / "cache", base, caps) == f"{case.stage}:{case.code}"
