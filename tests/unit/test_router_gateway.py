"""model="auto" through the in-process gateway (fake engine): the classified domain's adapter
serves, through the tenant's entitlements, with X-Loraplex-Domain/-Confidence and metrics."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.policy import DEFAULT_ROUTES
from tests.unit.conftest import Bootstrapped, Config
from tests.unit.fakes import FakeEngine
from tests.unit.helpers import (
    ACME_KEY,
    BETA_KEY,
    NODEFAULT_KEY,
    Gateway,
    assert_error,
    auth,
    metric,
    running_gateway,
    served,
    sse_data,
)
from tests.unit.router_helpers import save_default_tfidf

MEDICAL = "I have had a fever and a sore throat for three days, should I see a doctor?"
LEGAL = "Can my landlord keep my security deposit without giving a reason?"
FINANCE = "Should I pay off my credit card debt before investing in my 401k?"
GENERAL = "Write a short poem about the autumn sea"
GIBBERISH = "zxqv plomb frandle"


@pytest.fixture
async def routed(
    config: Config,
    engine: FakeEngine,
    bootstrapped: Bootstrapped,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Gateway]:
    """The `gw` gateway with auto routing on (default routes, the pre-fitted default model)."""
    router: dict[str, Any] = {
        "routes_file": DEFAULT_ROUTES,
        "artefact": save_default_tfidf(tmp_path),
        **getattr(request, "param", {}),
    }
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    settings = config.settings(adapters_file=None, router=router)
    async with running_gateway(settings, engine) as gateway:
        yield gateway


async def ask(
    gw: Gateway, text: str, key: str = ACME_KEY, **body: Any
) -> tuple[int, dict[str, str]]:
    resp = await gw.chat(key, messages=[{"role": "user", "content": text}], **body)
    return resp.status_code, dict(resp.headers)


@pytest.mark.parametrize(("text", "adapter"), [(MEDICAL, "medical"), (LEGAL, "legal")])
async def test_auto_serves_the_domain_adapter(routed: Gateway, text: str, adapter: str) -> None:
    status, headers = await ask(routed, text, model="auto")
    assert status == 200
    assert headers["x-loraplex-adapter"] == f"{adapter}@1"
    assert headers["x-loraplex-domain"] == adapter
    assert 0.4 <= float(headers["x-loraplex-confidence"]) <= 1.0
    assert routed.engine.forwarded[-1].body["model"] == served(routed, adapter)


@pytest.mark.parametrize(
    ("text", "domain"), [(GENERAL, "general"), (GIBBERISH, "none"), (FINANCE, "finance")]
)
async def test_catch_all_unsure_and_not_entitled_go_to_the_fallback(
    routed: Gateway, text: str, domain: str
) -> None:
    """acme may not use `finance`: its finance question goes to the fallback (base)."""
    status, headers = await ask(routed, text, model="auto")
    assert status == 200
    assert headers["x-loraplex-adapter"] == "base"
    assert headers["x-loraplex-domain"] == domain
    assert routed.engine.forwarded[-1].body["model"] == "base"
    text_metrics = await routed.metrics()
    reason = {"general": "catch_all", "none": "low_confidence", "finance": "not_entitled"}[domain]
    assert (
        metric(text_metrics, "loraplex_router_fallbacks_total", tenant="acme", reason=reason) == 1
    )


async def test_fallback_the_tenant_may_not_use_becomes_its_default(routed: Gateway) -> None:
    """beta may use only `finance`: a medical question can go neither to medical nor to base."""
    status, headers = await ask(routed, MEDICAL, key=BETA_KEY, model="auto")
    assert status == 200
    assert headers["x-loraplex-adapter"] == "finance@1"
    assert headers["x-loraplex-domain"] == "medical"
    status, headers = await ask(routed, FINANCE, key=BETA_KEY, model="auto")
    assert (status, headers["x-loraplex-adapter"]) == (200, "finance@1")


async def test_an_explicit_adapter_header_wins_over_auto(routed: Gateway) -> None:
    resp = await routed.chat(
        messages=[{"role": "user", "content": MEDICAL}],
        model="auto",
        headers={"X-Loraplex-Adapter": "legal"},
    )
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "legal@1"
    assert "x-loraplex-domain" not in resp.headers
    # Without "auto", names resolve as before and nothing is classified.
    status, headers = await ask(routed, MEDICAL, model="legal")
    assert (status, headers["x-loraplex-adapter"]) == (200, "legal@1")
    assert "x-loraplex-domain" not in headers
    assert metric(await routed.metrics(), "loraplex_router_decisions_total") == 0


async def test_the_last_user_message_is_classified(routed: Gateway) -> None:
    messages = [
        {"role": "user", "content": LEGAL},
        {"role": "assistant", "content": "Check your lease."},
        {"role": "user", "content": MEDICAL},
    ]
    resp = await routed.chat(messages=messages, model="auto")
    assert resp.headers["x-loraplex-domain"] == "medical"
    resp = await routed.chat(messages=[{"role": "system", "content": LEGAL}], model="auto")
    assert (resp.headers["x-loraplex-domain"], resp.headers["x-loraplex-adapter"]) == (
        "none",
        "base",
    )
    text = await routed.metrics()
    assert metric(text, "loraplex_router_fallbacks_total", reason="no_text") == 1


@pytest.mark.parametrize("routed", [{"classify_input": "conversation"}], indirect=True)
async def test_classify_input_mode_is_configurable(routed: Gateway) -> None:
    long_legal = " ".join([LEGAL] * 3)
    messages = [
        {"role": "user", "content": long_legal},
        {"role": "assistant", "content": "Check your lease and tenancy law."},
        {"role": "user", "content": "and what else?"},
    ]
    resp = await routed.chat(messages=messages, model="auto")
    assert resp.headers["x-loraplex-domain"] == "legal"


async def test_completions_and_streams_are_routed(routed: Gateway) -> None:
    resp = await routed.client.post(
        "/v1/completions",
        json={"model": "auto", "prompt": f"Q: {LEGAL}\nA:", "max_tokens": 4},
        headers=auth(ACME_KEY),
    )
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "legal@1"
    resp = await routed.chat(
        messages=[{"role": "user", "content": MEDICAL}], model="auto", stream=True
    )
    assert resp.status_code == 200
    assert resp.headers["x-loraplex-adapter"] == "medical@1"
    assert resp.headers["x-loraplex-domain"] == "medical"
    assert sse_data(resp.text)[-1] == "[DONE]"


async def test_router_metrics(routed: Gateway) -> None:
    for text in (MEDICAL, MEDICAL, LEGAL):
        await ask(routed, text, model="auto")
    text = await routed.metrics()
    decisions = "loraplex_router_decisions_total"
    assert metric(text, decisions, tenant="acme", domain="medical") == 2
    assert metric(text, decisions, tenant="acme", domain="legal") == 1
    assert metric(text, "loraplex_router_classify_seconds_count", classifier="tfidf") == 3
    assert metric(text, "loraplex_router_confidence_count", domain="medical") == 2
    assert metric(text, "loraplex_router_fallbacks_total") == 0


async def test_auto_is_an_unknown_model_when_routing_is_off(gw: Gateway) -> None:
    resp = await gw.chat(messages=[{"role": "user", "content": MEDICAL}], model="auto")
    assert_error(resp, 404, "model_not_found", param="model")


async def test_a_tenant_whose_routes_say_auto(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> None:
    routes = yaml.safe_load(DEFAULT_ROUTES.read_text())
    routes["examples_files"] = [str(DEFAULT_ROUTES.parent / "train.jsonl")]
    routes["tenants"] = {"nodefault": {"auto": True}}
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(routes))
    router = {"routes_file": tmp_path / "routes.yaml", "artefact": save_default_tfidf(tmp_path)}
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    settings = config.settings(adapters_file=None, router=router)
    async with running_gateway(settings, engine) as gw:
        # nodefault has no default model; its routes send unnamed requests through the router.
        status, headers = await ask(gw, MEDICAL, key=NODEFAULT_KEY)
        assert (status, headers["x-loraplex-adapter"]) == (200, "medical@1")
        status, headers = await ask(gw, LEGAL, key=NODEFAULT_KEY, model="default")
        assert (status, headers["x-loraplex-adapter"]) == (200, "base")
        # Other tenants keep their default.
        status, headers = await ask(gw, MEDICAL)
        assert (status, headers["x-loraplex-adapter"]) == (200, "legal@1")
        assert "x-loraplex-domain" not in headers


async def test_a_classifier_that_fails_to_load_routes_to_the_fallback(
    config: Config, engine: FakeEngine, bootstrapped: Bootstrapped, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a numpy archive")
    router = {"routes_file": DEFAULT_ROUTES, "artefact": broken}
    shutil.copyfile(bootstrapped.db, config.root / "registry.db")
    engine.served |= bootstrapped.served
    async with running_gateway(config.settings(adapters_file=None, router=router), engine) as gw:
        status, headers = await ask(gw, MEDICAL, model="auto")
        assert (status, headers["x-loraplex-adapter"], headers["x-loraplex-domain"]) == (
            200,
            "base",
            "none",
        )
        text = await gw.metrics()
        assert metric(text, "loraplex_router_fallbacks_total", reason="unavailable") == 1


async def test_a_bad_routes_file_fails_start_up(
    config: Config, engine: FakeEngine, tmp_path: Path
) -> None:
    from router.policy import RoutesError

    bad = tmp_path / "routes.yaml"
    bad.write_text("fallback: base\ndomains: {}\n")
    settings = config.settings(router={"routes_file": bad})
    with pytest.raises(RoutesError, match="at least two"):
        async with running_gateway(settings, engine, wait_ready=False):
            pass
