"""Train the demo LoRA adapters with peft against the *quantized* base (QLoRA-style).

The W4A16 checkpoint is loaded dequantized (`run_compressed=False`), so the adapters learn on
exactly the weights vLLM serves; an adapter trained on the bf16 weights answers garbage on the W4
base (docs/demo-model.md). The base is loaded once and each adapter is injected, trained, saved
and removed in turn. Training data are chat-formatted with the tokenizer's own template (what
vLLM's chat endpoint and the documented /v1/completions prompt send); the loss covers the answer
tokens only and the LM head runs only on those positions (a fifth of the compute otherwise).
Full batch, fixed seeds, deterministic on a given machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA = 8, 16
LEARNING_RATE = 3e-3
MAX_STEPS = 40
# Stop early once the answers are memorised: more steps only cost time on 2 cores.
MIN_STEPS, STOP_LOSS = 12, 0.02
SEED = 0


class Trainer:
    """Holds the dequantized base and the tokenizer; trains one adapter per `train` call."""

    def __init__(self, base: Path, log: Callable[[str], None]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils.quantization_config import CompressedTensorsConfig

        self.log = log
        self.tokenizer: Any = AutoTokenizer.from_pretrained(base)
        self.model: Any = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(run_compressed=False),
        )
        for p in self.model.parameters():
            p.requires_grad_(False)

    def chat_prompt(self, question: str) -> str:
        prompt: str = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return prompt

    def _batch(self, examples: list[tuple[str, str]]) -> tuple[Any, Any, Any, Any]:
        """Right-padded ids, mask, and (row, position) indices of answer predictions."""
        import torch

        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        rows: list[list[int]] = []
        starts: list[int] = []
        for question, answer in examples:
            p_ids = self.tokenizer(self.chat_prompt(question), add_special_tokens=False)
            a_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
            starts.append(len(p_ids["input_ids"]))
            rows.append(p_ids["input_ids"] + a_ids)
        width = max(map(len, rows))
        ids = torch.tensor([r + [end] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        # Hidden state at t predicts token t+1: answer tokens sit at [start, len(row)).
        row_idx = [i for i, r in enumerate(rows) for _ in range(starts[i], len(r))]
        pos_idx = [t - 1 for i, r in enumerate(rows) for t in range(starts[i], len(r))]
        targets = ids[row_idx, [t + 1 for t in pos_idx]]
        return ids, mask, (torch.tensor(row_idx), torch.tensor(pos_idx)), targets

    def train(self, examples: list[tuple[str, str]], out: Path) -> dict[str, Any]:
        """Fit one adapter, save it as peft safetensors, return its training record."""
        import torch
        import torch.nn.functional as F
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        set_seed(SEED)  # python, numpy and torch: the LoRA A init
        config = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=TARGET_MODULES,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(self.model, config)
        inner = peft_model.get_base_model()  # LlamaForCausalLM with LoRA layers injected
        ids, mask, (rows, positions), targets = self._batch(examples)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
        peft_model.train()
        t0 = time.perf_counter()
        loss_value, step = float("nan"), 0
        for step in range(1, MAX_STEPS + 1):
            hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = inner.lm_head(hidden[rows, positions]).float()
            loss = F.cross_entropy(logits, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.item())
            if step == 1 or step % 5 == 0:
                self.log(f"    step {step:2d} loss {loss_value:.4f}")
            if step >= MIN_STEPS and loss_value < STOP_LOSS:
                break
        self.log(
            f"    stopped at step {step} loss {loss_value:.4f} "
            f"({time.perf_counter() - t0:.1f}s, {ids.shape[0]}x{ids.shape[1]} tokens)"
        )
        peft_model.eval()
        peft_model.save_pretrained(out, safe_serialization=True)
        (out / "README.md").unlink(missing_ok=True)  # peft's model-card template
        self.model = peft_model.unload()  # plain base again, for the next adapter
        return {"steps": step, "final_loss": round(loss_value, 5), "examples": len(examples)}
