"""Benchmarks: scripts that print ratios against a baseline measured in the same run.

`python -m benchmarks` runs all of them in one go (see `benchmarks/run.py`); BENCHMARKS.md holds results.
"""
