"""Benchmarks: each part measures pymesh side by side with its baseline."""
