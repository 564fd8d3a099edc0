"""Offline adapter tooling (torch, peft, transformers, llm-compressor).

The only package of the project that imports torch; it runs in its own virtual environment
(`.cache/venv-tools`, extra `tools`) and never on the gateway's request path.
"""
