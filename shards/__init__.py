"""The shard process: PULL from the router, per-symbol WALs with group commit, settle into the store."""
