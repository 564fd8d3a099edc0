"""Tiny but valid base-model and LoRA adapter directories for in-process tests (no torch).

The fake engine does not read them; the registry's validation does, exactly as for real ones.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BASE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 16,
    "vocab_size": 32,
}


def write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], fill: int = 0) -> None:
    """F32 tensors of the given shapes; `fill` varies the bytes (and so the digest)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes([fill % 256]) * offset)


def make_base(root: Path) -> tuple[Path, str]:
    """A base model dir and its digest (as the gateway computes it)."""
    from adapters.validate import BaseModelInfo

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(BASE_CONFIG))
    write_safetensors(root / "model.safetensors", {"model.embed_tokens.weight": (32, 8)})
    return root, BaseModelInfo.from_dir(root).digest


def make_adapter(root: Path, name: str, base_digest: str, *, rank: int = 4, fill: int = 1) -> Path:
    """A q_proj/v_proj LoRA adapter for `make_base`'s model, declaring `base_digest`."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny",
        "task_type": "CAUSAL_LM",
    }
    (d / "adapter_config.json").write_text(json.dumps(config, sort_keys=True))
    h, kv = BASE_CONFIG["hidden_size"], 4  # kv heads x head_dim = 1 x 4
    tensors: dict[str, tuple[int, ...]] = {}
    for layer in range(BASE_CONFIG["num_hidden_layers"]):
        for module, out in (("q_proj", h), ("v_proj", kv)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rank, h)
            tensors[f"{prefix}.lora_B.weight"] = (out, rank)
    write_safetensors(d / "adapter_model.safetensors", tensors, fill)
    (d / "loraplex.json").write_text(json.dumps({"base_digest": base_digest}))
    return d
