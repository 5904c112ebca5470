"""Shared test support: fixtures' building blocks and helpers that more than one test module (or a bench script)
uses. Test modules import from here, never from one another (tests/test_code_shape.py checks)."""
