"""Benchmarks: `python -m bench` (CPU, bench/cpu.py)."""
