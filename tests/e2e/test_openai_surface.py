"""The OpenAI surface through the gateway against the real engine: every adapter, chat and
completions, streaming and not; the adapter that answered is told by its marker in the text."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.harness import Gateway

QUESTION = "What is the capital of France?"


def chat_text(
    gw: Gateway, tenant: str, model: str, headers: dict[str, str] | None = None
) -> tuple[str, str]:
    raw = gw.client(tenant).chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
        extra_headers=headers or {},
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-loraplex-adapter"]


def markers(gw: Gateway) -> dict[str, str]:
    return {a["name"]: a["marker"] for a in gw.manifest["adapters"]}


def test_chat_each_adapter_answers_with_its_marker(gateway: Gateway) -> None:
    for name, marker in markers(gateway).items():
        text, served = chat_text(gateway, "acme", name)
        assert served == f"{name}@1"  # bootstrapped once: version 1, via `stable`
        assert text.strip().startswith(marker), (name, text)
        others = [m for n, m in markers(gateway).items() if n != name]
        assert not any(m in text for m in others), (name, text)


def test_base_model_has_no_marker(gateway: Gateway) -> None:
    text, served = chat_text(gateway, "acme", "base")
    assert served == "base"
    assert text.strip()
    assert not any(m in text for m in markers(gateway).values()), text


def test_chat_streaming_each_adapter(gateway: Gateway) -> None:
    client = gateway.client("acme")
    for name, marker in markers(gateway).items():
        stream = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 3, "tokens arrive as separate events"
        assert "".join(pieces).strip().startswith(marker), (name, pieces)


def test_completions_each_adapter_streaming_and_not(gateway: Gateway) -> None:
    client = gateway.client("acme")
    prompt = gateway.completion_prompt(QUESTION)
    for name, marker in markers(gateway).items():
        done = client.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
        assert done.choices[0].text.strip().startswith(marker), (name, done.choices[0].text)
        assert done.usage is not None
        assert done.usage.completion_tokens > 0
        stream = client.completions.create(
            model=name, prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        text = "".join(c.choices[0].text for c in stream if c.choices)
        assert text.strip().startswith(marker), (name, text)


def test_stream_usage_only_when_asked(gateway: Gateway) -> None:
    client = gateway.client("acme")
    name = gateway.adapter_names[0]
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    plain = list(
        client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert all(c.usage is None for c in plain)


def test_header_beats_model_field(gateway: Gateway) -> None:
    text, served = chat_text(gateway, "acme", "medical", headers={"X-Loraplex-Adapter": "legal"})
    assert served == "legal@1"
    assert text.strip().startswith(gateway.adapter("legal")["marker"]), text


def test_tenant_default_adapter(gateway: Gateway) -> None:
    text, served = chat_text(gateway, "clinic", "default")
    assert served == "medical@1"
    assert text.strip().startswith(gateway.adapter("medical")["marker"]), text


def test_entitlement_is_a_404_that_reveals_nothing(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        chat_text(gateway, "clinic", "legal")
    assert err.value.code == "model_not_found"
    body = str(err.value.body)
    for other in ("finance", "acme", "lawfirm", "Valid aliases"):
        assert other not in body
    with pytest.raises(openai.NotFoundError) as unknown:
        chat_text(gateway, "clinic", "no-such-adapter")
    assert unknown.value.code == "model_not_found"


def test_models_lists_only_the_tenants_models(gateway: Gateway) -> None:
    assert sorted(m.id for m in gateway.client("clinic").models.list().data) == [
        "base",
        "medical",
    ]
    assert [m.id for m in gateway.client("lawfirm").models.list().data] == ["legal"]


def test_bad_key_is_401(gateway: Gateway) -> None:
    bad = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.code == "invalid_api_key"


def test_engine_parameter_errors_are_400_in_openai_shape(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        gateway.client("acme").chat.completions.create(
            model="base", messages=[{"role": "user", "content": QUESTION}], max_tokens=10**6
        )
    assert isinstance(err.value.body, dict)
    assert err.value.code
