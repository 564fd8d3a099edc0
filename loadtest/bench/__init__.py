"""Benchmarks that isolate what the gateway itself costs (fake upstream, no model)."""
