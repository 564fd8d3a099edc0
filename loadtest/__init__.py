"""Load generator and benchmarks that measure what the gateway costs and delivers."""
