"""Benchmarks: fabricate checkpoints with real layer shapes and run the peers side by side."""
