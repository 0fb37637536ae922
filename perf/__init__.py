"""Performance tracking for the QLoRA kernels: a static layer (compile for sm_80/sm_90, no GPU needed) that CI
runs, and benchmarks (``perf/bench_*.py``) that time kernels where a GPU exists. Entry point: ``python -m perf``.
"""
