"""Benchmarks: measured side by side in one run, results written under docs/results/."""
