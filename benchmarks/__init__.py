"""Benchmark scripts: each prints figures and ratios against a baseline measured in the same run.

Installed as ``logitstore.benchmarks``; run one with ``python -m logitstore.benchmarks.NAME``
(``python -m benchmarks.NAME`` from a checkout) or all of them with ``logitstore bench``.
"""
