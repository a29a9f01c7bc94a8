"""The reference matching-engine simulator: its log, its publisher and replay server, hostile frames."""
