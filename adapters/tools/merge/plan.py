"""What a merge will do, decided from the inputs' small files before torch is imported.

Stdlib only (no gateway modules: the tools venv lacks their dependencies), so the refusals an
operator is most likely to hit (bad weight syntax, inputs trained on different bases, a result
rank the engine cannot serve) cost nothing and the heavy part never starts. Rank rules mirror
peft's `LoraModel._check_add_weighted_adapter` (peft 0.21): `cat` sums the ranks, `linear` needs
equal ranks and keeps them, `svd` keeps the largest rank unless `svd_rank` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
SIDECAR = "loraplex.json"  # adapters.validate.SIDECAR; this module runs without the gateway
COMBINATIONS = ("cat", "linear", "svd")
DEFAULT_MAX_RANK = 16  # the demo engine's --max-lora-rank
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class MergeRefused(Exception):
    """A merge that must not run; the CLI prints the message and exits 2."""


@dataclass(frozen=True, slots=True)
class MergeInput:
    path: Path
    weight: float
    rank: int  # peft's allocation rank: max of r and rank_pattern values
    digest: str  # the adapter digest (adapters.validate.digest_adapter): config then weights
    base_digest: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class MergePlan:
    inputs: tuple[MergeInput, ...]
    combination: str
    rank: int  # the result's rank
    base_digest: str
    svd_rank: int | None

    def describe(self) -> dict[str, Any]:
        """Provenance: what the sidecar and the printed result line record."""
        return {
            "inputs": [{"path": str(i.path), "digest": i.digest} for i in self.inputs],
            "weights": [i.weight for i in self.inputs],
            "combination": self.combination,
            "rank": self.rank,
            "base_digest": self.base_digest,
        }


def parse_source(text: str) -> tuple[Path, float]:
    """`DIR:WEIGHT`; split at the last colon so a directory may contain colons."""
    path, sep, weight = text.rpartition(":")
    if not sep or not path:
        raise MergeRefused(f"input {text!r} must look like DIR:WEIGHT (e.g. adapters/a:0.5)")
    try:
        value = float(weight)
    except ValueError:
        raise MergeRefused(f"input {text!r}: weight {weight!r} is not a number") from None
    if not math.isfinite(value):
        raise MergeRefused(f"input {text!r}: weight must be finite")
    return Path(path), value


def read_input(path: Path, weight: float) -> MergeInput:
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise MergeRefused(f"{path}: not a peft adapter directory (needs {CONFIG} + {WEIGHTS})")
    try:
        config = json.loads((path / CONFIG).read_bytes())
    except ValueError as exc:
        raise MergeRefused(f"{path / CONFIG}: not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise MergeRefused(f"{path}: only peft LoRA adapters can be merged")
    if config.get("use_dora"):
        raise MergeRefused(f"{path}: DoRA adapters cannot be merged this way")
    r = config.get("r")
    pattern = config.get("rank_pattern") or {}
    values = [r, *pattern.values()] if isinstance(pattern, dict) else [r]
    ranks = [x for x in values if isinstance(x, int) and not isinstance(x, bool) and x > 0]
    if len(ranks) != len(values):
        raise MergeRefused(f"{path}: r / rank_pattern must be positive integers")
    return MergeInput(
        path=path,
        weight=weight,
        rank=max(ranks),
        digest=adapter_digest(path),
        base_digest=_sidecar_base_digest(path),
        config=config,
    )


def make_plan(
    sources: list[tuple[Path, float]],
    combination: str,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    svd_rank: int | None = None,
) -> MergePlan:
    """Every check that needs no tensor; raises `MergeRefused` with the reason."""
    if len(sources) < 2:
        raise MergeRefused("a merge needs at least two input adapters")
    if combination not in COMBINATIONS:
        raise MergeRefused(f"combination must be one of {', '.join(COMBINATIONS)}")
    if svd_rank is not None and (combination != "svd" or svd_rank < 1):
        raise MergeRefused("--svd-rank is a positive rank and only applies to --combination svd")
    inputs = tuple(read_input(p.resolve(), w) for p, w in sources)
    bases = {i.base_digest for i in inputs}
    if len(bases) != 1:
        listing = "; ".join(f"{i.path}: {i.base_digest}" for i in inputs)
        raise MergeRefused(
            f"the inputs were trained on different base models ({listing}); an adapter only "
            "makes sense on the base it was trained on, so they cannot be combined"
        )
    kinds = {type(i.config.get("target_modules")).__name__ for i in inputs}
    if len(kinds) != 1:
        raise MergeRefused("inputs mix list and regex target_modules; peft cannot combine them")
    ranks = [i.rank for i in inputs]
    if combination == "linear" and len(set(ranks)) != 1:
        raise MergeRefused(f"linear combination needs equal ranks, got {ranks} (use cat or svd)")
    rank = {"cat": sum(ranks), "linear": ranks[0], "svd": svd_rank or max(ranks)}[combination]
    if rank > max_rank:
        raise MergeRefused(
            f"the {combination} result would have rank {rank}, above the engine's max LoRA rank "
            f"{max_rank} (pass --max-rank if the engine serves more, or use svd with --svd-rank)"
        )
    return MergePlan(inputs, combination, rank, bases.pop(), svd_rank)


def _sidecar_base_digest(path: Path) -> str:
    sidecar = path / SIDECAR
    if not sidecar.is_file():
        raise MergeRefused(
            f"{path}: no {SIDECAR}, so its base model is unknown; a merge must know that all "
            'inputs share one base (write {"base_digest": "sha256:..."} next to the adapter)'
        )
    try:
        body = json.loads(sidecar.read_bytes())
    except ValueError as exc:
        raise MergeRefused(f"{sidecar}: not valid JSON: {exc}") from None
    digest = body.get("base_digest") if isinstance(body, dict) else None
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise MergeRefused(f"{sidecar}: lacks a base_digest of the form sha256:<64 hex>")
    return digest


def adapter_digest(root: Path) -> str:
    """adapters.validate.digest_adapter's definition: config bytes, then weights bytes."""
    h = hashlib.sha256()
    for path in (root / CONFIG, root / WEIGHTS):
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
