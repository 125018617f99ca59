"""Test harness helpers behind ``tests/conftest.py``: real services and tiny models."""
