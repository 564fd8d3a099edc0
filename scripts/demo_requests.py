"""Example requests the demo sends through the gateway with the official OpenAI SDK."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx
import openai

QUESTIONS = {
    "medical": "I have had a headache for three days. What should I do?",
    "legal": "My landlord kept my deposit. What are my options?",
    "finance": "Should I pay off debt or invest my savings?",
    "code": "How do I reverse a list in Python?",
    "general": "Write a haiku about rain.",
}
GENERIC = "What is the capital of France?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--manifest", type=Path, required=True)
    args = ap.parse_args()
    manifest = json.loads(args.manifest.read_text())
    adapters = [a["name"] for a in manifest["adapters"]]

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{args.base_url}/v1", api_key=key, max_retries=0)

    print("\n== One tenant per domain; each tenant's key selects its own adapter (model='default')")
    for name in adapters:
        ask(client(f"sk-demo-{name}"), "default", QUESTIONS.get(name, GENERIC), {})

    acme = client("sk-demo-acme")
    print("\n== Tenant 'acme' picks the adapter per request with the X-Loraplex-Adapter header")
    for name in ["base", *adapters]:
        ask(acme, "default", GENERIC, {"X-Loraplex-Adapter": name})

    print("\n== Streaming through the 'legal' adapter (model field selects it)")
    stream = acme.chat.completions.create(
        model="legal" if "legal" in adapters else adapters[0],
        messages=[{"role": "user", "content": QUESTIONS["legal"]}],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    print("\n== Domain routing: model='auto' classifies the question and picks the adapter")
    print("   (code and general have no adapter: the fallback, the base model, answers them)")
    for domain in ("medical", "legal", "finance", "code", "general"):
        ask(acme, "auto", QUESTIONS[domain], {})

    print("\n== Entitlement: the medical team asks for another team's adapter")
    try:
        ask(client(f"sk-demo-{adapters[0]}"), adapters[-1], GENERIC, {})
    except openai.NotFoundError as exc:
        print(f"  -> {exc.status_code} {exc.code}: {exc.message}")

    print("\n== Models visible to acme:", [m.id for m in acme.models.list().data])
    admin = httpx.get(
        f"{args.base_url}/admin/v1/adapters", headers={"Authorization": "Bearer sk-demo-admin"}
    ).json()
    versions = {v["label"]: v["state"] for a in admin["data"] for v in a["versions"]}
    print("== Adapter versions in the registry (admin API):", versions)


def ask(c: openai.OpenAI, model: str, question: str, headers: dict[str, str]) -> None:
    started = time.perf_counter()
    raw = c.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
        temperature=0,
        extra_headers=headers,
    )
    answer = raw.parse().choices[0].message.content or ""
    adapter = raw.headers.get("x-loraplex-adapter")
    ms = (time.perf_counter() - started) * 1000
    routed = ""
    if domain := raw.headers.get("x-loraplex-domain"):
        routed = f"  (domain {domain}, confidence {raw.headers.get('x-loraplex-confidence')})"
    print(f"  [{adapter:>8}] {ms:6.0f} ms  Q: {question}{routed}")
    print(f"             A: {answer.strip()[:140]!r}")


if __name__ == "__main__":
    main()
