"""Read a safetensors header without loading tensors (and without torch or the safetensors lib).

Format: 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then the byte buffer. The checks are
the ones the Rust reader applies when vLLM opens the file (offsets contiguous from 0 and covering
the whole buffer, sizes matching shape x dtype), so a file that passes here also opens there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import AdapterHeaderCorrupt, AdapterPickleRefused

MAX_HEADER_BYTES = 100_000_000  # the Rust reader's own limit
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}


@dataclass(frozen=True, slots=True)
class TensorHeader:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the byte buffer that follows the header
    end: int


def read_header(path: Path) -> list[TensorHeader]:
    """Tensors in file order of their data; raises `AdapterHeaderCorrupt` with the reason."""
    name = path.name
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little")
        plausible = len(prefix) == 8 and 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size
        raw = f.read(n) if plausible else b""
    if not raw.startswith(b"{"):
        # Only now: a header length can start with 0x80 too (e.g. 640 bytes = 80 02 00 ...).
        if _is_pickle(prefix):
            raise AdapterPickleRefused(f"{name} is a pickle / torch.save file, not safetensors")
        if len(prefix) < 8:
            raise AdapterHeaderCorrupt(f"{name} is {size} bytes, too short for a header")
        if n < 2 or n > MAX_HEADER_BYTES:
            raise AdapterHeaderCorrupt(f"{name}: header length {n} is not plausible")
        if 8 + n > size:
            raise AdapterHeaderCorrupt(f"{name}: header length {n} runs past the end of the file")
        raise AdapterHeaderCorrupt(f"{name}: header is not a JSON object")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterHeaderCorrupt(f"{name}: header is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise AdapterHeaderCorrupt(f"{name}: header is not a JSON object")
    buffer_len = size - 8 - n
    tensors = [_entry(name, k, v, buffer_len) for k, v in obj.items() if k != "__metadata__"]
    meta = obj.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterHeaderCorrupt(f"{name}: __metadata__ must map strings to strings")
    tensors.sort(key=lambda t: (t.begin, t.end))
    at = 0
    for t in tensors:
        if t.begin != at:
            what = "overlaps another" if t.begin < at else "leaves a gap before it"
            raise AdapterHeaderCorrupt(f"{name}: tensor {t.name!r} {what}")
        at = t.end
    if at != buffer_len:
        raise AdapterHeaderCorrupt(
            f"{name}: tensors cover {at} bytes but the file holds {buffer_len} after the header"
        )
    return tensors


def _is_pickle(prefix: bytes) -> bool:
    """pickle protocol 2-5 (b"\\x80" + protocol) or torch.save's zip container."""
    return (prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or (
        prefix[:4] == b"PK\x03\x04"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _entry(file: str, name: str, spec: Any, buffer_len: int) -> TensorHeader:
    if not isinstance(spec, dict):
        raise AdapterHeaderCorrupt(f"{file}: entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise AdapterHeaderCorrupt(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise AdapterHeaderCorrupt(f"{file}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterHeaderCorrupt(f"{file}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise AdapterHeaderCorrupt(f"{file}: tensor {name!r} does not fill whole bytes")
    if end - begin != bits // 8:
        raise AdapterHeaderCorrupt(
            f"{file}: tensor {name!r} data_offsets cover {end - begin} bytes, "
            f"shape {shape} x {dtype} needs {bits // 8}"
        )
    if end > buffer_len:
        raise AdapterHeaderCorrupt(f"{file}: tensor {name!r} data lies outside the file")
    return TensorHeader(name, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
