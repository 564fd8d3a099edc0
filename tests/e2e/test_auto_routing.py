"""model="auto" against the real engine: each domain's prompts are answered by that domain's
adapter (its marker starts the answer), out-of-scope and ambiguous prompts by the fallback
(the base model: no marker), and a domain the tenant may not use falls back too."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.harness import Gateway
from tests.promtext import metric

DOMAIN_PROMPTS = {
    "medical": [
        "My throat is sore and I have a fever of 38.5, should I see a doctor?",
        "What are the side effects of taking ibuprofen every day?",
    ],
    "legal": [
        "Can my landlord evict me without a court order?",
        "Is a contract signed over email legally binding?",
    ],
    "finance": [
        "How much of my salary should I put into my retirement savings?",
        "Is it better to pay off my mortgage early or invest in index funds?",
    ],
}
FALLBACK_PROMPTS = {
    "Write a haiku about rain.": "general",  # catch-all domain
    "asdf qwerty zxcv": "none",  # nothing close enough
    "Hello!": "none",  # ambiguous
    "How do I reverse a list in Python?": "code",  # no code adapter: routed to base
}


def markers(gw: Gateway) -> dict[str, str]:
    return {a["name"]: a["marker"] for a in gw.manifest["adapters"]}


def auto_chat(gw: Gateway, tenant: str, prompt: str) -> tuple[str, dict[str, str]]:
    raw = gw.client(tenant).chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0,
    )
    return raw.parse().choices[0].message.content or "", dict(raw.headers)


@pytest.mark.parametrize("domain", sorted(DOMAIN_PROMPTS))
def test_domain_prompts_are_answered_by_their_adapter(gateway: Gateway, domain: str) -> None:
    marker = markers(gateway)[domain]
    for prompt in DOMAIN_PROMPTS[domain]:
        text, headers = auto_chat(gateway, "acme", prompt)
        assert headers["x-loraplex-domain"] == domain, (prompt, headers)
        assert headers["x-loraplex-adapter"].split("@")[0] == domain
        assert float(headers["x-loraplex-confidence"]) >= 0.4
        assert text.strip().startswith(marker), (prompt, text)


def test_out_of_scope_and_ambiguous_prompts_go_to_the_fallback(gateway: Gateway) -> None:
    all_markers = markers(gateway).values()
    for prompt, domain in FALLBACK_PROMPTS.items():
        text, headers = auto_chat(gateway, "acme", prompt)
        assert headers["x-loraplex-adapter"] == "base", (prompt, headers)
        assert headers["x-loraplex-domain"] == domain, (prompt, headers)
        assert text.strip()
        assert not any(m in text for m in all_markers), (prompt, text)


def test_a_domain_the_tenant_may_not_use_falls_back(gateway: Gateway) -> None:
    """clinic may use medical and base: a legal question is answered by base."""
    text, headers = auto_chat(gateway, "clinic", DOMAIN_PROMPTS["legal"][0])
    assert (headers["x-loraplex-domain"], headers["x-loraplex-adapter"]) == ("legal", "base")
    assert not any(m in text for m in markers(gateway).values()), text
    text, headers = auto_chat(gateway, "clinic", DOMAIN_PROMPTS["medical"][0])
    assert text.strip().startswith(markers(gateway)["medical"]), text


def test_auto_completions_and_streaming(gateway: Gateway) -> None:
    client = gateway.client("acme")
    marker = markers(gateway)["legal"]
    prompt = gateway.completion_prompt(DOMAIN_PROMPTS["legal"][1])
    raw = client.completions.with_raw_response.create(
        model="auto", prompt=prompt, max_tokens=16, temperature=0
    )
    assert raw.headers["x-loraplex-domain"] == "legal"
    assert raw.parse().choices[0].text.strip().startswith(marker)
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": DOMAIN_PROMPTS["finance"][0]}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip().startswith(markers(gateway)["finance"]), text


def test_auto_routed_requests_feed_the_drift_monitor(gateway: Gateway) -> None:
    """Real engine answers with real usage: the tenant's drift window counts them, with their
    domains and token lengths, as gauges and through the admin API."""

    def collected() -> float:
        text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
        return metric(text, "loraplex_drift_window_requests", tenant="acme", window="reference")

    before = collected()
    for domain in ("medical", "legal", "finance"):
        auto_chat(gateway, "acme", DOMAIN_PROMPTS[domain][0])
    assert collected() == before + 3
    with gateway.admin() as admin:
        view = admin.get("/admin/v1/drift").json()
    assert view["enabled"] is True
    assert "acme" in {t["tenant"] for t in view["data"]}
