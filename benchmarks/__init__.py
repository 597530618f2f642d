"""Benchmarks that run the project's own pipeline end to end (see benchmarks/minivtab)."""
