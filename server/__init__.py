"""loraplex gateway: OpenAI-compatible HTTP front for vLLM with per-tenant LoRA adapters."""
