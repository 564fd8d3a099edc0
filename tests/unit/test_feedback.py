"""`POST /v1/feedback`: a rating of one answer served in an experiment, counted for its variant;
only by the tenant that made the request, once; every refusal in the OpenAI error shape."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.experiments.service import FeedbackMemory, Served
from server.experiments.sources import LocalSource
from tests.unit.conftest import Config
from tests.unit.experiment_helpers import add_medical_v2, start
from tests.unit.helpers import (
    ACME_KEY,
    ACME_OLD_KEY,
    BETA_KEY,
    NODEFAULT_KEY,
    Gateway,
    assert_error,
    auth,
    metric,
)


@pytest.fixture
async def gw2(gw: Gateway, config: Config) -> Gateway:
    """`medical` split 100 % to the candidate (medical@2) in experiment `ab`."""
    await add_medical_v2(gw, config)
    await start(gw, weights={"candidate": 1.0})
    return gw


async def served_request(gw: Gateway, key: str = ACME_KEY, **headers: str) -> str:
    resp = await gw.chat(key=key, model="medical", headers=headers)
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-variant"] == "candidate"
    rid: str = resp.headers["x-request-id"]
    return rid


async def feedback(gw: Gateway, body: Any, key: str | None = ACME_KEY) -> httpx.Response:
    headers = auth(key) if key is not None else {}
    return await gw.client.post("/v1/feedback", json=body, headers=headers)


def counted(gw: Gateway, name: str, **labels: str) -> float:
    return gw.gauge(name, experiment="ab", variant="candidate", **labels)


async def test_rating_and_score_are_counted_for_the_variant(gw2: Gateway) -> None:
    rid = await served_request(gw2)
    resp = await feedback(gw2, {"request_id": rid, "rating": "up", "score": 0.8})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {
        "object": "feedback",
        "request_id": rid,
        "experiment": "ab",
        "variant": "candidate",
    }
    assert counted(gw2, "loraplex_experiment_feedback_total", rating="up") == 1
    assert counted(gw2, "loraplex_experiment_feedback_total", rating="down") == 0
    assert counted(gw2, "loraplex_experiment_feedback_score_count") == 1
    assert counted(gw2, "loraplex_experiment_feedback_score_sum") == pytest.approx(0.8)
    # Only a rating, only a score.
    down = await feedback(gw2, {"request_id": await served_request(gw2), "rating": "down"})
    assert down.status_code == 200
    score = await feedback(gw2, {"request_id": await served_request(gw2), "score": 0.0})
    assert score.status_code == 200
    text = await gw2.metrics()
    labels = {"experiment": "ab", "variant": "candidate"}
    assert metric(text, "loraplex_experiment_feedback_total", rating="down", **labels) == 1
    assert metric(text, "loraplex_experiment_feedback_total", **labels) == 2
    assert metric(text, "loraplex_experiment_feedback_score_count", **labels) == 2
    assert metric(text, "loraplex_experiment_feedback_score_bucket", le="0.1", **labels) == 1
    # What the controller reads.
    seen = (await LocalSource(gw2.state.metrics).variant_stats("ab", 60))["candidate"]
    assert (seen.feedback_up, seen.feedback_down, seen.feedback_score.total) == (1, 1, 2)


async def test_second_rating_is_409(gw2: Gateway) -> None:
    rid = await served_request(gw2)
    assert (await feedback(gw2, {"request_id": rid, "rating": "up"})).status_code == 200
    again = await feedback(gw2, {"request_id": rid, "rating": "down"})
    assert_error(again, 409, "feedback_exists")
    assert counted(gw2, "loraplex_experiment_feedback_total", rating="down") == 0
    # The tenant's other key is the same tenant: still rated.
    other_key = await feedback(gw2, {"request_id": rid, "score": 1.0}, key=ACME_OLD_KEY)
    assert_error(other_key, 409, "feedback_exists")


async def test_other_tenants_get_404_and_do_not_use_up_the_rating(gw2: Gateway) -> None:
    rid = await served_request(gw2)
    for key in (NODEFAULT_KEY, BETA_KEY):
        resp = await feedback(gw2, {"request_id": rid, "rating": "down"}, key=key)
        err = assert_error(resp, 404, "request_not_found", param="request_id")
        assert "ab" not in err["message"]
        assert "candidate" not in err["message"]
    assert counted(gw2, "loraplex_experiment_feedback_total", rating="down") == 0
    assert (await feedback(gw2, {"request_id": rid, "rating": "up"})).status_code == 200


async def test_client_chosen_request_ids_of_two_tenants_do_not_mix(gw2: Gateway) -> None:
    acme = await served_request(gw2, **{"X-Request-Id": "req-1"})
    other = await served_request(gw2, NODEFAULT_KEY, **{"X-Request-Id": "req-1"})
    assert acme == other == "req-1"
    assert (await feedback(gw2, {"request_id": "req-1", "rating": "up"})).status_code == 200
    resp = await feedback(gw2, {"request_id": "req-1", "rating": "down"}, key=NODEFAULT_KEY)
    assert resp.status_code == 200
    assert counted(gw2, "loraplex_experiment_feedback_total", rating="up") == 1
    assert counted(gw2, "loraplex_experiment_feedback_total", rating="down") == 1


async def test_unknown_ids_and_requests_outside_experiments_are_404(gw2: Gateway) -> None:
    assert_error(
        await feedback(gw2, {"request_id": "nope", "rating": "up"}), 404, "request_not_found"
    )
    pinned = await gw2.chat(model="medical@1")
    assert "x-loraplex-experiment" not in pinned.headers
    resp = await feedback(gw2, {"request_id": pinned.headers["x-request-id"], "rating": "up"})
    assert_error(resp, 404, "request_not_found")
    failed = await gw2.chat(model="medical", temperature="hot")  # refused before assignment
    resp = await feedback(gw2, {"request_id": failed.headers["x-request-id"], "rating": "up"})
    assert_error(resp, 404, "request_not_found")


BAD_BODIES: list[tuple[dict[str, Any], str | None]] = [
    ({"request_id": "x"}, None),
    ({"request_id": "x", "rating": None, "score": None}, None),
    ({"request_id": "x", "score": 1.5}, "score"),
    ({"request_id": "x", "score": -0.1}, "score"),
    ({"request_id": "x", "score": "good"}, "score"),
    ({"request_id": "x", "rating": "meh"}, "rating"),
    ({"rating": "up"}, "request_id"),
    ({"request_id": "", "rating": "up"}, "request_id"),
    ({"request_id": "x" * 129, "rating": "up"}, "request_id"),
    ({"request_id": "x", "rating": "up", "comment": "great"}, "comment"),
]


async def test_bad_bodies_are_400(gw2: Gateway) -> None:
    rid = await served_request(gw2)
    for body, param in BAD_BODIES:
        sent = {**body, "request_id": rid} if body.get("request_id") == "x" else body
        resp = await feedback(gw2, sent)
        assert resp.status_code == 400, body
        assert_error(resp, 400, "invalid_request", param=param, type_="invalid_request_error")
    # None of them used up the rating.
    assert (await feedback(gw2, {"request_id": rid, "rating": "up"})).status_code == 200


async def test_invalid_json_is_400(gw2: Gateway) -> None:
    resp = await gw2.post_raw("/v1/feedback", b'{"request_id": ')
    assert_error(resp, 400, "invalid_json")
    assert_error(await feedback(gw2, ["req", "up"]), 400, "invalid_json")


async def test_keys_are_checked_before_the_body(gw2: Gateway) -> None:
    rid = await served_request(gw2)
    assert_error(
        await feedback(gw2, {"request_id": rid, "rating": "up"}, key=None), 401, "invalid_api_key"
    )
    wrong = await feedback(gw2, {"request_id": rid, "rating": "up"}, key="sk-wrong")
    assert_error(wrong, 401, "invalid_api_key")
    assert_error(await feedback(gw2, {"bad": 1}, key=None), 401, "invalid_api_key")
    assert counted(gw2, "loraplex_experiment_feedback_total", rating="up") == 0


def test_memory_is_bounded_and_expires() -> None:
    memory = FeedbackMemory(max_entries=2, ttl_s=60)
    for i in range(3):
        memory.remember(f"r{i}", Served("acme", "ab", "candidate", at=1000.0 + i))
    assert memory.lookup("acme", "r0", now=1010) is None  # the oldest was dropped
    assert memory.lookup("acme", "r1", now=1010) is not None
    assert memory.lookup("beta", "r1", now=1010) is None
    assert memory.rate_once("acme", "r1")
    assert not memory.rate_once("acme", "r1")
    assert memory.lookup("acme", "r2", now=1000.0 + 2 + 61) is None  # expired
    assert memory.lookup("acme", "r2", now=1010) is None  # and forgotten
