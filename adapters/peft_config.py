"""The peft LoRA configuration rules vLLM 0.32 applies when it loads an adapter
(vllm/lora/peft_helper.py: PEFTHelper.validate_legal and _validate_features), checked before
the engine sees the adapter, plus our own: target modules we can shape-check.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import (
    AdapterConfigInvalid,
    AdapterFeatureUnsupported,
    AdapterNotLora,
    AdapterRankTooHigh,
    AdapterTargetUnsupported,
)

CONFIG = "adapter_config.json"
# init_lora_weights strings vLLM accepts (they only set initial adapter weights).
PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
_REPEATED_GROUP = re.compile(r"\)[*+{]")


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_bytes())
    except ValueError as exc:
        raise AdapterConfigInvalid(f"{CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterConfigInvalid(f"{CONFIG} must be a JSON object")
    return config


def check_config(config: dict[str, Any], *, max_rank: int, supported: frozenset[str]) -> RankOf:
    """The peft LoRA config rules vLLM 0.32 applies (vllm/lora/peft_helper.py), plus ours."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterNotLora(f"peft_type is {peft_type!r}; only LORA adapters are served")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterConfigInvalid(f"{CONFIG} lacks {key!r}")
    r, alpha = config["r"], config["lora_alpha"]
    if not _is_positive_int(r):
        raise AdapterConfigInvalid(f"r must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterConfigInvalid(f"lora_alpha must be a number, got {alpha!r}")
    check_features(config)
    targets = config["target_modules"]
    if isinstance(targets, list):
        if not all(isinstance(t, str) for t in targets):
            raise AdapterConfigInvalid("target_modules must be a list of module names")
        unsupported = sorted(set(targets) - supported)
        if unsupported:
            raise AdapterTargetUnsupported(
                f"target modules {unsupported} are not supported (supported: {sorted(supported)})"
            )
    elif not isinstance(targets, str):  # a regex or "all-linear": the tensors decide
        raise AdapterConfigInvalid("target_modules must be a list or a string")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_positive_int(v) for v in pattern.values()):
        raise AdapterConfigInvalid("rank_pattern must map module patterns to positive integers")
    for key in pattern:
        # Keys are regexes run against every module name; a repeated group can backtrack for
        # hours on a 40-character name, so those (never needed to name modules) are refused.
        if len(key) > 256 or _REPEATED_GROUP.search(key):
            raise AdapterConfigInvalid(f"rank_pattern key {key[:60]!r} is too complex")
    try:
        compiled = {re.compile(rf"(.*\.)?({key})$"): rank for key, rank in pattern.items()}
    except re.error as exc:
        raise AdapterConfigInvalid(f"rank_pattern key is not a regex: {exc}") from None
    highest = max([r, *pattern.values()])
    if highest > max_rank:
        raise AdapterRankTooHigh(
            f"LoRA rank {highest} is above the engine's max LoRA rank {max_rank}"
        )
    return RankOf(r, compiled)


def check_features(config: dict[str, Any]) -> None:
    refused = []
    if config.get("use_dora"):
        refused.append("DoRA (use_dora)")
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    if config.get("lora_bias"):
        refused.append("LoRA bias (lora_bias)")
    if config.get("modules_to_save"):
        refused.append(f"modules_to_save={config['modules_to_save']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        refused.append(f"init_lora_weights={init!r} (it modifies the base weights)")
    for key, what in (
        ("alora_invocation_tokens", "Activated LoRA"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            refused.append(what)
    if refused:
        raise AdapterFeatureUnsupported(f"vLLM does not serve: {'; '.join(refused)}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, slots=True)
class RankOf:
    """peft's rank for a module: `rank_pattern`'s first key matching a dotted suffix, else r."""

    r: int
    pattern: dict[re.Pattern[str], int]

    def __call__(self, module_path: str) -> int:
        for regex, rank in self.pattern.items():
            if regex.match(module_path):
                return rank
        return self.r
