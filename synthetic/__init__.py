"""Phantom and synthesis generators for the demo, tests and benchmarks (never used by the service itself)."""
