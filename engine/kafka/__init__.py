"""The Kafka ingest path: its config section's loader, the ZMQ-to-Kafka bridge and the Kafka shard."""
