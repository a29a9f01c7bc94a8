"""The reference matching-engine simulator: the driver of every demo, test and benchmark.

It publishes trades and per-symbol heartbeats on an XPUB socket, logs every trade to its own
:class:`~engine.sim.melog.MeLog` *before* publishing it, and answers replay requests on a ROUTER socket
from that log, so a subscriber that lost messages can fill the gap exactly as from a real ME.

Trades are deterministic: trade ``output_sequence = i`` is a pure function of ``(seed, i)`` and the
symbols' sequence counters (its random draws are a BLAKE2b hash of ``i`` keyed with the seed). A
simulator restarted on its log continues with exactly the trades an uninterrupted one would have
published (``timestamps = "synthetic"``, the default, keeps even ``ts_ns`` deterministic).

One thread runs everything (pyzmq sockets are not thread-safe): publish a batch, serve a bounded
share of pending replays, drain subscription messages, send heartbeats when due, then poll the
sockets until the next batch is due. Publishing flat out therefore never starves replay or
heartbeats, and both go on after the last trade until the simulator is stopped.

Replay protocol (clients use a DEALER socket; one request, many replies)::

    ReplayRequest(request_id, symbol, from_seq, to_seq)   to_seq 0 = up to the latest
    -> ReplayChunk(request_id, symbol, trades[<=1000]) ... ReplayEnd(request_id, symbol, last_seq)
    -> or ReplayFailed(request_id, symbol, code, message), code unknown_symbol | bad_request
"""

from __future__ import annotations

import argparse
import bisect
import collections
import hashlib
import math
import random
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any, Final, Literal

import msgspec
import zmq
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.core import security
from engine.core.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, SettleError
from engine.core.messages import (
    Heartbeat,
    ReplayEnd,
    ReplayErrorCode,
    ReplayFailed,
    ReplayRequest,
    Trade,
    replay_request_decoder,
    split_symbol,
)
from engine.sim import hostile
from engine.sim.melog import MeLog

# -- the market ---------------------------------------------------------------------------------------

FEE_ACCOUNT: Final = 0  # receives every fee; never trades
REPLAY_CHUNK_TRADES_MAX: Final = 1000
SYNTHETIC_EPOCH_NS: Final = 1_700_000_000 * 10**9  # 2023-11-14T22:13:20Z
SYNTHETIC_STEP_NS: Final = 1_000  # synthetic ts_ns advances 1 us a trade
WALK_SEQS: Final = 1024  # the price walk has a hashed anchor every WALK_SEQS trades of a symbol
WALK_PPM_MAX: Final = 50_000  # anchors lie within +-5 % of the symbol's base price
NOISE_PPM_MAX: Final = 500  # each trade lies within +-0.05 % of the walk

# Decimals of each asset: qty_scale is the base asset's, price_scale the quote asset's.
ASSET_DECIMALS: Final[dict[str, int]] = {
    "BTC": 8, "ETH": 8, "USDT": 6, "SOL": 8, "XRP": 6, "ADA": 6, "DOGE": 8, "DOT": 8, "AVAX": 8,
    "LINK": 8, "LTC": 8, "BNB": 8, "TRX": 6, "ATOM": 6, "UNI": 8, "XLM": 7, "NEAR": 8, "APT": 8, "FIL": 8,
}  # fmt: skip
GENERATED_DECIMALS: Final = 8
# Reference prices in micro-USD (USDT counts as 1 USD).
USD_MICRO: Final[dict[str, int]] = {
    "BTC": 65_000_000_000, "ETH": 3_200_000_000, "USDT": 1_000_000, "SOL": 150_000_000,
    "XRP": 520_000, "ADA": 450_000, "DOGE": 150_000, "DOT": 7_000_000, "AVAX": 35_000_000,
    "LINK": 15_000_000, "LTC": 80_000_000, "BNB": 580_000_000, "TRX": 120_000, "ATOM": 8_000_000,
    "UNI": 9_000_000, "XLM": 110_000, "NEAR": 6_000_000, "APT": 9_000_000, "FIL": 5_000_000,
}  # fmt: skip
NAMED_SYMBOLS: Final = (
    "BTC-USDT", "ETH-USDT", "SOL-USDT", "XRP-USDT", "ETH-BTC", "ADA-USDT", "DOGE-USDT", "DOT-USDT",
    "AVAX-USDT", "SOL-BTC", "LINK-USDT", "LTC-USDT", "BNB-USDT", "TRX-USDT", "XRP-BTC", "ATOM-USDT",
    "UNI-USDT", "XLM-USDT", "NEAR-USDT", "LTC-BTC", "APT-USDT", "FIL-USDT",
)  # fmt: skip

_M64: Final = (1 << 64) - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15
_THREE_U64: Final = struct.Struct("<3Q").unpack
_USD_MICRO_MAGNITUDES: Final = (10**5, 10**6, 10**7, 10**8)
TRADE_FIELDS: Final = (
    "output_sequence", "symbol", "seq", "trade_id", "price", "price_scale", "qty", "qty_scale", "buyer",
    "seller", "buy_order_id", "sell_order_id", "taker_side", "buyer_fee", "seller_fee", "ts_ns",
)  # fmt: skip
assert tuple(f.name for f in msgspec.structs.fields(Trade)) == TRADE_FIELDS, "Trade changed: see next()"


def _fmix(z: int) -> int:
    """The splitmix64 finalizer: a fast, well-mixed 64-bit hash of a 64-bit integer."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def symbol_names(count: int) -> list[str]:
    """The first ``count`` symbols: real markets first, then ``A000-USDT``, ``A001-USDT``, ..."""
    named = list(NAMED_SYMBOLS[:count])
    return named + [f"A{k:03d}-USDT" for k in range(count - len(named))]


def asset_decimals(asset: str) -> int:
    return ASSET_DECIMALS.get(asset, GENERATED_DECIMALS)


def asset_usd_micro(asset: str) -> int:
    """Reference price; a generated asset's is a fixed function of its name (0.01 to 900 USD)."""
    known = USD_MICRO.get(asset)
    if known is not None:
        return known
    h = _fmix(zlib.crc32(asset.encode()))
    magnitude: int = 10 ** (4 + h % 5)
    return (1 + (h >> 8) % 9) * magnitude


@dataclass(frozen=True, slots=True)
class Market:
    index: int
    symbol: str
    qty_scale: int  # the base asset's decimals
    price_scale: int  # the quote asset's decimals
    base_price: int  # quote minor units per whole base unit, the centre of the price walk
    base_usd_micro: int  # the base asset's reference price, sizes trades in USD
    one: int  # 10**qty_scale: base minor units in one whole base unit

    @classmethod
    def of(cls, index: int, symbol: str) -> Market:
        base, quote = split_symbol(symbol)
        qty_scale, price_scale = asset_decimals(base), asset_decimals(quote)
        base_price = asset_usd_micro(base) * 10**price_scale // asset_usd_micro(quote)
        assert base_price >= 100, (symbol, base_price)  # the walk needs some resolution
        one: int = 10**qty_scale
        return cls(index, symbol, qty_scale, price_scale, base_price, asset_usd_micro(base), one)


# -- configuration ------------------------------------------------------------------------------------

Endpoint = Annotated[str, msgspec.Meta(pattern=r"^(tcp|ipc|inproc)://.+$")]
Bps = Annotated[int, msgspec.Meta(ge=0, le=10_000)]


class SimConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything the simulator does. Build it with :func:`sim_config` to get it validated."""

    publish: Endpoint = "tcp://127.0.0.1:5555"  # XPUB; "tcp://127.0.0.1:*" picks a free port
    replay: Endpoint = "tcp://127.0.0.1:5556"  # ROUTER
    log_path: str = "var/me/me.log"
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 1
    symbols: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 16
    accounts: Annotated[int, msgspec.Meta(ge=2, le=2**40)] = 1000  # ids 1..accounts; 0 is the fee account
    rate: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # trades/s; 0 = flat out
    trades: Annotated[int, msgspec.Meta(ge=0)] = 0  # the log's total to reach (a restart publishes the rest)
    skew: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.0  # 0 = uniform symbols; s > 0: weight 1/rank^s
    heartbeat_interval_ms: Annotated[int, msgspec.Meta(ge=1)] = 500
    drop_fraction: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0  # trades, heartbeats logged, not sent
    wait_subscribers: Annotated[int, msgspec.Meta(ge=0)] = 1
    wait_subscribers_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    fsync_log: bool = False  # the log is written before each batch is sent either way
    taker_fee_bps: Bps = 10
    maker_fee_bps: Bps = 5
    linger_s: Annotated[float, msgspec.Meta(ge=0)] | None = None  # after the last trade; None = until stopped
    batch_trades_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    sndhwm: Annotated[int, msgspec.Meta(ge=0)] = 2_000_000
    timestamps: Literal["synthetic", "wall"] = "synthetic"  # "wall" = time.time_ns(), not reproducible
    hostile_every: Annotated[int, msgspec.Meta(ge=0)] = 0  # also send one hostile frame every N trades; 0 = off
    curve_key: str | None = None  # the ME's secret key file: CURVE server on publish and replay
    curve_allow: list[str] = []  # public key files of the clients it accepts (the router's, the shards')


def sim_config(**values: Any) -> SimConfig:
    """Validate ``values`` into a :class:`SimConfig`; a bad one raises ConfigError naming it."""
    try:
        return msgspec.convert(values, SimConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"simulator config: {e}") from None


# -- trades -------------------------------------------------------------------------------------------


class TradeGenerator:
    """Trade ``output_sequence = i`` from ``(seed, i)`` and the per-symbol sequence counters.

    Restart it with the counters of a log (``output_sequence``, ``latest``) and it continues that log.
    """

    def __init__(
        self, config: SimConfig, output_sequence: int = 0, latest: dict[str, int] | None = None
    ) -> None:
        self.markets = [Market.of(i, s) for i, s in enumerate(symbol_names(config.symbols))]
        latest = latest or {}
        self.seqs = [latest.get(m.symbol, 0) for m in self.markets]
        self.output_sequence = output_sequence
        self._key = _fmix(config.seed & _M64)
        # Trade i's draws: BLAKE2b keyed with the seed over i, 192 bits. In CPython one C call beats
        # three splitmix64 rounds of 128-bit integer arithmetic by 3x; splitmix64 still makes the
        # rarely drawn values (price-walk anchors, generated assets' prices).
        self._hasher = hashlib.blake2b(key=config.seed.to_bytes(8, "little"), digest_size=24)
        self._accounts = config.accounts
        self._taker_bps = config.taker_fee_bps
        self._maker_bps = config.maker_fee_bps
        self._drop_below = int(config.drop_fraction * 65536)  # drop when a 16-bit draw is below this
        self._wall = config.timestamps == "wall"
        weights = [1.0 / (rank + 1) ** config.skew for rank in range(len(self.markets))]
        total, running, cumulative = sum(weights), 0.0, []
        for weight in weights[:-1]:
            running += weight
            cumulative.append(min(int(running / total * 2**32), 2**32 - 1))
        self._cumulative = cumulative  # symbol index = bisect_right(cumulative, u32 draw)
        self._anchors: dict[int, tuple[int, int, int]] = {}  # market -> (epoch, anchor ppm, next anchor ppm)

    def _anchor_ppm(self, market: int, epoch: int) -> int:
        h = _fmix((self._key ^ ((market + 1) * 0xD6E8FEB86659FD93) ^ epoch * _GOLDEN) & _M64)
        return h % (2 * WALK_PPM_MAX + 1) - WALK_PPM_MAX

    def _walk_ppm(self, market: int, seq: int) -> int:
        """The price walk: linear between hashed anchors every WALK_SEQS seqs (cached per symbol)."""
        epoch, step = divmod(seq, WALK_SEQS)
        cached = self._anchors.get(market)
        if cached is None or cached[0] != epoch:
            cached = (epoch, self._anchor_ppm(market, epoch), self._anchor_ppm(market, epoch + 1))
            self._anchors[market] = cached
        _, a0, a1 = cached
        return a0 + (a1 - a0) * step // WALK_SEQS

    def next(self) -> tuple[Trade, bool]:
        """The next trade, and whether it is one the PUB socket drops (``drop_fraction``)."""
        i = self.output_sequence + 1
        hasher = self._hasher.copy()
        hasher.update(i.to_bytes(8, "little"))
        h0, h1, h2 = _THREE_U64(hasher.digest())
        index = bisect.bisect_right(self._cumulative, h0 & 0xFFFFFFFF)
        market = self.markets[index]
        seq = self.seqs[index] + 1
        accounts = self._accounts
        buyer = 1 + (h0 >> 32) % accounts
        seller = 1 + (buyer + (h1 & 0xFFFFFFFF) % (accounts - 1)) % accounts  # never the buyer
        taker_side: Literal["buy", "sell"] = "buy" if (h1 >> 32) & 1 else "sell"
        noise_ppm = (h1 >> 45) % (2 * NOISE_PPM_MAX + 1) - NOISE_PPM_MAX
        price = market.base_price * (1_000_000 + self._walk_ppm(index, seq) + noise_ppm) // 1_000_000
        usd_micro = (1 + (h1 >> 35) % 999) * _USD_MICRO_MAGNITUDES[(h1 >> 33) & 3]  # 0.1 .. 99,900 USD
        one = market.one
        qty = usd_micro * one // market.base_usd_micro or 1
        value = price * qty // one
        if value == 0:  # too small to be worth a minor unit of the quote: the smallest qty that is
            qty = -(-one // price)
            value = price * qty // one
        taker_fee, maker_fee = value * self._taker_bps // 10_000, value * self._maker_bps // 10_000
        buyer_fee, seller_fee = (taker_fee, maker_fee) if taker_side == "buy" else (maker_fee, taker_fee)
        # Positional (7x faster than keywords here); the field order is pinned by TRADE_FIELDS below.
        trade = Trade(
            i,  # output_sequence
            market.symbol,
            seq,
            i,  # trade_id
            price,
            market.price_scale,
            qty,
            market.qty_scale,
            buyer,
            seller,
            h2 >> 2,  # buy_order_id
            (h2 * _GOLDEN & _M64) >> 2,  # sell_order_id
            taker_side,
            buyer_fee,
            seller_fee,
            time.time_ns() if self._wall else SYNTHETIC_EPOCH_NS + i * SYNTHETIC_STEP_NS,  # ts_ns
        )
        self.seqs[index] = seq
        self.output_sequence = i
        return trade, (h2 & 0xFFFF) < self._drop_below

    def __iter__(self) -> Iterator[Trade]:
        while True:
            yield self.next()[0]


# -- the simulator ------------------------------------------------------------------------------------


class SubscriberTimeout(SettleError):
    """Fewer subscribers than ``wait_subscribers`` connected in time."""


class SimSummary(msgspec.Struct, frozen=True, kw_only=True):
    trades: int  # logged this run (dropped ones included)
    dropped: int  # logged but not sent on PUB
    hostile: int = 0  # hostile frames sent, never logged
    seconds: float  # from the first trade to the last
    rate: float  # trades/s over `seconds`
    output_sequence: int  # the log's last
    latest: dict[str, int]  # symbol -> last seq

    def format(self) -> str:
        return (
            f"published {self.trades} trades ({self.dropped} dropped, {self.hostile} hostile frames) "
            f"in {self.seconds:.3f}s: "
            f"{self.rate:,.0f} trades/s; the log is at output_sequence {self.output_sequence}"
        )


class _RawChunk(msgspec.Struct, tag="replay_chunk", tag_field="kind", frozen=True):
    """Encodes byte-for-byte as a ReplayChunk, carrying the logged trade bytes as they are."""

    request_id: int
    symbol: str
    trades: list[msgspec.Raw]


@dataclass(slots=True)
class _Replay:
    envelope: list[bytes]
    request_id: int
    symbol: str
    next_seq: int
    last_seq: int
    pending: bytes | None = None  # the next reply, built but not yet accepted by the socket
    pending_final: bool = False  # that reply ends the replay (ReplayEnd or ReplayFailed)


@dataclass(slots=True)
class _Counters:
    published: int = 0
    dropped: int = 0
    hostile: int = 0
    heartbeats: int = 0
    replay_requests: int = 0
    replay_trades: int = 0
    subscriptions: int = 0


class Simulator:
    """Binds its sockets and opens (or continues) its log on construction; :meth:`run` publishes."""

    REPLAY_CHUNKS_PER_TURN: Final = 4  # replay chunks sent between two batches while publishing

    def __init__(self, config: SimConfig) -> None:
        self.config = config = sim_config(**msgspec.structs.asdict(config))  # validated, whoever built it
        own = allowed = None
        if config.curve_key is not None:  # keys first: a bad file fails before anything is opened
            own = security.load_secret(config.curve_key, "--curve-key")
            allowed = security.load_allowed(("--curve-allow", path) for path in config.curve_allow)
        self._guard: security.CurveServer | None = None
        self._log = MeLog(config.log_path)
        self._generator = TradeGenerator(config, self._log.output_sequence, self._log.latest)
        names = [m.symbol for m in self._generator.markets]
        self._symbols = names + [s for s in self._log.symbols() if s not in set(names)]
        self._known = set(self._symbols)
        self._counters = _Counters()
        self._replays: collections.deque[_Replay] = collections.deque()
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode_request = replay_request_decoder().decode
        self._heartbeat_drop = random.Random(config.seed)
        self._hostile_rng = random.Random(config.seed ^ 0x5EED)
        self._ctx = zmq.Context()
        try:
            self._pub = self._ctx.socket(zmq.XPUB)
            self._pub.setsockopt(zmq.SNDHWM, config.sndhwm)
            self._pub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe reaches us
            self._router = self._ctx.socket(zmq.ROUTER)
            if own is not None and allowed is not None:
                self._guard = security.CurveServer(self._ctx, own)
                self._guard.secure(self._pub, "publish", allowed)
                self._guard.secure(self._router, "replay", allowed)
            self._pub.bind(config.publish)
            self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full peer queue raises, never drops
            self._router.bind(config.replay)
        except zmq.ZMQError as e:
            self.close()
            raise ConfigError(f"simulator: cannot bind {config.publish} / {config.replay}: {e}") from None
        self.publish_endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._closed = False

    # -- observation (safe to read from another thread) ------------------------------------------------

    @property
    def published(self) -> int:
        """Trades logged and published (or deliberately dropped) by this run."""
        return self._counters.published

    @property
    def dropped(self) -> int:
        return self._counters.dropped

    @property
    def hostile(self) -> int:
        """Hostile frames sent (``hostile_every``); none of them is in the log."""
        return self._counters.hostile

    @property
    def replay_requests(self) -> int:
        return self._counters.replay_requests

    @property
    def replay_trades(self) -> int:
        return self._counters.replay_trades

    @property
    def heartbeats(self) -> int:
        return self._counters.heartbeats

    @property
    def auth_rejected(self) -> dict[tuple[str, str], int]:
        """(socket, reason) -> handshakes refused by CURVE (``--curve-key``)."""
        return dict(self._guard.rejected) if self._guard is not None else {}

    @property
    def subscribers(self) -> int:
        return self._counters.subscriptions

    @property
    def output_sequence(self) -> int:
        return self._generator.output_sequence

    @property
    def latest(self) -> dict[str, int]:
        """Symbol -> its last logged seq (0 before its first trade)."""
        latest_seq = self._log.latest_seq
        return {symbol: latest_seq(symbol) for symbol in self._symbols}

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> SimSummary:
        """Publish until the log holds ``config.trades`` trades (forever when 0), then keep serving
        replay and heartbeats for ``linger_s`` (until ``stop`` when None). Returns early on ``stop``."""
        config = self.config
        stop = stop or threading.Event()
        poller = zmq.Poller()
        poller.register(self._pub, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        interval_s = config.heartbeat_interval_ms / 1000
        now = time.monotonic()
        next_heartbeat = now
        waiting_until = now + config.wait_subscribers_timeout_s if config.wait_subscribers else None
        publishing = self._remaining() != 0
        started = finished = now
        # Rate: a token bucket by batch. Trades due = (now - started) * rate - published, so the rate
        # holds over the whole run, not batch by batch; after a stall it bursts at most burst_max.
        burst_max = max(config.batch_trades_max, int(config.rate * 0.05))
        while not stop.is_set():
            now = time.monotonic()
            self._drain_subscriptions()
            self._serve_replays(self.REPLAY_CHUNKS_PER_TURN if publishing else 64)
            if now >= next_heartbeat:
                self._heartbeats()
                next_heartbeat = max(next_heartbeat + interval_s, now)
            timeout_s = next_heartbeat - now
            if publishing and waiting_until is not None:
                if self._counters.subscriptions >= config.wait_subscribers:
                    waiting_until = None
                    started = now = time.monotonic()
                elif now >= waiting_until:
                    raise SubscriberTimeout(
                        f"simulator: {self._counters.subscriptions} of {config.wait_subscribers} subscribers "
                        f"connected to {self.publish_endpoint} within {config.wait_subscribers_timeout_s}s"
                    )
                else:
                    timeout_s = min(timeout_s, 0.01)
            if publishing and waiting_until is None:
                count = self._remaining()
                if config.rate > 0:
                    due = int((now - started) * config.rate) - self._counters.published
                    if due > burst_max:  # fell behind (e.g. a pause): do not burst to catch up
                        started += (due - burst_max) / config.rate
                        due = burst_max
                    wanted = max(1, min(config.batch_trades_max, int(config.rate / 1000)))
                    if due < wanted:
                        due_in = (self._counters.published + wanted) / config.rate
                        timeout_s = min(timeout_s, started + due_in - now)
                        due = 0
                    count = due if count < 0 else min(count, due)
                count = config.batch_trades_max if count < 0 else min(count, config.batch_trades_max)
                if count > 0:
                    self._publish(count)
                    timeout_s = 0
                if self._remaining() == 0:
                    publishing = False
                    finished = time.monotonic()
                    self._heartbeats()  # the final round: every symbol's last seq, at once
                    next_heartbeat = finished + interval_s
            if not publishing and config.linger_s is not None:
                left = config.linger_s - (time.monotonic() - finished)
                if left <= 0:
                    break
                timeout_s = min(timeout_s, left)
            if self._replays and any(r.pending is None for r in self._replays):
                timeout_s = 0
            elif self._replays:
                timeout_s = min(timeout_s, 0.001)  # a peer's queue is full: retry soon
            # Rounded up to whole ms (zmq_poll's unit): rounded down, every wait under 1 ms was a poll with
            # a timeout of 0, over and over, and a paced simulator burnt a core.
            poller.poll(max(0, min(math.ceil(timeout_s * 1000), 50)))
        if publishing:
            finished = time.monotonic()
        seconds = max(finished - started, 1e-9)
        return SimSummary(
            trades=self._counters.published,
            dropped=self._counters.dropped,
            hostile=self._counters.hostile,
            seconds=seconds,
            rate=self._counters.published / seconds,
            output_sequence=self._generator.output_sequence,
            latest=self.latest,
        )

    def _remaining(self) -> int:
        """Trades still to publish; -1 for "until stopped"."""
        if self.config.trades == 0:
            return -1
        return max(0, self.config.trades - self._generator.output_sequence)

    def _publish(self, count: int) -> None:
        """Generate ``count`` trades, log them, flush the log, and only then send them."""
        generate, encode, append = self._generator.next, self._encode, self._log.append
        outgoing: list[bytes] = []
        dropped = 0
        for _ in range(count):
            trade, drop = generate()
            data = encode(trade)
            append(data, trade)
            if drop:
                dropped += 1
            else:
                outgoing.append(data)
        self._log.flush(fsync=self.config.fsync_log)
        send = self._pub.send
        for data in outgoing:
            send(data)
        every = self.config.hostile_every
        if every:
            end = self._generator.output_sequence
            for _ in range(end // every - (end - count) // every):
                _, frame = hostile.frame(self._hostile_rng)
                send(frame)
                self._counters.hostile += 1
        self._counters.published += count
        self._counters.dropped += dropped

    def _heartbeats(self) -> None:
        drop = self.config.drop_fraction
        now_ns = time.time_ns()
        for symbol, seq in self.latest.items():
            if drop and self._heartbeat_drop.random() < drop:
                continue
            self._pub.send(self._encode(Heartbeat(symbol=symbol, seq=seq, ts_ns=now_ns)))
            self._counters.heartbeats += 1

    def _drain_subscriptions(self) -> None:
        while True:
            try:
                message = self._pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01":
                self._counters.subscriptions += 1
            elif message[:1] == b"\x00":
                self._counters.subscriptions = max(0, self._counters.subscriptions - 1)

    # -- replay -----------------------------------------------------------------------------------------

    def _accept_requests(self) -> None:
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue  # no envelope: cannot answer
            envelope, body = frames[:-1], frames[-1]
            self._counters.replay_requests += 1
            try:
                request = self._decode_request(body)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                self._fail(envelope, _salvage_id(body), "", "bad_request", f"not a valid ReplayRequest: {e}")
                continue
            self._start_replay(envelope, request)

    def _start_replay(self, envelope: list[bytes], request: ReplayRequest) -> None:
        symbol = request.symbol
        if symbol not in self._known:
            self._fail(
                envelope, request.request_id, symbol, "unknown_symbol", f"no symbol {symbol!r} on this ME"
            )
            return
        if request.to_seq != 0 and request.to_seq < request.from_seq:
            message = (
                f"to_seq {request.to_seq} is below from_seq {request.from_seq} (0 means up to the latest)"
            )
            self._fail(envelope, request.request_id, symbol, "bad_request", message)
            return
        latest = self._log.latest_seq(symbol)
        last = latest if request.to_seq == 0 else min(request.to_seq, latest)
        last = max(last, request.from_seq - 1)  # from_seq past the latest: an empty replay
        self._replays.append(_Replay(envelope, request.request_id, symbol, request.from_seq, last))

    def _fail(
        self, envelope: list[bytes], request_id: int, symbol: str, code: ReplayErrorCode, message: str
    ) -> None:
        reply = ReplayFailed(request_id=request_id, symbol=symbol, code=code, message=message)
        self._replays.append(
            _Replay(envelope, request_id, symbol, 1, 0, self._encode(reply), pending_final=True)
        )

    def _serve_replays(self, chunks_max: int) -> None:
        self._accept_requests()
        replays = self._replays
        sent = 0
        refused = 0
        while replays and sent < chunks_max and refused < len(replays):
            replay = replays[0]
            if replay.pending is None:
                replay.pending = self._next_reply(replay)
            try:
                self._router.send_multipart([*replay.envelope, replay.pending], zmq.NOBLOCK)
            except zmq.Again:  # the peer's queue is full: try the others, come back later
                replays.rotate(-1)
                refused += 1
                continue
            except zmq.ZMQError:  # the peer is gone (EHOSTUNREACH): forget its replay
                replays.popleft()
                continue
            sent += 1
            refused = 0
            replay.pending = None
            if replay.pending_final:
                replays.popleft()
            else:
                replays.rotate(-1)

    def _next_reply(self, replay: _Replay) -> bytes:
        if replay.next_seq > replay.last_seq:
            end = ReplayEnd(request_id=replay.request_id, symbol=replay.symbol, last_seq=replay.last_seq)
            replay.pending_final = True
            return self._encode(end)
        upto = min(replay.last_seq, replay.next_seq + REPLAY_CHUNK_TRADES_MAX - 1)
        trades = self._log.read(replay.symbol, replay.next_seq, upto)
        assert len(trades) == upto - replay.next_seq + 1, (replay.symbol, replay.next_seq, upto, len(trades))
        replay.next_seq = upto + 1
        self._counters.replay_trades += len(trades)
        chunk = _RawChunk(
            request_id=replay.request_id, symbol=replay.symbol, trades=list(map(msgspec.Raw, trades))
        )
        return self._encode(chunk)

    # -- closing ----------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        for name in ("_pub", "_router"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=200 if name == "_pub" else 0)
        guard: security.CurveServer | None = getattr(self, "_guard", None)
        if guard is not None:
            guard.close()
        self._ctx.term()
        self._log.close()

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _salvage_id(body: bytes) -> int:
    """The request_id of a request that failed validation, when one can be read; else 0."""
    try:
        loose = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return 0
    value = loose.get("request_id") if isinstance(loose, dict) else None
    return value if isinstance(value, int) and 0 <= value < 2**63 else 0


# -- command line -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(prog="settle sim", description="Run the reference matching-engine simulator.")
    p.add_argument("--publish", default=d.publish, help="XPUB endpoint (default %(default)s)")
    p.add_argument("--replay", default=d.replay, help="ROUTER replay endpoint (default %(default)s)")
    p.add_argument("--log", dest="log_path", default=d.log_path, help="the ME log (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--symbols", type=int, default=d.symbols, help="symbol count (default %(default)s)")
    p.add_argument(
        "--accounts", type=int, default=d.accounts, help="trading accounts 1..N (default %(default)s)"
    )
    p.add_argument("--rate", type=float, default=d.rate, help="trades/s; 0 = flat out")
    p.add_argument("--trades", type=int, default=d.trades, help="the log's total to reach; 0 = until stopped")
    p.add_argument(
        "--skew", type=float, default=d.skew, help="zipf exponent of symbol popularity; 0 = uniform"
    )
    p.add_argument("--heartbeat-ms", dest="heartbeat_interval_ms", type=int, default=d.heartbeat_interval_ms)
    p.add_argument("--drop", dest="drop_fraction", type=float, default=d.drop_fraction,
                   help="fraction of trades and heartbeats logged but not sent")  # fmt: skip
    p.add_argument("--wait-subscribers", type=int, default=d.wait_subscribers)
    p.add_argument("--wait-timeout", dest="wait_subscribers_timeout_s", type=float,
                   default=d.wait_subscribers_timeout_s)  # fmt: skip
    p.add_argument("--fsync-log", action="store_true", default=d.fsync_log)
    p.add_argument("--taker-fee-bps", type=int, default=d.taker_fee_bps)
    p.add_argument("--maker-fee-bps", type=int, default=d.maker_fee_bps)
    p.add_argument("--linger", dest="linger_s", type=float, default=d.linger_s,
                   help="seconds to keep serving after the last trade (default: until stopped)")  # fmt: skip
    p.add_argument("--batch", dest="batch_trades_max", type=int, default=d.batch_trades_max)
    p.add_argument("--sndhwm", type=int, default=d.sndhwm)
    p.add_argument("--timestamps", choices=["synthetic", "wall"], default=d.timestamps)
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on 127.0.0.1:PORT"
    )
    p.add_argument("--hostile-every", type=int, default=d.hostile_every,
                   help="also publish one malformed/hostile frame every N trades (not logged); 0 = off")
    p.add_argument("--curve-key", default=d.curve_key, metavar="FILE",
                   help="the ME's secret key file (settle keys generate): CURVE on publish and replay")
    p.add_argument("--curve-allow", action="append", default=[], metavar="FILE",
                   help="a client public key file to accept (repeatable: the router's, the shards')")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


class _SimCollector(Collector):
    """Reads the simulator's counters at scrape time: nothing on the publishing path."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def collect(self) -> Iterable[Metric]:
        sim = self._sim
        yield CounterMetricFamily(
            "settle_sim_trades_published", "Trades logged and published.", sim.published
        )
        yield CounterMetricFamily(
            "settle_sim_trades_dropped", "Trades logged but not sent (drop).", sim.dropped
        )
        yield CounterMetricFamily(
            "settle_sim_hostile_frames", "Hostile frames sent (not logged).", sim.hostile
        )
        yield CounterMetricFamily(
            "settle_sim_replay_requests", "Replay requests received.", sim.replay_requests
        )
        yield CounterMetricFamily(
            "settle_sim_replay_trades", "Trades sent in replay chunks.", sim.replay_trades
        )
        yield CounterMetricFamily(
            "settle_sim_heartbeats_sent", "Heartbeats sent (one per symbol a round).", sim.heartbeats
        )
        rejected = CounterMetricFamily("settle_sim_auth_rejected", "Handshakes refused by CURVE.",
                                       labels=["socket", "reason"])
        for (socket_name, reason), count in sim.auth_rejected.items():
            rejected.add_metric([socket_name, reason], count)
        yield rejected
        latest = GaugeMetricFamily("settle_sim_latest_seq", "Last logged seq per symbol.", labels=["symbol"])
        for symbol, seq in sim.latest.items():
            latest.add_metric([symbol], seq)
        yield latest


_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    """``settle sim``: run the simulator until its trades are out and ``--linger`` passed, or a signal."""
    args = _parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("metrics_port", "quiet")}
    try:
        config = sim_config(**values)
        sim = Simulator(config)
    except SettleError as e:
        print(f"settle sim: {e}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(e, ConfigError) else EXIT_FAILURE
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second signal ends the process at once
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = []  # signal handlers can only be set from the main thread (tests call main elsewhere)
    if threading.current_thread() is threading.main_thread():
        previous = [(signum, signal.signal(signum, on_signal)) for signum in _STOP_SIGNALS]
    server = None
    done = threading.Event()
    try:
        with sim:
            if args.metrics_port is not None:
                registry = CollectorRegistry()
                registry.register(_SimCollector(sim))
                server, _ = start_http_server(args.metrics_port, addr="127.0.0.1", registry=registry)
            print(
                f"settle sim: publishing on {sim.publish_endpoint}, replay on {sim.replay_endpoint}, "
                f"log {config.log_path} at output_sequence {sim.output_sequence}",
                file=sys.stderr,
            )
            if not args.quiet:
                threading.Thread(target=_progress, args=(sim, done), daemon=True).start()
            summary = sim.run(stop)
    except SubscriberTimeout as e:
        print(f"settle sim: {e}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        done.set()
        if server is not None:
            server.shutdown()
            server.server_close()
        for signum, handler in previous:
            signal.signal(signum, handler)
    print(f"settle sim: {summary.format()}", file=sys.stderr)
    return EXIT_OK


def _progress(sim: Simulator, done: threading.Event) -> None:
    last, last_at = sim.published, time.monotonic()
    while not done.wait(1.0):
        now, count = time.monotonic(), sim.published
        rate = (count - last) / max(now - last_at, 1e-9)
        print(
            f"settle sim: {count} trades, {rate:,.0f} trades/s, {sim.subscribers} subscribers",
            file=sys.stderr,
        )
        last, last_at = count, now


if __name__ == "__main__":
    sys.exit(main())
