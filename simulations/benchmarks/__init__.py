"""Benchmarks of fedmerge's matching speed and merge quality (see BENCHMARKS.md)."""
