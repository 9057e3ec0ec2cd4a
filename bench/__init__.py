"""Benchmarks: ``python -m bench.<name>`` (poisson, tokens, sample, loader, train).

Each compares implementations in one run on the same inputs and prints a table; ``--json`` /
``--csv`` save it with the machine and versions. The same cases run under pytest-benchmark:
``pytest bench --benchmark-only``.
"""
