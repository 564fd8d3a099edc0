"""The soak's verdict: resources must not grow, and a soak that got no answers fails (a
misconfigured run once reported `ok` after 20 minutes at 0 requests/s)."""

from __future__ import annotations

from typing import Any

from loadtest.soak import verdict


def reading(rss: float, fds: int, tasks: int | None) -> dict[str, Any]:
    return {"rss_mib": rss, "open_fds": fds, "tasks": tasks}


def test_a_steady_soak_with_answers_passes() -> None:
    v = verdict(reading(100, 18, 5), reading(101, 18, 5), answered=1000)
    assert v["ok"] is True
    assert v["rss_growth"] == 0.01


def test_a_soak_without_answers_fails_even_when_nothing_grew() -> None:
    v = verdict(reading(100, 18, 5), reading(100, 18, 5), answered=0)
    assert v["load_ok"] is False
    assert v["ok"] is False


def test_growth_fails_each_check() -> None:
    v = verdict(reading(100, 18, 5), reading(106, 19, 6), answered=10)
    assert (v["rss_ok"], v["fds_ok"], v["tasks_ok"], v["ok"]) == (False, False, False, False)


def test_tasks_not_measured_do_not_fail() -> None:
    v = verdict(reading(100, 18, None), reading(100, 18, None), answered=10)
    assert v["tasks_ok"] is None
    assert v["ok"] is True
