"""Benchmarks: `python -m bench` (CPU, bench/__main__.py and bench/sections/), `python -m bench.gpu`,
`python -m bench.gpu_check`, `python -m bench.serve_ray`."""
