"""The Kafka shard's old module name, kept runnable (``python -m shards.kafka_shard``) so that a supervisor
started before an in-place upgrade can still respawn its shards; the code lives in :mod:`engine.kafka.shard`."""
