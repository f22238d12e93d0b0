"""Benchmark workloads (request generators) and report writers used by bench_suite.py."""
