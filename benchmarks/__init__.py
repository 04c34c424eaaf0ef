"""Benchmarks of canonsal_jax against its baselines: not part of the installed package.

Run from the repository root: `python -m benchmarks.benchmark --suite=...` (see `BENCHMARKS.md`). The suites
live in `bench`; the PyTorch twins of the networks and the paper's procedure in `baselines`.
"""
