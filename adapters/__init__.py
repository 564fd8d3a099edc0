"""Adapter catalog, validation and engine residency.

`adapters.tools` holds the offline torch/peft tooling; nothing else here imports it.
"""
