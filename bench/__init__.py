"""Benchmarks: each prints its figures and can write them into docs/benchmarks.md. Loopback only, bounded in time."""
