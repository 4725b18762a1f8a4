"""Simulation and benchmark scripts for fedmerge (run from the repository root)."""
