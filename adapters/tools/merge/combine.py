"""The torch/peft half of a merge: load the inputs onto a weightless base, combine, save.

peft's `add_weighted_adapter` only reads and writes LoRA matrices, so the base model's weights are
never needed. The architecture is built from the base config on the meta device (no memory, no
init), then every `nn.Linear` gets a zero-stride CPU weight of its shape (one scalar of memory):
peft moves each adapter to its base layer's device, and a meta base would turn the adapters
into meta tensors too (their values gone). Nothing ever runs a forward pass, so the fake base
weights are never read. A base config that does not fit the adapters is caught by checking that
every input tensor was loaded unchanged (peft ignores unexpected keys silently).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from adapters.tools.merge.plan import CONFIG, WEIGHTS, MergePlan, MergeRefused

MERGED = "merged"


def combine(plan: MergePlan, base_config: Path, out: Path) -> dict[str, Any]:
    """Write the combined adapter's config + weights into `out` (an existing empty directory)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # base_model_name_or_path is never a hub id here
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file  # type: ignore[import-not-found]

    model = _weightless_base(base_config)
    names = [f"input{i}" for i in range(len(plan.inputs))]
    peft_model: Any = None
    for name, item in zip(names, plan.inputs, strict=True):
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(item.path), adapter_name=name)
            else:
                peft_model.load_adapter(str(item.path), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise MergeRefused(f"{item.path} does not fit the base config: {exc}") from None
        loaded = get_peft_model_state_dict(
            peft_model, adapter_name=name, save_embedding_layers=False
        )
        stored = load_file(str(item.path / WEIGHTS))
        if set(loaded) != set(stored) or not all(
            torch.equal(loaded[k].to(stored[k].dtype), stored[k]) for k in stored
        ):
            raise MergeRefused(f"{item.path}: its tensors do not all map onto the base config")
    peft_model.add_weighted_adapter(
        names,
        [i.weight for i in plan.inputs],
        MERGED,
        combination_type=plan.combination,
        svd_rank=plan.svd_rank,
        svd_full_matrices=False,  # only the top singular vectors are kept; same result, faster
    )
    dtypes = {t.dtype for i in plan.inputs for t in load_file(str(i.path / WEIGHTS)).values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    state = get_peft_model_state_dict(peft_model, adapter_name=MERGED, save_embedding_layers=False)
    save_file(
        {k: v.detach().to(dtype).contiguous() for k, v in state.items()},
        str(out / WEIGHTS),
        metadata={"format": "pt"},
    )
    config = _output_config(peft_model.peft_config[MERGED].to_dict(), plan)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in (CONFIG, WEIGHTS):
        (out / name).chmod(0o644)  # safetensors writes 0600; the engine may be another user
    return config


def _weightless_base(base_config: Path) -> Any:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base_config))
    except (OSError, ValueError) as exc:
        raise MergeRefused(f"{base_config}: not a usable base config: {exc}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            shape = (module.out_features, module.in_features)
            module.weight = nn.Parameter(torch.zeros(()).expand(shape), requires_grad=False)
    return model


def _output_config(config: dict[str, Any], plan: MergePlan) -> dict[str, Any]:
    """JSON-safe, deterministic (peft keeps target_modules as a set, ordered by the hash seed),
    and with the scaling the combined matrices assume: peft folds every input's scaling into
    them and sets lora_alpha = r (scale 1); with use_rslora copied from the first input the
    engine would scale by sqrt(r) instead."""
    targets = config.get("target_modules")
    if isinstance(targets, set | list | tuple):
        config["target_modules"] = sorted(targets)
    config["use_rslora"] = False
    config["inference_mode"] = True
    bases = {i.config.get("base_model_name_or_path") for i in plan.inputs}
    config["base_model_name_or_path"] = bases.pop() if len(bases) == 1 else None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
