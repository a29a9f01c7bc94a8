"""Benchmarks. Each prints a table and writes JSON under bench-results/; only ratios within one run count."""
