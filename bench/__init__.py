"""Benchmarks that print figures (`python -m bench.NAME`); never run as timed tests."""
