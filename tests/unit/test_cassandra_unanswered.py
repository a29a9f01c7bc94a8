"""A request the Cassandra driver never answers (a callback lost when a connection dies mid-request) fails
as unavailable after STALL_TIMEOUTS request timeouts, so the shard retries instead of stalling for good."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.core.config import CassandraConfig
from engine.core.errors import StoreUnavailable
from engine.core.store import cassandra


class _Silent:
    """A driver response whose callbacks are never called."""

    def add_callbacks(self, *_: Any, **__: Any) -> None:
        pass


class _Session:
    def __init__(self) -> None:
        self.sent = 0

    def execute_async(self, *_: Any, **__: Any) -> _Silent:
        self.sent += 1
        return _Silent()


def test_requests_the_driver_never_answers_fail_as_unavailable() -> None:
    session = _Session()
    store = cassandra.CassandraStore(CassandraConfig(request_timeout_s=0.05), cluster=None,
                                     session=session, statements=None)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(StoreUnavailable, match=r"the driver answered nothing for 0.2 s \(3 requests\)"):
            await asyncio.wait_for(store._all(["a", "b", "c"]), 30)
        with pytest.raises(StoreUnavailable, match=r"answered nothing .*\(a request\)"):
            await asyncio.wait_for(store._request("d"), 30)

    asyncio.run(main())
    assert session.sent >= 4


class _Failing:
    """A driver response that fails with ``error`` the first ``times`` it is sent, then answers."""

    def __init__(self, session: _FailingSession) -> None:
        self.session = session

    def clear_callbacks(self) -> None:
        pass

    def add_callbacks(self, callback: Any, errback: Any, callback_args: Any = (), errback_args: Any = ()) -> None:
        self.session.sent += 1
        if self.session.sent <= self.session.times:
            errback(self.session.error, *errback_args)
        else:
            callback([], *callback_args)


class _FailingSession:
    def __init__(self, error: Exception, times: int) -> None:
        self.error, self.times, self.sent = error, times, 0

    def execute_async(self, *_: Any, **__: Any) -> _Failing:
        return _Failing(self)


# What Cassandra answers when it cannot read the role's permissions (a system_auth replica down), and when
# the role really lacks one.
UNREADABLE = 'Error from server: code=2100 [Unauthorized] message="Unable to perform authorization of ' \
             'permissions: Operation failed - received 1 responses and 1 failures: UNKNOWN from /10.0.0.2:7000"'
DENIED = 'Error from server: code=2100 [Unauthorized] message="User settle has no MODIFY permission on ' \
         '<table ks.ledger> or any of its parents"'


def test_permissions_the_server_could_not_read_are_retried_a_denial_is_not() -> None:
    from cassandra import Unauthorized

    from engine.core.errors import StoreRejected

    async def attempt(message: str) -> int:
        session = _FailingSession(Unauthorized(message), times=1)
        store = cassandra.CassandraStore(CassandraConfig(request_timeout_s=5.0), cluster=None,
                                         session=session, statements=None)  # type: ignore[arg-type]
        await asyncio.wait_for(store._all(["a"]), 30)
        return session.sent

    assert asyncio.run(attempt(UNREADABLE)) == 2  # failed once, sent again, written
    with pytest.raises(StoreRejected, match="no MODIFY permission"):
        asyncio.run(attempt(DENIED))
