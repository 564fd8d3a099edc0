"""Prometheus metrics and (later) drift statistics of the gateway."""
