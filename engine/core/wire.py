"""The router-to-shard hop: many of the ME's frames in one ZeroMQ message.

The router has checked every frame (:func:`router.router.validate`); the shard trusts it, decodes a whole
message in one call and keeps each trade's bytes, as the ME sent them, for its WAL. A message::

    offset 0     4 bytes             MAGIC: ``b"STB"`` then the wire version (:data:`WIRE_VERSION`)
    offset 4     u32 little-endian   n, the frames it carries (at least 1)
    offset 8     n x u32 LE          each frame's length in bytes
    then         a MessagePack array of n elements (``0xdd``, u32 big-endian n) whose elements are the
                 n frames themselves, in the order the router received them

so the array decodes with one :class:`msgspec.msgpack.Decoder` call, and the lengths cut the same bytes
into the frames without decoding anything twice. A message from a router of another version (another
version byte, or a bare ME frame: the wire before version 2 sent one per message) raises
:class:`WireVersionError`: it must not be misread, and a shard cannot serve that router, so the shard stops
with a configuration error instead of quarantining the stream trade by trade. Any other message that is
not a sound batch is quarantined (:class:`WireError`).
"""

from __future__ import annotations

import sys
from array import array
from typing import Final, NamedTuple, NoReturn

import msgspec

from engine.core.errors import ConfigError
from engine.core.messages import StreamMessage, Trade, check_trade

WIRE_VERSION: Final = 2
MAGIC: Final = b"STB" + bytes((WIRE_VERSION,))
_PREFIX: Final = b"STB"
_HEAD_BYTES: Final = 8
_ARRAY32: Final = b"\xdd"
_LITTLE: Final = sys.byteorder == "little"
FRAMES_MAX: Final = 1 << 20
# Both ends' high-water mark, in batches: up to a few hundred thousand trades under load, a few thousand
# when trades come one at a time; beyond it the router's own queue (router.shard_queue_max frames) holds them.
HWM_MESSAGES: Final = 1000


class WireError(Exception):
    """A message on the hop that is not a sound batch: quarantined whole (the router never sends one)."""


class WireVersionError(ConfigError):
    """A message from a router of another wire version: the deployment mixes versions."""


def encode_batch(frames: list[bytes]) -> bytes:
    """One message carrying ``frames`` (each a whole ME frame, already checked), in order."""
    count = len(frames)
    assert 0 < count <= FRAMES_MAX, count
    lengths = array("I", map(len, frames))
    if not _LITTLE:
        lengths.byteswap()
    return b"".join((MAGIC, count.to_bytes(4, "little"), lengths.tobytes(), _ARRAY32, count.to_bytes(4, "big"),
                     *frames))


def batch_decoder() -> msgspec.msgpack.Decoder[list[StreamMessage]]:
    """For a batch's array of frames (:func:`decode_batch`)."""
    return msgspec.msgpack.Decoder(list[StreamMessage])


def decode_batch(data: bytes, decoder: msgspec.msgpack.Decoder[list[StreamMessage]],
                 frame_decoder: msgspec.msgpack.Decoder[StreamMessage]) -> FrameBatch:
    """The messages of one batch and, for each, its bytes as the ME sent them.

    The router checked every frame, so the array decodes in one call. Should one frame not decode all the
    same, the frames are decoded one by one and only those that fail are rejected (``FrameBatch.rejected``)."""
    if data[:4] != MAGIC:
        _refuse(data, frame_decoder)
    if len(data) < _HEAD_BYTES:
        raise WireError(f"batch of {len(data)} bytes is shorter than its {_HEAD_BYTES}-byte head")
    count = int.from_bytes(data[4:8], "little")
    start = _HEAD_BYTES + 4 * count + 5  # the first frame, after the lengths and the array's head
    if not 0 < count <= FRAMES_MAX or len(data) < start:
        raise WireError(f"batch of {len(data)} bytes cannot hold the {count} frames it announces")
    lengths = array("I")
    lengths.frombytes(data[_HEAD_BYTES : start - 5])
    if not _LITTLE:
        lengths.byteswap()
    if sum(lengths) != len(data) - start:
        raise WireError(f"batch frame lengths add up to {sum(lengths)} bytes, the batch holds {len(data) - start}")
    # Each frame a bytes of its own, not a view into ``data``: the WAL checksums and copies it, and both go a
    # third faster from bytes (about 75 ns a trade).
    frames = []
    offset = start
    for length in lengths:
        end = offset + length
        frames.append(data[offset:end])
        offset = end
    try:
        messages = decoder.decode(memoryview(data)[start - 5 :])
    except msgspec.DecodeError:
        return _one_by_one(frames, frame_decoder)
    if len(messages) != count:
        raise WireError(f"batch announces {count} frames and its array holds {len(messages)}")
    return FrameBatch(messages, frames, [])


class FrameBatch(NamedTuple):
    messages: list[StreamMessage]
    frames: list[bytes]  # ``messages[i]`` as the ME sent it
    rejected: list[tuple[bytes, str]]  # frames that did not decode, with the decoder's reason


def _one_by_one(frames: list[bytes], frame_decoder: msgspec.msgpack.Decoder[StreamMessage]) -> FrameBatch:
    batch = FrameBatch([], [], [])
    for frame in frames:
        try:
            batch.messages.append(frame_decoder.decode(frame))
        except msgspec.DecodeError as e:
            batch.rejected.append((frame, str(e)))
        else:
            batch.frames.append(frame)
    return batch


def _refuse(data: bytes, frame_decoder: msgspec.msgpack.Decoder[StreamMessage]) -> NoReturn:
    """A message without this wire's magic. From a router of another version it stops the shard: every
    message after it would be misread or lost. Anything else is garbage, quarantined like any bad frame."""
    if data[:3] == _PREFIX and len(data) >= 4:
        theirs = f"wire version {data[3]}"
    else:
        try:
            message = frame_decoder.decode(data)
        except msgspec.DecodeError as e:
            raise WireError(f"not a batch of this wire ({e})") from None
        if isinstance(message, Trade) and check_trade(message) is not None:
            raise WireError("not a batch of this wire (a bare trade frame, and an unsound one)")
        theirs = "one ME frame per message (the wire before version 2)"
    raise WireVersionError(f"the router sends {theirs}; this shard reads wire version {WIRE_VERSION} only: run "
                           f"the router and its shards from the same settle release")
