"""Every error settle raises on purpose derives from :class:`SettleError`.

::

    SettleError
    ├── ConfigError              bad configuration; fails start-up (exit code EXIT_CONFIG)
    ├── ClosedError              an operation on something settle itself closed ("you closed it")
    ├── WalError                 the write-ahead log
    │   ├── WalCorruption        a bad record in the middle of a segment: stop, name file and offset
    │   ├── WalInUse             another process holds the WAL directory's lock
    │   └── WalFull              the WAL disk refused a write (ENOSPC); retriable once space returns
    ├── StoreError               the settlement store ("it broke")
    │   ├── StoreUnavailable     the store did not answer; retriable
    │   └── StoreRejected        the store refused a value; not retriable
    ├── ReplayError              the ME's replay endpoint failed or answered badly; retriable
    └── InvariantViolation       a check of the system's own promises failed

Retry loops read ``error.retriable`` instead of matching on types.
"""

from __future__ import annotations


class SettleError(Exception):
    retriable: bool = False


class ConfigError(SettleError):
    """A configuration value is wrong. The message names key, value and what was expected."""


class ClosedError(SettleError):
    """The object was closed by settle itself (shutdown in progress), not broken."""


class WalError(SettleError):
    pass


class WalCorruption(WalError):
    def __init__(self, path: str, offset: int, reason: str, fix: str) -> None:
        super().__init__(f"WAL segment {path}: {reason} at byte {offset}; {fix}")
        self.path = path
        self.offset = offset
        self.reason = reason


class WalInUse(WalError):
    """Another process holds the WAL directory's lock; a predecessor still draining releases it soon."""


class WalFull(WalError):
    retriable = True


class StoreError(SettleError):
    pass


class StoreUnavailable(StoreError):
    retriable = True


class StoreRejected(StoreError):
    pass


class ReplayError(SettleError):
    retriable = True


class InvariantViolation(SettleError):
    pass


# Process exit codes the supervisor understands (sysexits.h where one fits).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 64
EXIT_WAL_CORRUPT = 65  # EX_DATAERR: a segment is damaged in the middle; needs `settle recover`
EXIT_STORE_DOWN = 69  # EX_UNAVAILABLE
EXIT_CONFIG = 78  # EX_CONFIG: never respawned, halts the supervisor
EXIT_CRASH_LOOP = 75  # supervisor gave up on a slot that kept dying
EXIT_VERIFY_FAILED = 3  # demo/check found a lost or doubled trade
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
