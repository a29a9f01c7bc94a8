"""Operator tools behind the CLI: preflight, status, top, recover."""
