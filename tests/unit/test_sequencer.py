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


def test_a_gap_is_open_exactly_while_its_clock_runs() -> None:
    """After every offer and heartbeat, in any order, with duplicates: ``gap_since_ns`` is set exactly while
    ``gap`` is not None (the in-order path decides it without scanning what is held)."""
    import random

    rng = random.Random(11)
    for _ in range(200):
        s = Sequencer(held_max=1_000)
        seqs = list(range(1, 60)) * 2
        rng.shuffle(seqs)
        for now, seq in enumerate(seqs, start=1):
            if rng.random() < 0.1:
                st = s.heartbeat("BTC-USDT", rng.randint(0, 70), now)
            else:
                s.offer(trade("BTC-USDT", seq=seq), now)
                st = s.state("BTC-USDT")
            assert (st.gap is not None) == bool(st.gap_since_ns), (st.accepted, st.me_latest, sorted(st.held))
