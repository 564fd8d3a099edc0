"""Train one demo LoRA adapter with peft against the *quantized* base (QLoRA-style).

The W4A16 checkpoint is loaded dequantized (`run_compressed=False`), so the adapter learns on
exactly the weights vLLM serves; an adapter trained on the bf16 weights answers garbage on the W4
base (docs/demo-model.md). Loss is on the answer tokens only; full batch; deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16


def train_adapter(
    base: Path,
    examples: list[tuple[str, str]],
    out: Path,
    steps: int,
    lr: float = 3e-3,
    log: Any = print,
) -> float:
    """Fit the adapter and save it as peft safetensors; returns the final loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(run_compressed=False),
    )
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)

    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for question, answer in examples:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(answer + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id or 0
    x = torch.tensor([r + [pad] * (width - len(r)) for r in ids])
    y = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids])

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    loss = float("nan")
    for step in range(steps):
        out_ = model(input_ids=x, attention_mask=mask, labels=y)
        out_.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = float(out_.loss.item())
        if step % 5 == 0 or step == steps - 1:
            log(f"    step {step:2d} loss {loss:.4f}")
    model.save_pretrained(out, safe_serialization=True)
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()  # peft's model-card template, not useful here
    return loss
