"""Per-symbol sequencing inside a shard: what is accepted, what is settled, what waits behind a gap."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.messages import Trade


@dataclass(slots=True)
class SymbolState:
    """``settled <= accepted``: accepted trades are in the WAL (maybe not yet fsynced), settled ones in the store."""

    symbol: str
    accepted: int = 0
    settled: int = 0
    me_latest: int = 0  # the ME's latest sequence as last heard (heartbeat or trade)
    held: dict[int, Trade] = field(default_factory=dict)  # trades past a gap, by seq
    gap_since_ns: int = 0  # monotonic ns when the current gap opened; 0 when none

    @property
    def gap(self) -> tuple[int, int] | None:
        """The missing range ``(first, last)`` inclusive, or None."""
        if self.me_latest > self.accepted or self.held:
            last = min(self.held) - 1 if self.held else self.me_latest
            if last > self.accepted:
                return self.accepted + 1, last
        return None

    def replay_range(self, trades_max: int) -> tuple[int, int] | None:
        """One range to ask the ME for that covers every hole within ``trades_max`` sequences of the first:
        the held trades inside it come again and are dropped as duplicates, and many small holes (a lossy
        link) cost one request instead of one each. None when nothing is missing."""
        gap = self.gap
        if gap is None:
            return None
        first, last = gap
        top = min(max(self.me_latest, max(self.held, default=0)), first + trades_max - 1)
        while top > last and top in self.held:  # no point in asking for held trades past the last hole
            top -= 1
        return first, top


class Sequencer:
    """Decides, for each incoming trade, whether it is next, a duplicate or past a gap."""

    def __init__(self, held_max: int) -> None:
        self.symbols: dict[str, SymbolState] = {}
        self._held_max = held_max
        self.held_total = 0
        self.held_dropped = 0

    def state(self, symbol: str) -> SymbolState:
        st = self.symbols.get(symbol)
        if st is None:
            st = self.symbols[symbol] = SymbolState(symbol)
        return st

    def offer(self, trade: Trade, now_ns: int) -> list[Trade] | None:
        """Trades now in order to append (the trade and any held ones it unblocks); None for a duplicate."""
        st = self.symbols.get(trade.symbol) or self.state(trade.symbol)  # state()'s lookup, inline: per trade
        seq = trade.seq
        if seq > st.me_latest:
            st.me_latest = seq
        if seq <= st.accepted:
            return None
        if seq != st.accepted + 1:
            if seq in st.held:
                return None
            if len(st.held) >= self._held_max:
                self.held_dropped += 1  # replay brings it back; the buffer stays bounded
            else:
                st.held[seq] = trade
                self.held_total += 1
            if not st.gap_since_ns:
                st.gap_since_ns = now_ns
            return []
        out = [trade]
        st.accepted = seq
        held = st.held
        if held:
            if held.pop(seq, None) is not None:
                self.held_total -= 1
            while held:
                nxt = held.pop(st.accepted + 1, None)
                if nxt is None:
                    break
                self.held_total -= 1
                out.append(nxt)
                st.accepted += 1
        # The gap closed: nothing held any more (a held trade left now sits past a hole) and nothing heard of
        # beyond what is accepted. Not ``st.gap``: its min(held) per trade made a long replay quadratic.
        if st.gap_since_ns and not held and st.me_latest <= st.accepted:
            st.gap_since_ns = 0
        return out

    def heartbeat(self, symbol: str, seq: int, now_ns: int) -> SymbolState:
        st = self.state(symbol)
        if seq > st.me_latest:
            st.me_latest = seq
        if st.gap is not None and not st.gap_since_ns:
            st.gap_since_ns = now_ns
        return st

    def open_gaps(self) -> list[SymbolState]:
        return [st for st in self.symbols.values() if st.gap is not None]
