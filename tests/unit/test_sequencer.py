from shards.state import Sequencer
from tests.factories import trade


def seqs(trades: list | None) -> list[int] | None:  # type: ignore[type-arg]
    return None if trades is None else [t.seq for t in trades]


def test_in_order_duplicate_and_gap() -> None:
    s = Sequencer(held_max=10)
    assert seqs(s.offer(trade(seq=1), 0)) == [1]
    assert seqs(s.offer(trade(seq=1), 0)) is None  # duplicate
    assert seqs(s.offer(trade(seq=3), 0)) == []  # past a gap: held
    assert s.state("BTC-USDT").gap == (2, 2)
    assert seqs(s.offer(trade(seq=3), 0)) is None  # held already
    assert seqs(s.offer(trade(seq=2), 0)) == [2, 3]  # fills the gap, releases the held one
    assert s.state("BTC-USDT").gap is None
    assert s.held_total == 0


def test_heartbeat_reveals_a_lost_tail() -> None:
    s = Sequencer(held_max=10)
    s.offer(trade(seq=1), 0)
    s.heartbeat("BTC-USDT", 4, 5)
    assert s.state("BTC-USDT").gap == (2, 4)
    assert [st.symbol for st in s.open_gaps()] == ["BTC-USDT"]


def test_held_buffer_is_bounded() -> None:
    s = Sequencer(held_max=2)
    for seq in (3, 4, 5, 6):
        s.offer(trade(seq=seq), 0)
    assert s.held_total == 2
    assert s.held_dropped == 2
    assert seqs(s.offer(trade(seq=1), 0)) == [1]
    assert seqs(s.offer(trade(seq=2), 0)) == [2, 3, 4]
    assert s.state("BTC-USDT").gap == (5, 6)  # dropped ones are a gap again (heartbeat/trade seen to 6)


def test_symbols_are_independent() -> None:
    s = Sequencer(held_max=10)
    assert seqs(s.offer(trade("ETH-USDT", 2), 0)) == []
    assert seqs(s.offer(trade("BTC-USDT", 1), 0)) == [1]
