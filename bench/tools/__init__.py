"""Benchmark tools: ``make perf`` and gradient fidelity (``python -m bench.tools.fidelity``)."""
