import asyncio
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import StoreUnavailable
from engine.core.messages import check_trade, notional
from engine.core.settlement import Settler, deltas
from engine.core.store.base import Batch, Position, PositionKey
from tests.factories import trade


def test_worked_example_from_the_protocol_doc() -> None:
    # 0.01 BTC at 50,000 USDT: notional 500 USDT = 500_000_000 minor units (6 decimals).
    t = trade(price=50_000_000_000, qty=1_000_000, buyer_fee=500_000, seller_fee=250_000)
    assert notional(t) == 500_000_000
    assert deltas(t, fee_account=0) == {
        (1, "BTC"): 1_000_000,
        (1, "USDT"): -500_500_000,
        (2, "BTC"): -1_000_000,
        (2, "USDT"): 499_750_000,
        (0, "USDT"): 750_000,
    }


def test_notional_rounds_down() -> None:
    # 3 minor units of base at a price of 1 quote minor unit per 10 base units: 0.3 -> 0 is refused;
    # 15 at 1 per 10 is 1.5 -> 1.
    t = trade(price=1, qty=15, qty_scale=1, buyer_fee=0, seller_fee=0)
    assert notional(t) == 1
    assert check_trade(trade(price=1, qty=3, qty_scale=1, buyer_fee=0, seller_fee=0)) is not None


def test_self_trade_and_fee_account_trading_merge_deltas() -> None:
    t = trade(buyer=7, seller=7, buyer_fee=10, seller_fee=5)
    d = deltas(t, fee_account=0)
    assert d[(7, "BTC")] == 0
    assert d[(7, "USDT")] == -15
    assert d[(0, "USDT")] == 15


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 10**12),
            st.integers(1, 10**10),
            st.integers(0, 10**6),
            st.integers(0, 10**6),
            st.integers(1, 5),
            st.integers(1, 5),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_every_asset_is_conserved(rows: list[tuple[int, int, int, int, int, int]]) -> None:
    totals: defaultdict[str, int] = defaultdict(int)
    for i, (price, qty, bf, sf, buyer, seller) in enumerate(rows, start=1):
        t = trade(
            seq=i, price=price, qty=qty, qty_scale=2, buyer_fee=bf, seller_fee=sf, buyer=buyer, seller=seller
        )
        if check_trade(t) is not None:
            continue
        for (_, asset), change in deltas(t, 0).items():
            totals[asset] += change
    assert all(v == 0 for v in totals.values()), dict(totals)


class MemoryStore:
    """Only what Settler.prepare needs."""

    def __init__(self, rows: dict[PositionKey, Position] | None = None) -> None:
        self.rows = rows or {}
        self.loads: list[list[PositionKey]] = []

    async def load_positions(self, keys: list[PositionKey]) -> dict[PositionKey, Position]:
        self.loads.append(keys)
        return {k: self.rows[k] for k in keys if k in self.rows}


def _prepare(store: MemoryStore, trades: list) -> Batch:  # type: ignore[type-arg]
    settler = Settler(store, fee_account=0)  # type: ignore[arg-type]
    return asyncio.run(settler.prepare(trades))


def test_prepare_folds_into_absolute_positions_and_watermarks() -> None:
    batch = _prepare(MemoryStore(), [trade(seq=1), trade(seq=2), trade("ETH-USDT", 1)])
    assert batch.watermarks == {"BTC-USDT": 2, "ETH-USDT": 1}
    assert batch.positions[(1, "BTC", "BTC-USDT")] == Position(2_000_000, 2)
    assert batch.positions[(1, "ETH", "ETH-USDT")] == Position(1_000_000, 1)
    assert (1, "BTC", "ETH-USDT") not in batch.positions


def test_prepare_skips_trades_a_position_already_holds() -> None:
    # Crash mid-batch: the buyer's BTC position already has seq 2 folded in, the rest has nothing.
    store = MemoryStore({(1, "BTC", "BTC-USDT"): Position(2_000_000, 2)})
    batch = _prepare(store, [trade(seq=1), trade(seq=2)])
    assert (1, "BTC", "BTC-USDT") not in batch.positions  # untouched: it already holds both
    assert batch.positions[(2, "BTC", "BTC-USDT")] == Position(-2_000_000, 2)


def test_prepare_reads_each_position_once() -> None:
    store = MemoryStore()
    settler = Settler(store, fee_account=0)  # type: ignore[arg-type]
    asyncio.run(settler.prepare([trade(seq=1)]))
    asyncio.run(settler.prepare([trade(seq=2)]))
    assert len(store.loads) == 1


# -- the settler against the plain fold of the documented arithmetic ------------------------------------

FEE_ACCOUNT = 0
_trade_row = st.tuples(
    st.sampled_from(["BTC-USDT", "ETH-USDT"]),
    st.integers(1, 10**9),  # price
    st.integers(1, 10**8),  # qty
    st.sampled_from([0, 2, 8]),  # qty_scale
    st.integers(0, 3),  # buyer: 0 is the fee account trading
    st.integers(0, 3),  # seller: may be the buyer (self-trade)
    st.integers(0, 10**4),  # buyer_fee
    st.integers(0, 10**4),  # seller_fee
)


def _trades(rows: list[tuple[str, int, int, int, int, int, int, int]]) -> list:  # type: ignore[type-arg]
    seqs: defaultdict[str, int] = defaultdict(int)
    out = []
    for symbol, price, qty, scale, buyer, seller, bf, sf in rows:
        t = trade(symbol, seqs[symbol] + 1, price=price, qty=qty, qty_scale=scale, buyer=buyer, seller=seller,
                  buyer_fee=bf, seller_fee=sf)
        if check_trade(t) is None:
            seqs[symbol] += 1
            out.append(t)
    return out


def _fold(state: dict[PositionKey, Position], trades: list) -> dict[PositionKey, Position]:  # type: ignore[type-arg]
    """The reference: every trade's deltas, applied to a position only past its last_seq."""
    out = dict(state)
    for t in trades:
        for (account, asset), change in deltas(t, FEE_ACCOUNT).items():
            key = (account, asset, t.symbol)
            current = out.get(key, Position(0, 0))
            if t.seq > current.last_seq:
                out[key] = Position(current.amount + change, t.seq)
    return out


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(_trade_row, min_size=1, max_size=40), split=st.integers(0, 40), cuts=st.data())
def test_prepare_equals_the_plain_fold_from_any_partly_written_state(rows, split, cuts) -> None:  # type: ignore[no-untyped-def]
    """A store left mid-batch by a crash holds, per position, the fold of some prefix of the trades.
    Preparing all the trades (in one batch or two, the cache carried between them) from that state must
    end where folding them all from nothing ends."""
    trades = _trades(rows)
    full = _fold({}, trades)
    partly: dict[PositionKey, Position] = {}
    for key in sorted(full):
        cut = cuts.draw(st.integers(0, len(trades)), label=f"cut {key}")
        prefix = _fold({}, trades[:cut])
        if key in prefix:
            partly[key] = prefix[key]
    store = MemoryStore(dict(partly))
    settler = Settler(store, fee_account=FEE_ACCOUNT)  # type: ignore[arg-type]
    written = dict(partly)
    for part in (trades[:split], trades[split:]):
        if part:
            batch = asyncio.run(settler.prepare(part))
            written.update(batch.positions)
            store.rows.update(batch.positions)
    assert {k: p.amount for k, p in written.items()} == {k: p.amount for k, p in full.items()}
    assert written == full


class GatedStore(MemoryStore):
    """Each read waits until the test opens its gate; the first ``failures`` reads then fail."""

    def __init__(self, rows: dict[PositionKey, Position] | None = None, failures: int = 0) -> None:
        super().__init__(rows)
        self.gates: list[asyncio.Event] = []
        self.failures = failures

    async def load_positions(self, keys: list[PositionKey]) -> dict[PositionKey, Position]:
        self.loads.append(keys)
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the store is down")
        return {k: self.rows[k] for k in keys if k in self.rows}

    async def reads_started(self, count: int) -> None:
        """Let the loop run until ``count`` reads have begun (each turn is a yield, not a wait on time)."""
        for _ in range(100):
            if len(self.gates) >= count:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"{len(self.gates)} reads began, not {count}")


BUYER_BTC = (1, "BTC", "BTC-USDT")


def test_prepare_waits_for_the_read_ahead_instead_of_reading_again() -> None:
    async def main() -> None:
        store = GatedStore({BUYER_BTC: Position(5, 0)})
        settler = Settler(store, fee_account=0)  # type: ignore[arg-type]
        trades = [trade(seq=1)]
        settler.read_ahead(trades)
        settler.read_ahead(trades)  # the same keys, already being read
        await store.reads_started(1)
        preparing = asyncio.ensure_future(settler.prepare(trades))
        await asyncio.sleep(0)
        assert not preparing.done()  # waiting for the read ahead
        store.gates[0].set()
        batch = await asyncio.wait_for(preparing, 10)
        assert len(store.loads) == 1
        assert batch.positions[BUYER_BTC] == Position(5 + 1_000_000, 1)
        settler.read_ahead([trade(seq=2)])  # cached now: nothing to read
        assert len(store.loads) == 1

    asyncio.run(main())


def test_a_failed_read_ahead_is_read_again_by_prepare() -> None:
    async def main() -> None:
        store = GatedStore({BUYER_BTC: Position(5, 0)}, failures=1)
        settler = Settler(store, fee_account=0)  # type: ignore[arg-type]
        settler.read_ahead([trade(seq=1)])
        await store.reads_started(1)
        preparing = asyncio.ensure_future(settler.prepare([trade(seq=1)]))
        store.gates[0].set()
        await store.reads_started(2)
        store.gates[1].set()
        batch = await asyncio.wait_for(preparing, 10)
        assert len(store.loads) == 2
        assert batch.positions[BUYER_BTC] == Position(5 + 1_000_000, 1)

    asyncio.run(main())


def test_a_read_ahead_answered_late_never_undoes_a_fold() -> None:
    """prepare reads a position itself; a read ahead of the same key starts meanwhile and is answered after
    the fold: the store's older row must not replace the folded one."""

    async def main() -> None:
        store = GatedStore({BUYER_BTC: Position(5, 0)})
        settler = Settler(store, fee_account=0)  # type: ignore[arg-type]
        first = asyncio.ensure_future(settler.prepare([trade(seq=1)]))
        await store.reads_started(1)
        settler.read_ahead([trade(seq=2)])  # same keys, not cached yet, not being read ahead
        await store.reads_started(2)
        store.gates[0].set()
        assert (await first).positions[BUYER_BTC] == Position(5 + 1_000_000, 1)
        store.gates[1].set()
        await asyncio.wait(settler._reads_ahead)
        second = await settler.prepare([trade(seq=2)])
        assert second.positions[BUYER_BTC] == Position(5 + 2_000_000, 2)

    asyncio.run(main())


def test_a_failed_read_folds_nothing_so_the_retry_writes_every_position() -> None:
    """The shard retries a prepare whose read failed. Had the trades before the uncached one been folded
    already, the retry would find their positions holding them and leave them out of its batch."""

    async def main() -> None:
        store = GatedStore(failures=1)
        settler = Settler(store, fee_account=0)  # type: ignore[arg-type]
        warm = asyncio.ensure_future(settler.prepare([trade(seq=1)]))
        await store.reads_started(1)
        store.failures = 0
        store.gates[0].set()
        await warm
        store.failures = 1
        trades = [trade(seq=2), trade(seq=3, buyer=9)]  # the first cached, the second's buyer is not
        failing = asyncio.ensure_future(settler.prepare(trades))
        await store.reads_started(2)
        store.gates[1].set()
        try:
            await failing
            raise AssertionError("the read should have failed")
        except StoreUnavailable:
            pass
        retry = asyncio.ensure_future(settler.prepare(trades))
        await store.reads_started(3)
        store.gates[2].set()
        batch = await retry
        assert batch.positions[BUYER_BTC] == Position(2_000_000, 2)
        assert batch.positions[(9, "BTC", "BTC-USDT")] == Position(1_000_000, 3)
        assert batch.positions[(2, "BTC", "BTC-USDT")] == Position(-3_000_000, 3)

    asyncio.run(main())
