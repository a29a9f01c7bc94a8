"""The bridge's old module name, kept runnable (``python -m engine.bridge``) so that a supervisor started
before an in-place upgrade can still respawn its bridge; the code lives in :mod:`engine.kafka.bridge`."""
