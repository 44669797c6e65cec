"""Benchmark scripts (``python bench/<script>.py``) and the code they share.

The scripts put the repository root and ``operator/`` on ``sys.path`` and import this package as
``bench``: ``bench.common`` (paths, the machine, result files, greedy engine requests) and
``bench.gpu`` (the pieces of ``gpu_engine.py``).
"""
