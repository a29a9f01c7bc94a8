"""Verification tooling: the invariant checker, testbeds, the demo, chaos runs, the power-loss file system
and the test servers."""
