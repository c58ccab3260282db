"""Benchmarks: scripts that print figures and ratios against a baseline in one run."""
