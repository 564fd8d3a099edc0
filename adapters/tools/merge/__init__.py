"""`python -m adapters.tools.merge`: combine LoRA adapters with peft's weighted combination.

A package rather than `adapters/tools/merge.py` on purpose: the demo build's cache key hashes
every `adapters/tools/*.py` (prepare.py `build_inputs`), and merging has no influence on the demo
build; a subpackage keeps it out of the key without touching prepare.py (whose own bytes are part
of the key). `plan` (stdlib only: argument checks, sidecars, ranks) runs before anything heavy is
imported, so a refused merge answers in milliseconds; `combine` is the only torch/peft part.
"""
