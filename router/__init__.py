"""The router process: SUB to the matching engine, fan each message out to the shard owning its symbol."""
