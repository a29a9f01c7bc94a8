"""The running processes' core: messages, WAL, stores, settlement, config, metrics, supervisor. Imports nothing
outside itself."""
