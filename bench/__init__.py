"""``make bench``: service and deployment benchmarks, every figure a ratio against a baseline."""
