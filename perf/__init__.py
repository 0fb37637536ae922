"""Performance tracking for the QLoRA kernels: a static layer (compile for sm_80/sm_90, no GPU needed) that CI
runs, an analytic roofline, and a timed layer: the benchmarks (``perf/bench_*.py``) run and kept as results files
(``perf/results/``), compared against a saved run and charted. Entry point: ``python -m perf``.
"""
