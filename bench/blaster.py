"""``python -m bench.blaster``: the reference ME simulator with its trades made before the clock starts.

It is :class:`engine.sim.mesim.Simulator` (same trades for the same seed, same log, same replay endpoint,
same heartbeats) except that all ``--trades`` trades are generated, encoded and logged at start-up; once
a subscriber is connected they are published flat out from memory. Generating a trade costs the
simulator about 10 us of Python; on a 2-core machine that would be a core taken from the engine under
test. Heartbeats announce only what was already published (the log is ahead of the wire), so shards do
not see gaps that are merely in flight.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from types import FrameType

from engine.sim.mesim import SimConfig, Simulator, sim_config


class Blaster(Simulator):
    def __init__(self, config: SimConfig, trades: int) -> None:
        super().__init__(config)
        started = time.perf_counter()
        generate, encode, append = self._generator.next, self._encode, self._log.append
        frames: list[bytes] = []
        symbols: list[str] = []
        seqs: list[int] = []
        for _ in range(trades - self._generator.output_sequence):
            trade, _ = generate()
            data = encode(trade)
            append(data, trade)
            frames.append(data)
            symbols.append(trade.symbol)
            seqs.append(trade.seq)
        self._log.flush()
        self.generate_s = time.perf_counter() - started
        self._frames = frames
        self._frame_symbols = symbols
        self._frame_seqs = seqs
        self._sent = 0
        self._announced = 0  # frames folded into _published_latest
        self._published_latest = dict.fromkeys(self._symbols, 0)
        first_seq: dict[str, int] = {}
        for symbol, seq in zip(symbols, seqs, strict=True):
            first_seq.setdefault(symbol, seq)
        for symbol in self._symbols:  # a log continued from an earlier run: its old trades are published
            self._published_latest[symbol] = first_seq.get(symbol, self._log.latest_seq(symbol) + 1) - 1

    @property
    def latest(self) -> dict[str, int]:
        """Per symbol, the last seq already sent (heartbeats say this, not the log's end)."""
        latest = self._published_latest
        symbols, seqs = self._frame_symbols, self._frame_seqs
        for i in range(self._announced, self._sent):
            latest[symbols[i]] = seqs[i]
        self._announced = self._sent
        return dict(latest)

    def _remaining(self) -> int:
        return len(self._frames) - self._sent

    def _publish(self, count: int) -> None:
        send = self._pub.send
        frames = self._frames
        start = self._sent
        for i in range(start, start + count):
            send(frames[i])
        self._sent = start + count
        self._counters.published += count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.blaster", description=__doc__)
    p.add_argument("--publish", required=True)
    p.add_argument("--replay", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--trades", type=int, required=True)
    p.add_argument("--symbols", type=int, default=16)
    p.add_argument("--accounts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--heartbeat-ms", type=int, default=500)
    p.add_argument("--batch", type=int, default=10_000, help="frames per publishing turn")
    args = p.parse_args(argv)
    config = sim_config(publish=args.publish, replay=args.replay, log_path=args.log, trades=args.trades,
                        symbols=args.symbols, accounts=args.accounts, seed=args.seed,
                        heartbeat_interval_ms=args.heartbeat_ms, batch_trades_max=args.batch, sndhwm=0,
                        wait_subscribers=1, wait_subscribers_timeout_s=600.0)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    blaster = Blaster(config, args.trades)
    with blaster:
        print(f"bench.blaster: {args.trades} trades generated and logged in {blaster.generate_s:.1f}s; "
              f"publishing on {blaster.publish_endpoint}", file=sys.stderr)
        summary = blaster.run(stop)
    print(f"bench.blaster: {summary.format()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
