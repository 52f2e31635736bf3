"""Benchmarks: each row a ratio of our time to a baseline's measured in the same run."""
