"""Helpers for tests, demos and benchmarks: fabricate realistic FP8 checkpoints, run process groups."""
