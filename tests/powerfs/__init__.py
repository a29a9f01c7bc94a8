"""Power-loss testing: a FUSE file system that forgets every write that was never made durable."""
