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
