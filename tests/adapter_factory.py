"""Synthetic bases and adapters, and a table of bad adapters, shared by unit and e2e tests.

Safetensors files are written by hand (header + zero bytes): no torch or numpy needed. Each
`BadCase` turns a *good* adapter directory (a synthetic one, or a real demo adapter) into a
corrupted copy — a directory or an archive — that the gateway must refuse with `case.code`.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.safetensors_header import DTYPE_BITS, read_header
from adapters.validate import CONFIG, SIDECAR, WEIGHTS, sha256_files

TINY_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 100,
}
OTHER_BASE_DIGEST = "sha256:" + "0" * 64
Spec = Mapping[str, tuple[str, list[int]]]  # tensor name -> (dtype, shape)


def write_safetensors(path: Path, tensors: Spec, metadata: Mapping[str, str] | None = None) -> None:
    """A valid safetensors file whose tensors are all zeros."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def read_spec(path: Path) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (t.dtype, list(t.shape)) for t in read_header(path)}


def write_base(root: Path, config: Mapping[str, Any] = TINY_BASE_CONFIG) -> Path:
    """A base model directory (config.json + one-tensor model.safetensors)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_safetensors(
        root / "model.safetensors",
        {"model.embed_tokens.weight": ("BF16", [config["vocab_size"], config["hidden_size"]])},
    )
    return root


def base_digest(root: Path) -> str:
    return sha256_files([root / "config.json", root / "model.safetensors"])


def module_dims(config: Mapping[str, Any], module: str) -> tuple[int, int]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    inter = config["intermediate_size"]
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[module]


def lora_spec(
    config: Mapping[str, Any], rank: int, modules: tuple[str, ...], dtype: str = "F32"
) -> dict[str, tuple[str, list[int]]]:
    spec: dict[str, tuple[str, list[int]]] = {}
    for layer in range(config["num_hidden_layers"]):
        for module in modules:
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            fan_in, fan_out = module_dims(config, module)
            spec[f"{prefix}.lora_A.weight"] = (dtype, [rank, fan_in])
            spec[f"{prefix}.lora_B.weight"] = (dtype, [fan_out, rank])
    return spec


def make_adapter(
    root: Path,
    *,
    base_config: Mapping[str, Any] = TINY_BASE_CONFIG,
    base_digest: str | None = None,
    rank: int = 4,
    alpha: float = 8,
    modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    dtype: str = "F32",
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """A peft-style LoRA adapter directory for `base_config` (sidecar written if digest given)."""
    root.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-base",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(modules),
        **(config_overrides or {}),
    }
    (root / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    write_safetensors(root / WEIGHTS, lora_spec(base_config, rank, modules, dtype))
    if base_digest is not None:
        (root / SIDECAR).write_text(json.dumps({"base_digest": base_digest}), encoding="utf-8")
    return root


# ---- comparing trees ------------------------------------------------------------------------


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def zip_of(d: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files_of(d).items():
            zf.writestr(name, data)
    return buf.getvalue()


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


# ---- the table of bad adapters ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caps:
    """The limits the gateway under test was configured with (cases size themselves by these)."""

    max_rank: int = 16
    max_adapter_bytes: int = 1 << 20  # below max_extracted_bytes: "oversize" must pass the copy
    max_archive_bytes: int = 64 << 20
    max_extracted_bytes: int = 2 << 20  # the zip bomb expands just past this


@dataclass(frozen=True, slots=True)
class BadCase:
    name: str
    code: str  # the error code the gateway must answer with
    stage: str  # "source" (materialize), "inspect" or "base" (check_against_base)
    build: Callable[[Path, Path, Caps], Path]  # (good adapter dir, output dir, caps) -> source

    def make(self, good: Path, out_root: Path, caps: Caps = Caps()) -> Path:
        out = out_root / self.name
        out.mkdir(parents=True)
        return self.build(good, out, caps)


def _copy(good: Path, out: Path) -> Path:
    dest = out / "adapter"
    shutil.copytree(good, dest)
    return dest


def _edit_config(good: Path, out: Path, **changes: Any) -> Path:
    d = _copy(good, out)
    config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    config.update(changes)
    (d / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return d


def _pickle_bin(good: Path, out: Path, caps: Caps) -> Path:
    d = _copy(good, out)
    (d / WEIGHTS).rename(d / "adapter_model.bin")
    return d


def _pickle_disguised(good: Path, out: Path, caps: Caps) -> Path:
    d = _copy(good, out)
    # protocol-2 pickle opcodes, as torch.save's legacy format starts
    (d / WEIGHTS).write_bytes(b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01u.")
    return d


def _missing_config(good: Path, out: Path, caps: Caps) -> Path:
    d = _copy(good, out)
    (d / CONFIG).unlink()
    return d


def _invalid_config(good: Path, out: Path, caps: Caps) -> Path:
    d = _copy(good, out)
    (d / CONFIG).write_text('{"r": 8, "lora_alpha": ', encoding="utf-8")
    return d


def _missing_weights(good: Path, out: Path, caps: Caps) -> Path:
    d = _copy(good, out)
    (d / WEIGHTS).unlink()
    return d


def _reshaped(good: Path, out: Path, reshape: Callable[[str, list[int]], list[int]]) -> Path:
    d = _copy(good, out)
    spec = {n: (dt, reshape(n, shape)) for n, (dt, shape) in read_spec(d / WEIGHTS).items()}
    write_safetensors(d / WEIGHTS, spec)
    return d


def _rank_too_high(good: Path, out: Path, caps: Caps) -> Path:
    rank = caps.max_rank * 2

    def reshape(name: str, shape: list[int]) -> list[int]:
        return [rank, shape[1]] if ".lora_A." in name else [shape[0], rank]

    d = _reshaped(good, out, reshape)
    config = json.loads((d / CONFIG).read_text(encoding="utf-8"))
    config.update(r=rank, lora_alpha=rank * 2)
    (d / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    return d


def _wrong_shapes(good: Path, out: Path, caps: Caps) -> Path:
    """Consistent file, rank and pairs; lora_A's input width no longer matches the base."""
    return _reshaped(good, out, lambda name, s: [s[0], s[1] + 8] if ".lora_A." in name else list(s))


def _corrupt_header(good: Path, out: Path, caps: Caps) -> Path:
    d = _copy(good, out)
    with (d / WEIGHTS).open("r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    return d


def _truncated(good: Path, out: Path, caps: Caps) -> Path:
    d = _copy(good, out)
    size = (d / WEIGHTS).stat().st_size
    header_end = 8 + struct.unpack("<Q", (d / WEIGHTS).read_bytes()[:8])[0]
    with (d / WEIGHTS).open("r+b") as f:
        f.truncate(header_end + (size - header_end) // 2)
    return d


def _oversize(good: Path, out: Path, caps: Caps) -> Path:
    """A well-formed adapter whose weights exceed `max_adapter_bytes` (sparse: costs no disk)."""
    d = _copy(good, out)
    spec = read_spec(d / WEIGHTS)
    spec["base_model.model.model.layers.0.self_attn.q_proj.lora_pad.weight"] = (
        "U8",
        [caps.max_adapter_bytes + 1],
    )
    write_safetensors(d / WEIGHTS, spec)
    return d


def _tar(out: Path, good: Path, extra: Callable[[tarfile.TarFile], None]) -> Path:
    path = out / "adapter.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for f in sorted(good.iterdir()):
            tf.add(f, arcname=f"adapter/{f.name}")
        extra(tf)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> Any:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _traversal(good: Path, out: Path, caps: Caps) -> Path:
    return _tar(out, good, lambda tf: tf.addfile(*_member("adapter/../../evil.txt", data=b"x")))


def _absolute(good: Path, out: Path, caps: Caps) -> Path:
    return _tar(out, good, lambda tf: tf.addfile(*_member("/tmp/loraplex-evil", data=b"x")))


def _symlink_escape(good: Path, out: Path, caps: Caps) -> Path:
    link = _member("adapter/README.md", tarfile.SYMTYPE, link="../../../etc/passwd")
    return _tar(out, good, lambda tf: tf.addfile(*link))


def _hardlink_escape(good: Path, out: Path, caps: Caps) -> Path:
    link = _member("adapter/README.md", tarfile.LNKTYPE, link="../outside")
    return _tar(out, good, lambda tf: tf.addfile(*link))


def _device(good: Path, out: Path, caps: Caps) -> Path:
    return _tar(out, good, lambda tf: tf.addfile(*_member("adapter/null", tarfile.CHRTYPE)))


def _zip_bomb(good: Path, out: Path, caps: Caps) -> Path:
    """Tiny on the wire, expands past `max_extracted_bytes` (zeros deflate ~1000:1)."""
    path = out / "adapter.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(good.iterdir()):
            zf.write(f, arcname=f"adapter/{f.name}")
        with zf.open("adapter/padding.bin", "w", force_zip64=True) as big:
            chunk = bytes(1 << 20)
            for _ in range(caps.max_extracted_bytes // len(chunk) + 1):
                big.write(chunk)
    return path


def _zip_symlink(good: Path, out: Path, caps: Caps) -> Path:
    path = out / "adapter.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(good.iterdir()):
            zf.write(f, arcname=f.name)
        info = zipfile.ZipInfo("README.md")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return path


BAD_ADAPTERS: tuple[BadCase, ...] = (
    BadCase("pickle-bin", "adapter_pickle_refused", "inspect", _pickle_bin),
    BadCase("pickle-disguised", "adapter_pickle_refused", "inspect", _pickle_disguised),
    BadCase("missing-config", "adapter_config_missing", "inspect", _missing_config),
    BadCase("invalid-config", "adapter_config_invalid", "inspect", _invalid_config),
    BadCase(
        "not-lora",
        "adapter_not_lora",
        "inspect",
        lambda g, o, c: _edit_config(g, o, peft_type="IA3"),
    ),
    BadCase(
        "dora",
        "adapter_feature_unsupported",
        "inspect",
        lambda g, o, c: _edit_config(g, o, use_dora=True),
    ),
    BadCase(
        "target-unsupported",
        "adapter_target_unsupported",
        "inspect",
        lambda g, o, c: _edit_config(g, o, target_modules=["lm_head", "q_proj"]),
    ),
    BadCase("missing-weights", "adapter_weights_missing", "inspect", _missing_weights),
    BadCase("rank-too-high", "adapter_rank_too_high", "inspect", _rank_too_high),
    BadCase("corrupt-header", "adapter_header_corrupt", "inspect", _corrupt_header),
    BadCase("truncated", "adapter_header_corrupt", "inspect", _truncated),
    BadCase("oversize", "adapter_too_large", "inspect", _oversize),
    BadCase("wrong-shapes", "adapter_shape_mismatch", "base", _wrong_shapes),
    BadCase(
        "wrong-base",
        "adapter_base_mismatch",
        "base",
        lambda g, o, c: _with_sidecar(g, o, OTHER_BASE_DIGEST),
    ),
    BadCase("unknown-base", "adapter_base_unknown", "base", lambda g, o, c: _with_sidecar(g, o)),
    BadCase("traversal-archive", "archive_unsafe", "source", _traversal),
    BadCase("absolute-path-archive", "archive_unsafe", "source", _absolute),
    BadCase("symlink-escape", "archive_unsafe", "source", _symlink_escape),
    BadCase("hardlink-escape", "archive_unsafe", "source", _hardlink_escape),
    BadCase("device-file", "archive_unsafe", "source", _device),
    BadCase("zip-symlink-escape", "archive_unsafe", "source", _zip_symlink),
    BadCase("zip-bomb", "archive_too_large", "source", _zip_bomb),
)


def _with_sidecar(good: Path, out: Path, digest: str | None = None) -> Path:
    d = _copy(good, out)
    (d / SIDECAR).unlink(missing_ok=True)
    if digest is not None:
        (d / SIDECAR).write_text(json.dumps({"base_digest": digest}), encoding="utf-8")
    return d
