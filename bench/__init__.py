"""Benchmark scripts (run as `python bench/NAME.py`); a package only so that mypy maps each file to one module."""
