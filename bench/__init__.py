"""Benchmark harness: the direct-write baseline, the load generator, and ``python -m bench.run``."""
