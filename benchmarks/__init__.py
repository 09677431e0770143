"""Benchmarks and the soak campaign (see README.md here)."""
