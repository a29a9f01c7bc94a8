"""Errors are told apart by type, never by their message: a held WAL lock is a :class:`WalInUse`, which a
starting shard waits out (its predecessor is still draining), while any other WAL error stops it at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.core import config as configmod
from engine.core.errors import WalError, WalInUse
from engine.core.wal import ShardWal
from shards import shard as shardmod
from shards.shard import Shard


def _shard(tmp_path: Path) -> Shard:
    return Shard(configmod.load(None, ["metrics.enabled=false", f"engine.data_dir={tmp_path}"]), 0)


def test_a_held_wal_is_refused_with_wal_in_use(tmp_path: Path) -> None:
    with ShardWal(tmp_path, segment_bytes_max=1 << 20), pytest.raises(WalInUse, match="in use by another process"):
        ShardWal(tmp_path, segment_bytes_max=1 << 20)


def test_a_starting_shard_waits_for_its_predecessor_to_release_the_wal(tmp_path: Path) -> None:
    shard = _shard(tmp_path)
    predecessor = ShardWal(shard.config.wal_path(0), segment_bytes_max=1 << 20)

    async def scenario() -> ShardWal:
        opening = asyncio.ensure_future(shard._open_wal())
        await asyncio.sleep(0)  # one step: the task tried once, met the lock and now waits to try again
        assert not opening.done()
        predecessor.close()
        return await asyncio.wait_for(opening, timeout=30)

    wal = asyncio.run(scenario())
    wal.close()


def test_any_other_wal_error_stops_a_starting_shard_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = 0

    def broken(*args: object, **kwargs: object) -> ShardWal:
        nonlocal attempts
        attempts += 1
        raise WalError("WAL directory is not writable")

    monkeypatch.setattr(shardmod, "ShardWal", broken)
    with pytest.raises(WalError, match="not writable"):
        asyncio.run(_shard(tmp_path)._open_wal())
    assert attempts == 1
