"""Benchmarks: ``usp bench attention`` (and the training benchmark)."""
