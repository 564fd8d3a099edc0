"""Validation before traffic: is this directory a LoRA adapter the served engine can load safely?

Two steps, both synchronous and cheap (callers run them in a thread): `inspect_adapter` checks what
needs no base model (only safetensors, a peft LoRA config vLLM accepts, a well-formed safetensors
header, rank, target modules, size) and returns `AdapterFacts`; `check_against_base` compares
those facts with the served base (tensor shapes against its dimensions, base identity). Tensors
are never loaded: only the safetensors header (8-byte little-endian length + JSON) is parsed.
Why each rule exists, and the digest definitions, are in docs/adapters.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import (
    AdapterBaseMismatch,
    AdapterBaseUnknown,
    AdapterConfigInvalid,
    AdapterConfigMissing,
    AdapterFeatureUnsupported,
    AdapterPickleRefused,
    AdapterShapeMismatch,
    AdapterTargetUnsupported,
    AdapterTooLarge,
    AdapterWeightsMissing,
    BaseModelInvalid,
)
from adapters.peft_config import CONFIG, RankOf, check_config, read_config
from adapters.safetensors_header import TensorHeader, read_header

__all__ = [
    "CONFIG",
    "LLAMA_MODULES",
    "SIDECAR",
    "WEIGHTS",
    "AdapterFacts",
    "BaseModelInfo",
    "LoraTensor",
    "ValidationLimits",
    "check_against_base",
    "digest_adapter",
    "inspect_adapter",
    "sha256_files",
]

WEIGHTS = "adapter_model.safetensors"
SIDECAR = "loraplex.json"
"""Written by our training tools next to the adapter: `{"base_digest": "sha256:..."}`."""
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
LLAMA_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    """What the served engine accepts: `max_rank` must equal vLLM's `--max-lora-rank`."""

    max_rank: int = 16
    max_adapter_bytes: int = 2 << 30
    supported_modules: frozenset[str] = LLAMA_MODULES


@dataclass(frozen=True, slots=True)
class LoraTensor:
    """One `lora_A` / `lora_B` matrix of one decoder-layer projection."""

    name: str
    module_path: str  # e.g. "model.layers.3.self_attn.q_proj" (peft's "base_model.model." cut)
    module: str  # e.g. "q_proj"
    layer: int
    kind: str  # "lora_A" or "lora_B"
    dtype: str
    shape: tuple[int, ...]
    rank: int  # the rank peft uses for this module (config `r` or its `rank_pattern`)


@dataclass(frozen=True, slots=True)
class AdapterFacts:
    digest: str  # "sha256:<hex>" of adapter_config.json bytes then adapter_model.safetensors
    rank: int  # the largest rank of any module
    alpha: float
    target_modules: tuple[str, ...]  # module types that carry tensors, sorted
    size_bytes: int  # config + weights (what the engine reads)
    tensor_count: int
    dtypes: tuple[str, ...]
    declared_base_digest: str | None  # from the loraplex.json sidecar, if any
    use_rslora: bool
    tensors: tuple[LoraTensor, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class BaseModelInfo:
    """The served base model's identity and the dimensions LoRA shapes depend on."""

    digest: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_dir(cls, path: str | Path) -> BaseModelInfo:
        """Digest over config.json then every *.safetensors file sorted by name (one file for
        single-file checkpoints: the same bytes `adapters/tools/prepare.py` hashes)."""
        root = Path(path)
        config_path = root / "config.json"
        if not config_path.is_file():
            raise BaseModelInvalid(f"base model directory {root} has no config.json")
        shards = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        if not shards:
            raise BaseModelInvalid(f"base model directory {root} has no *.safetensors weights")
        try:
            config = json.loads(config_path.read_bytes())
        except ValueError as exc:
            raise BaseModelInvalid(f"base config.json is not valid JSON: {exc}") from None
        return cls.from_config(sha256_files([config_path, *shards]), config)

    @classmethod
    def from_config(cls, digest: str, config: Mapping[str, Any]) -> BaseModelInfo:
        """For an engine whose files the gateway cannot read: digest given, dims from its config."""
        if not _DIGEST_RE.match(digest):
            raise BaseModelInvalid(f"base digest must look like sha256:<64 hex>, got {digest!r}")
        cfg = config.get("text_config") if "hidden_size" not in config else config
        if not isinstance(cfg, Mapping):
            raise BaseModelInvalid("base config has no hidden_size (nor a text_config with one)")
        try:
            heads = _positive(cfg, "num_attention_heads")
            hidden = _positive(cfg, "hidden_size")
            head_dim = cfg.get("head_dim") or hidden // heads
            return cls(
                digest=digest,
                hidden_size=hidden,
                num_hidden_layers=_positive(cfg, "num_hidden_layers"),
                num_attention_heads=heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=int(head_dim),
                intermediate_size=_positive(cfg, "intermediate_size"),
                vocab_size=_positive(cfg, "vocab_size"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BaseModelInvalid(f"base config lacks a usable dimension: {exc}") from None

    def module_dims(self, module: str) -> tuple[int, int] | None:
        """(in_features, out_features) of a Llama-style decoder projection, None if unknown."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        dims = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        return dims.get(module)


def _positive(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key}={value!r}")
    return value


def sha256_files(paths: Iterable[Path]) -> str:
    """ "sha256:<hex>" of the files' bytes concatenated in the given order, streamed."""
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def digest_adapter(path: str | Path) -> str:
    """The adapter's content digest: adapter_config.json bytes then adapter_model.safetensors."""
    root = Path(path)
    if not (root / CONFIG).is_file():
        raise AdapterConfigMissing(f"adapter directory lacks {CONFIG}")
    if not (root / WEIGHTS).is_file():
        raise AdapterWeightsMissing(f"adapter directory lacks {WEIGHTS}")
    return sha256_files([root / CONFIG, root / WEIGHTS])


def inspect_adapter(path: str | Path, limits: ValidationLimits) -> AdapterFacts:
    """Everything checkable without the base model; raises the first `AdapterRejected` found."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterConfigMissing(f"adapter path {root.name!r} is not a directory")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterPickleRefused(
            f"pickle files are refused (only safetensors weights): {', '.join(pickles)}"
        )
    if not (root / CONFIG).is_file():
        raise AdapterConfigMissing(f"adapter directory lacks {CONFIG}")
    config = read_config(root / CONFIG)
    rank_of = check_config(config, max_rank=limits.max_rank, supported=limits.supported_modules)
    weights = root / WEIGHTS
    if not weights.is_file():
        raise AdapterWeightsMissing(f"adapter directory lacks {WEIGHTS}")
    size = (root / CONFIG).stat().st_size + weights.stat().st_size
    if size > limits.max_adapter_bytes:
        raise AdapterTooLarge(
            f"adapter is {size} bytes, over the limit of {limits.max_adapter_bytes}"
        )
    tensors = _lora_tensors(read_header(weights), rank_of, limits)
    declared = _read_sidecar(root / SIDECAR)
    return AdapterFacts(
        digest=digest_adapter(root),
        rank=max([t.rank for t in tensors]),
        alpha=float(config["lora_alpha"]),
        target_modules=tuple(sorted({t.module for t in tensors})),
        size_bytes=size,
        tensor_count=len(tensors),
        dtypes=tuple(sorted({t.dtype for t in tensors})),
        declared_base_digest=declared,
        use_rslora=bool(config.get("use_rslora", False)),
        tensors=tuple(tensors),
    )


def check_against_base(
    facts: AdapterFacts,
    base: BaseModelInfo,
    *,
    declared_base_digest: str | None = None,
    allow_unknown_base: bool = False,
) -> None:
    """Shapes against the base's dimensions, then identity: an adapter trained on another base
    (even one with the same shapes, e.g. bf16 vs W4) serves garbage (docs/VLLM_CPU notes)."""
    for t in facts.tensors:
        if t.layer >= base.num_hidden_layers:
            raise AdapterShapeMismatch(
                f"{t.name}: layer {t.layer}, but the base has {base.num_hidden_layers} layers"
            )
        dims = base.module_dims(t.module)
        if dims is None:
            raise AdapterTargetUnsupported(f"{t.name}: no known shape for module {t.module!r}")
        in_features, out_features = dims
        want = (t.rank, in_features) if t.kind == "lora_A" else (out_features, t.rank)
        if t.shape != want:
            raise AdapterShapeMismatch(
                f"{t.name}: shape {list(t.shape)}, the base model needs {list(want)}"
            )
    if declared_base_digest is not None and not _DIGEST_RE.match(declared_base_digest):
        raise AdapterConfigInvalid(
            f"declared base digest must look like sha256:<64 hex>, got {declared_base_digest!r}"
        )
    carried = facts.declared_base_digest
    if declared_base_digest and carried and declared_base_digest != carried:
        raise AdapterBaseMismatch(
            f"the request declares base {declared_base_digest} but the adapter's {SIDECAR} "
            f"declares {carried}"
        )
    claimed = declared_base_digest or carried
    if claimed is None:
        if allow_unknown_base:
            return
        raise AdapterBaseUnknown(
            f"the adapter does not say which base it was trained on: add {SIDECAR} "
            '{"base_digest": ...} or declare base_digest when registering'
        )
    if claimed != base.digest:
        raise AdapterBaseMismatch(
            f"adapter was trained on base {claimed}, the engine serves {base.digest}"
        )


def _lora_tensors(
    header: list[TensorHeader], rank_of: RankOf, limits: ValidationLimits
) -> list[LoraTensor]:
    if not header:
        raise AdapterWeightsMissing(f"{WEIGHTS} holds no tensors")
    tensors = [_classify(t, rank_of, limits) for t in header]
    by_module: dict[str, dict[str, LoraTensor]] = {}
    for t in tensors:
        by_module.setdefault(t.module_path, {})[t.kind] = t
    for module_path, pair in sorted(by_module.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterShapeMismatch(f"{module_path} has {sorted(pair)} but needs both A and B")
        a, b = pair["lora_A"], pair["lora_B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise AdapterShapeMismatch(f"{module_path}: LoRA matrices must be 2-D")
        if a.shape[0] != a.rank or b.shape[1] != a.rank:
            raise AdapterShapeMismatch(
                f"{module_path}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not have "
                f"the configured rank {a.rank}"
            )
    return tensors


def _classify(t: TensorHeader, rank_of: RankOf, limits: ValidationLimits) -> LoraTensor:
    parts = t.name.removeprefix("base_model.model.").split(".")
    if "lora_magnitude_vector" in parts:
        raise AdapterFeatureUnsupported(f"{t.name}: DoRA magnitude vectors are not served")
    if not any(p.startswith("lora_") for p in parts):
        raise AdapterFeatureUnsupported(
            f"{t.name}: full (non-LoRA) weights, e.g. modules_to_save, are not served"
        )
    if len(parts) < 3 or parts[-2] not in ("lora_A", "lora_B") or parts[-1] != "weight":
        if parts[-1] == "bias":
            raise AdapterFeatureUnsupported(f"{t.name}: LoRA bias is not served")
        raise AdapterTargetUnsupported(f"{t.name}: not a LoRA weight of a supported module")
    module_parts = parts[:-2]
    module = module_parts[-1]
    layer = _layer_index(module_parts)
    if module not in limits.supported_modules or layer is None:
        raise AdapterTargetUnsupported(
            f"{t.name}: module {module!r} is not supported "
            f"(supported: decoder-layer {sorted(limits.supported_modules)})"
        )
    module_path = ".".join(module_parts)
    return LoraTensor(
        name=t.name,
        module_path=module_path,
        module=module,
        layer=layer,
        kind=parts[-2],
        dtype=t.dtype,
        shape=t.shape,
        rank=rank_of(module_path),
    )


def _layer_index(module_parts: list[str]) -> int | None:
    for i, part in enumerate(module_parts[:-1]):
        if part in ("layers", "h", "blocks") and module_parts[i + 1].isdigit():
            return int(module_parts[i + 1])
    return None


def _read_sidecar(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        sidecar = json.loads(path.read_bytes())
    except ValueError as exc:
        raise AdapterConfigInvalid(f"{SIDECAR} is not valid JSON: {exc}") from None
    if not isinstance(sidecar, dict):
        raise AdapterConfigInvalid(f"{SIDECAR} must be a JSON object")
    digest = sidecar.get("base_digest")
    if digest is None:
        return None
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise AdapterConfigInvalid(f"{SIDECAR} base_digest must look like sha256:<64 hex>")
    return digest
