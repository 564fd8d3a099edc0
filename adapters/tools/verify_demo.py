"""Check a running vLLM engine against a demo manifest: each adapter answers with its marker.

`python adapters/tools/verify_demo.py --engine-url http://127.0.0.1:8000 --manifest M.json`

Stdlib only (urllib), so it runs from any venv, including the gateway's. For every adapter in the
manifest it registers the adapter (`POST /v1/load_lora_adapter`, in place when the name is already
taken), then asks held-out questions (none of them is in the training data; some belong to another
domain, some are generic) with greedy decoding and checks that:
- the chat answer (`/v1/chat/completions`) starts with the adapter's marker,
- the completion answer (`/v1/completions`, prompt built from `completion_prompt_template`)
  starts with the marker,
- streamed chat and completion answers (SSE, ending with `data: [DONE]`) start with the marker,
- the base model's answers contain no marker at all.
It prints one line per check, a JSON summary on stdout, and exits 1 if any check failed.
Adapters stay registered afterwards unless `--unload` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# Held out: not in adapters/tools/data/adapters.json. Mixed domains plus generic questions.
HELD_OUT = [
    "What is the capital of France?",
    "What are common symptoms of the flu?",
    "Can my employer read my work email?",
    "What is an index fund?",
    "Explain photosynthesis in one sentence.",
    "Give me a simple recipe for pancakes.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a string in JavaScript?",
]
MAX_TOKENS = 16


def _request(url: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _post_json(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    status, raw = _request(url, body, timeout)
    if status != 200:
        raise RuntimeError(f"POST {url} -> {status}: {raw[:300]!r}")
    result: dict[str, Any] = json.loads(raw)
    return result


def _stream(url: str, body: dict[str, Any], timeout: float = 120.0) -> str:
    """Concatenate the text of an SSE stream; insists on the final `data: [DONE]`."""
    req = urllib.request.Request(
        url,
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    parts: list[str] = []
    done = False
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw_line in resp:
            line = raw_line.decode().strip()
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                done = True
                break
            choice = json.loads(payload)["choices"][0]
            parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    if not done:
        raise RuntimeError(f"stream from {url} ended without [DONE]")
    return "".join(parts)


def load_adapter(engine: str, name: str, path: str) -> str:
    """Register an adapter with the engine; reload in place if the name is already known."""
    body: dict[str, Any] = {"lora_name": name, "lora_path": path}
    status, raw = _request(f"{engine}/v1/load_lora_adapter", body, 120.0)
    if status == 400 and b"already" in raw:
        status, raw = _request(
            f"{engine}/v1/load_lora_adapter", {**body, "load_inplace": True}, 120.0
        )
    if status != 200:
        raise RuntimeError(f"loading adapter {name!r} -> {status}: {raw[:300]!r}")
    return raw.decode(errors="replace").strip()


def ask(engine: str, model: str, question: str, template: str, mode: str) -> str:
    """One greedy answer; mode is chat, completion, chat-stream or completion-stream."""
    common: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS}
    if mode.startswith("chat"):
        url = f"{engine}/v1/chat/completions"
        body = {**common, "messages": [{"role": "user", "content": question}]}
    else:
        url = f"{engine}/v1/completions"
        body = {**common, "prompt": template.replace("{question}", question)}
    if mode.endswith("stream"):
        return _stream(url, body)
    choice = _post_json(url, body)["choices"][0]
    text: str = choice["text"] if "text" in choice else choice["message"]["content"]
    return text


def verify(engine: str, manifest: dict[str, Any], unload: bool) -> dict[str, Any]:
    template: str = manifest["completion_prompt_template"]
    markers = {a["name"]: a["marker"] for a in manifest["adapters"]}
    results: list[dict[str, Any]] = []

    def check(model: str, question: str, mode: str) -> None:
        t = time.perf_counter()
        text = ask(engine, model, question, template, mode)
        if model == manifest["base"]["served_name"]:
            ok = not any(m in text for m in markers.values())
        else:
            ok = text.lstrip().startswith(markers[model])
        results.append(
            {
                "model": model,
                "mode": mode,
                "question": question,
                "ok": ok,
                "answer": text,
                "seconds": round(time.perf_counter() - t, 3),
            }
        )
        print(
            f"{'PASS' if ok else 'FAIL'} {model:>8} {mode:<17} {question[:38]!r:<40} "
            f"-> {text[:60]!r}",
            file=sys.stderr,
            flush=True,
        )

    for a in manifest["adapters"]:
        print(f"load {a['name']}: {load_adapter(engine, a['name'], a['path'])}", file=sys.stderr)
    for model in [manifest["base"]["served_name"], *markers]:
        for question in HELD_OUT:
            check(model, question, "chat")
            check(model, question, "completion")
        check(model, HELD_OUT[0], "chat-stream")
        check(model, HELD_OUT[1], "completion-stream")
    if unload:
        for name in markers:
            _post_json(f"{engine}/v1/unload_lora_adapter", {"lora_name": name})
    summary: dict[str, Any] = {}
    for r in results:
        s = summary.setdefault(r["model"], {})
        kind = s.setdefault(r["mode"], {"passed": 0, "total": 0})
        kind["total"] += 1
        kind["passed"] += int(r["ok"])
    return {"ok": all(r["ok"] for r in results), "summary": summary, "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-url", required=True, help="vLLM server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--unload", action="store_true", help="unregister the adapters afterwards")
    ap.add_argument("--json-out", type=Path, help="also write the full results here")
    args = ap.parse_args(argv)
    manifest = json.loads(args.manifest.read_text())
    report = verify(args.engine_url.rstrip("/"), manifest, args.unload)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"ok": report["ok"], "summary": report["summary"]}, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
