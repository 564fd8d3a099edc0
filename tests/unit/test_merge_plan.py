"""The merge tool's refusals, decided before torch is imported (so they run in the gateway venv).

The peft half (`adapters.tools.merge.combine`) needs the tools venv: tests/e2e/test_merge.py
runs it for real and serves the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.tools.merge.cli import main
from adapters.tools.merge.plan import MergeRefused, make_plan, parse_source
from adapters.validate import digest_adapter
from tests.synthetic import make_adapter, make_base

OTHER_BASE = "sha256:" + "a" * 64


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, str]:
    return make_base(tmp_path / "base")


def test_cat_sums_ranks_and_records_inputs(tmp_path: Path, base: tuple[Path, str]) -> None:
    a = make_adapter(tmp_path, "a", base[1], rank=4, fill=1)
    b = make_adapter(tmp_path, "b", base[1], rank=4, fill=2)
    plan = make_plan([(a, 0.5), (b, 0.5)], "cat", max_rank=8)
    assert plan.rank == 8
    assert plan.base_digest == base[1]
    assert [i.digest for i in plan.inputs] == [digest_adapter(a), digest_adapter(b)]
    assert plan.describe()["weights"] == [0.5, 0.5]


@pytest.mark.parametrize(
    ("combination", "ranks", "max_rank", "svd_rank", "expected"),
    [
        ("cat", (4, 4, 4), 16, None, 12),
        ("cat", (4, 4, 4), 8, None, None),  # 12 > 8: refused
        ("linear", (4, 4), 16, None, 4),
        ("linear", (4, 2), 16, None, None),  # peft's linear needs equal ranks
        ("svd", (4, 2), 16, None, 4),
        ("svd", (4, 4), 16, 8, 8),
        ("svd", (4, 4), 6, 8, None),
    ],
)
def test_result_rank_follows_peft_and_stays_servable(
    tmp_path: Path,
    base: tuple[Path, str],
    combination: str,
    ranks: tuple[int, ...],
    max_rank: int,
    svd_rank: int | None,
    expected: int | None,
) -> None:
    inputs = [
        (make_adapter(tmp_path, f"a{i}", base[1], rank=r, fill=i), 1.0) for i, r in enumerate(ranks)
    ]
    if expected is None:
        with pytest.raises(MergeRefused):
            make_plan(inputs, combination, max_rank=max_rank, svd_rank=svd_rank)
    else:
        plan = make_plan(inputs, combination, max_rank=max_rank, svd_rank=svd_rank)
        assert plan.rank == expected


def test_inputs_must_share_a_declared_base(tmp_path: Path, base: tuple[Path, str]) -> None:
    a = make_adapter(tmp_path, "a", base[1])
    other = make_adapter(tmp_path, "other", OTHER_BASE)
    with pytest.raises(MergeRefused, match="different base models"):
        make_plan([(a, 1.0), (other, 1.0)], "cat")
    (other / "loraplex.json").unlink()
    with pytest.raises(MergeRefused, match=r"no loraplex\.json"):
        make_plan([(a, 1.0), (other, 1.0)], "cat")
    (other / "loraplex.json").write_text(json.dumps({"note": "no digest"}))
    with pytest.raises(MergeRefused, match="lacks a base_digest"):
        make_plan([(a, 1.0), (other, 1.0)], "cat")


def test_source_syntax() -> None:
    assert parse_source("/x/y:z:-0.25") == (Path("/x/y:z"), -0.25)
    for bad in ("/x/y", "/x/y:heavy", "/x/y:nan", ":1"):
        with pytest.raises(MergeRefused):
            parse_source(bad)


def test_cli_refusal_exits_2_without_writing(
    tmp_path: Path, base: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    a = make_adapter(tmp_path, "a", base[1])
    other = make_adapter(tmp_path, "other", OTHER_BASE)
    out = tmp_path / "out"
    argv = [
        "--out",
        str(out),
        "--base-config",
        str(base[0] / "config.json"),
        f"{a}:1",
        f"{other}:1",
    ]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "different base models" in captured.err
    assert captured.out == ""
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merging-")]
