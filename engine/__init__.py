"""settle: exactly-once trade settlement from a matching engine's ZeroMQ stream into ScyllaDB."""
