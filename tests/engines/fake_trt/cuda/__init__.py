"""Fake cuda-python for tests (see cudart.py)."""
