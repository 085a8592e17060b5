"""Tests for the sans-IO SPDY/3.1 framing in pouch.stream.protocol.spdy.

Two connections (a client, as kubectl is, and a server, as pouch is) are
wired back to back; frames the library cannot produce on purpose (malformed,
unknown, or as Go's framer writes them) are assembled by hand from the frame
layouts in draft-mbelshe-httpbis-spdy-00 section 2.
"""

from __future__ import annotations

import hashlib
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pouch.stream.protocol.spdy import (
    DEFAULT_INITIAL_WINDOW_SIZE,
    DEFAULT_MAX_DATA_FRAME_SIZE,
    SPDY_DICTIONARY,
    Data,
    GoAway,
    GoAwayStatus,
    Headers,
    Ping,
    RstStatus,
    RstStream,
    Settings,
    SettingsEntry,
    SettingsId,
    SpdyConnection,
    SpdyProtocolError,
    SpdyStateError,
    StreamError,
    SynReply,
    SynStream,
    WindowUpdate,
)

# Pinned from the hex listing in section 2.6.10.1 of draft-mbelshe-httpbis-spdy-00
# (the SPDY/3 draft; SPDY/3.1 keeps the dictionary), as published in
# github.com/mbelshe/SPDY-Specification, draft-mbelshe-httpbis-spdy-00.txt at
# commit 5c1837295ef0530187b33f64d12c6c3937b0ebf2: the 0x.. bytes of
# SPDY_dictionary_txt[] were extracted from the text (each row also checked
# against its ASCII comment) and hashed once.  The same bytes are in that
# repository's example_code/spdy3_dictionary.h and in moby/spdystream's
# spdy/dictionary.go, which is what kubectl uses.
SPEC_DICTIONARY_LENGTH = 1423
SPEC_DICTIONARY_SHA256 = "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
SPEC_DICTIONARY_ADLER32 = 0xE3C6A7C2  # the DICTID a zlib stream using it announces

EXEC_HEADERS = {"streamtype": "stdout", "port": "8080", "requestid": "0"}


# -- Hand assembly --------------------------------------------------------------


def control(frame_type: int, flags: int, body: bytes, version: int = 3) -> bytes:
    """A control frame per section 2.2.1."""
    return struct.pack(">HHI", 0x8000 | version, frame_type, flags << 24 | len(body)) + body


def data_frame(stream_id: int, payload: bytes, flags: int = 0) -> bytes:
    """A data frame per section 2.2.2."""
    return struct.pack(">II", stream_id, flags << 24 | len(payload)) + payload


def raw_block(*pairs: tuple[bytes, bytes]) -> bytes:
    """An uncompressed Name/Value Header Block per section 2.6.10."""
    out = struct.pack(">I", len(pairs))
    for name, value in pairs:
        out += struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value
    return out


class GoPeer:
    """Writes header-carrying frames the way golang.org/x/net/spdy does.

    One zlib stream for the session, BestCompression, the default 32 KiB
    window, a SYNC_FLUSH after each block: a different deflater configuration
    from the library's own, which checks that the inflater does not depend on it.
    """

    def __init__(self) -> None:
        self._deflater = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zdict=SPDY_DICTIONARY)

    def block(self, raw: bytes) -> bytes:
        return self._deflater.compress(raw) + self._deflater.flush(zlib.Z_SYNC_FLUSH)

    def syn_stream(self, stream_id: int, raw: bytes, flags: int = 0, priority: int = 0) -> bytes:
        body = struct.pack(">IIBB", stream_id, 0, priority << 5, 0) + self.block(raw)
        return control(1, flags, body)

    def syn_reply(self, stream_id: int, raw: bytes, flags: int = 0) -> bytes:
        return control(2, flags, struct.pack(">I", stream_id) + self.block(raw))

    def headers(self, stream_id: int, raw: bytes, flags: int = 0) -> bytes:
        return control(8, flags, struct.pack(">I", stream_id) + self.block(raw))


def split_frames(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    """Cut a byte string into (first word, flags, length, payload) per section 2.2."""
    frames = []
    pos = 0
    while pos < len(wire):
        word, flags_length = struct.unpack_from(">II", wire, pos)
        length = flags_length & 0xFFFFFF
        frames.append((word, flags_length >> 24, length, wire[pos + 8 : pos + 8 + length]))
        pos += 8 + length
    assert pos == len(wire)
    return frames


def parse_block(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Read an inflated header block by the spec's layout, independently of the library."""
    (count,) = struct.unpack_from(">I", raw)
    pos, pairs = 4, []
    for _ in range(count):
        (n,) = struct.unpack_from(">I", raw, pos)
        name = raw[pos + 4 : pos + 4 + n]
        pos += 4 + n
        (n,) = struct.unpack_from(">I", raw, pos)
        pairs.append((name, raw[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    assert pos == len(raw)
    return pairs


def pair() -> tuple[SpdyConnection, SpdyConnection]:
    return SpdyConnection(is_server=False), SpdyConnection(is_server=True)


def open_stream(
    client: SpdyConnection, server: SpdyConnection, stream_id: int = 1, *, reply: bool = True
) -> None:
    """Open a stream from the client and (optionally) reply, as kubectl/kubelet do."""
    [event] = server.receive_data(client.syn_stream(stream_id, EXEC_HEADERS))
    assert isinstance(event, SynStream)
    if reply:
        [reply_event] = client.receive_data(server.syn_reply(stream_id, {}))
        assert reply_event == SynReply(stream_id, ())


# -- The dictionary and the wire format -------------------------------------------


def test_dictionary_matches_spec_listing():
    assert len(SPDY_DICTIONARY) == SPEC_DICTIONARY_LENGTH
    assert hashlib.sha256(SPDY_DICTIONARY).hexdigest() == SPEC_DICTIONARY_SHA256
    assert SPDY_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert SPDY_DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")
    assert zlib.adler32(SPDY_DICTIONARY) == SPEC_DICTIONARY_ADLER32


def test_first_header_block_announces_the_dictionary():
    client, _ = pair()
    frame = client.syn_stream(1, EXEC_HEADERS)
    zheader = frame[18:24]  # after the 8-byte frame header and 10 SYN_STREAM bytes
    cmf, flg = zheader[0], zheader[1]
    assert cmf & 0x0F == 8  # deflate (RFC 1950 section 2.2)
    assert (cmf << 8 | flg) % 31 == 0
    assert flg & 0x20  # FDICT
    assert struct.unpack(">I", zheader[2:6])[0] == SPEC_DICTIONARY_ADLER32


def test_syn_stream_wire_layout():
    client, _ = pair()
    frame = client.syn_stream(1, EXEC_HEADERS, priority=3)
    assert frame[:4] == b"\x80\x03\x00\x01"  # control bit, version 3, type SYN_STREAM
    assert frame[4] == 0  # no flags
    assert int.from_bytes(frame[5:8], "big") == len(frame) - 8
    stream_id, associated, pri, slot = struct.unpack_from(">IIBB", frame, 8)
    assert (stream_id, associated, pri >> 5, pri & 0x1F, slot) == (1, 0, 3, 0, 0)
    inflater = zlib.decompressobj(zdict=SPDY_DICTIONARY)
    pairs = parse_block(inflater.decompress(frame[18:]))
    assert pairs == [(b"streamtype", b"stdout"), (b"port", b"8080"), (b"requestid", b"0")]


def test_syn_stream_flags_on_the_wire():
    client, _ = pair()
    frame = client.syn_stream(1, {}, fin=True, unidirectional=True)
    assert frame[:5] == b"\x80\x03\x00\x01\x03"


def test_parses_hand_assembled_syn_stream():
    _, server = pair()
    go = GoPeer()
    raw = raw_block((b"streamtype", b"error"), (b"requestid", b"7"))
    events = server.receive_data(go.syn_stream(1, raw, flags=0x01, priority=2))
    assert events == [
        SynStream(
            1, (("streamtype", "error"), ("requestid", "7")), fin=True, associated_id=0, priority=2
        )
    ]


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (bytes.fromhex("80030006 00000004 00000001"), Ping(1, needs_reply=True)),
        (bytes.fromhex("80030006 00000004 00000002"), Ping(2, needs_reply=False)),
        (bytes.fromhex("80030007 00000008 00000005 00000000"), GoAway(5, GoAwayStatus.OK)),
        (bytes.fromhex("80030007 00000008 80000005 00000002"), GoAway(5, 2)),  # X bit masked
        (bytes.fromhex("80030003 00000008 00000009 00000005"), RstStream(9, RstStatus.CANCEL)),
        (bytes.fromhex("80030009 00000008 00000000 00001000"), WindowUpdate(0, 4096)),
        (
            bytes.fromhex("80030004 01000014 00000002 01000007 00008000 00000004 00000064"),
            Settings(
                (
                    SettingsEntry(SettingsId.INITIAL_WINDOW_SIZE, 0x8000, flags=1),
                    SettingsEntry(SettingsId.MAX_CONCURRENT_STREAMS, 100),
                ),
                clear=True,
            ),
        ),
    ],
)
def test_parses_hand_assembled_control_frames(wire, expected):
    server = SpdyConnection(is_server=True)
    assert server.receive_data(wire) == [expected]


def test_parses_hand_assembled_data_frame():
    client, server = pair()
    open_stream(client, server)
    wire = bytes.fromhex("00000001 01000005") + b"hello"
    assert server.receive_data(wire) == [Data(1, b"hello", fin=True)]


# -- Round trips ----------------------------------------------------------------


def test_syn_stream_round_trip_with_kubernetes_headers():
    client, server = pair()
    events = []
    for stream_type in ("error", "stdin", "stdout", "stderr", "resize"):
        stream_id = client.next_stream_id
        headers = {"streamtype": stream_type, "port": "8080", "requestid": "1"}
        events += server.receive_data(client.syn_stream(stream_id, headers))
    assert all(isinstance(e, SynStream) for e in events)
    assert [e.stream_id for e in events if isinstance(e, SynStream)] == [1, 3, 5, 7, 9]
    first = events[0]
    assert first == SynStream(1, (("streamtype", "error"), ("port", "8080"), ("requestid", "1")))
    assert isinstance(first, SynStream)
    assert first.get("port") == "8080"
    assert first.get("missing") is None
    assert server.last_peer_stream_id == 9


def test_header_names_are_lowercased_and_pairs_accepted():
    client, server = pair()
    [event] = server.receive_data(client.syn_stream(1, [("StreamType", "error"), ("Port", "1")]))
    assert event == SynStream(1, (("streamtype", "error"), ("port", "1")))


def test_syn_reply_headers_and_data_round_trip():
    client, server = pair()
    server.receive_data(client.syn_stream(1, EXEC_HEADERS))
    assert client.receive_data(server.syn_reply(1, {"x": "y"})) == [SynReply(1, (("x", "y"),))]
    assert client.receive_data(server.headers(1, {"status": "ok"})) == [
        Headers(1, (("status", "ok"),))
    ]
    assert client.receive_data(server.data(1, b"out")) == [Data(1, b"out")]
    assert server.receive_data(client.data(1, b"in", fin=True)) == [Data(1, b"in", fin=True)]
    assert client.receive_data(server.headers(1, {}, fin=True)) == [Headers(1, (), fin=True)]
    assert client.open_stream_ids() == server.open_stream_ids() == []


def test_rst_stream_round_trip():
    client, server = pair()
    open_stream(client, server)
    assert client.receive_data(server.rst_stream(1, RstStatus.REFUSED_STREAM)) == [
        RstStream(1, RstStatus.REFUSED_STREAM)
    ]
    assert client.open_stream_ids() == server.open_stream_ids() == []
    with pytest.raises(SpdyStateError):
        client.data(1, b"late")


def test_settings_round_trip():
    client, server = pair()
    wire = server.settings({SettingsId.MAX_CONCURRENT_STREAMS: 100, SettingsId.ROUND_TRIP_TIME: 5})
    [event] = client.receive_data(wire)
    assert event == Settings(
        (
            SettingsEntry(SettingsId.ROUND_TRIP_TIME, 5),
            SettingsEntry(SettingsId.MAX_CONCURRENT_STREAMS, 100),
        )
    )
    assert isinstance(event, Settings)
    assert event.get(SettingsId.MAX_CONCURRENT_STREAMS) == 100
    assert event.get(SettingsId.UPLOAD_BANDWIDTH) is None


def test_window_update_round_trip():
    client, server = pair()
    open_stream(client, server)
    assert client.receive_data(server.window_update(1, 1000)) == [WindowUpdate(1, 1000)]
    assert client.receive_data(server.window_update(0, 2000)) == [WindowUpdate(0, 2000)]


def test_ping_echo():
    client, server = pair()
    [ping] = server.receive_data(client.ping(1))
    assert ping == Ping(1, needs_reply=True)
    assert isinstance(ping, Ping)
    assert client.receive_data(server.ping(ping.ping_id)) == [Ping(1, needs_reply=False)]
    # A server-initiated ping uses an even id, and the client must answer it.
    assert client.receive_data(server.ping(2)) == [Ping(2, needs_reply=True)]


def test_goaway_round_trip_stops_new_streams():
    client, server = pair()
    open_stream(client, server)
    wire = server.goaway(server.last_peer_stream_id, GoAwayStatus.OK)
    assert client.receive_data(wire) == [GoAway(1, GoAwayStatus.OK)]
    assert client.goaway_received
    with pytest.raises(SpdyStateError):
        client.syn_stream(3, EXEC_HEADERS)
    # Existing streams carry on.
    assert server.receive_data(client.data(1, b"x")) == [Data(1, b"x")]


def test_syn_stream_after_our_goaway_is_ignored_but_inflated():
    client, server = pair()
    open_stream(client, server)
    server.goaway(1)
    assert server.receive_data(client.syn_stream(3, EXEC_HEADERS)) == []
    # The ignored block went through the inflater, so the next one decodes.
    assert server.receive_data(client.headers(1, {"a": "b"})) == [Headers(1, (("a", "b"),))]
    assert server.receive_data(client.data(3, b"x")) == []  # a stream that never opened here


def test_unidirectional_stream():
    client, server = pair()
    [event] = server.receive_data(client.syn_stream(1, EXEC_HEADERS, unidirectional=True))
    assert isinstance(event, SynStream)
    assert event.unidirectional
    with pytest.raises(SpdyStateError):
        server.syn_reply(1, {})
    assert server.send_window(1) == 0
    assert server.receive_data(client.data(1, b"push", fin=True)) == [Data(1, b"push", fin=True)]
    assert server.open_stream_ids() == []


# -- Partial input ----------------------------------------------------------------


def conversation() -> bytes:
    """Everything a client might send, as one byte string."""
    client, server = pair()
    wire = client.syn_stream(1, EXEC_HEADERS)
    wire += client.syn_stream(3, {"streamtype": "stdin", "multi": ["a", "b"]}, priority=7)
    server.receive_data(wire)
    client.receive_data(server.syn_reply(1, {}) + server.syn_reply(3, {}))
    wire += client.data(3, bytes(range(256)) * 100)
    wire += client.headers(1, {"x": "1"})
    wire += client.ping(5)
    wire += client.settings({SettingsId.INITIAL_WINDOW_SIZE: 1 << 20})
    wire += client.window_update(0, 12345)
    wire += client.data(3, b"", fin=True)
    wire += client.rst_stream(1, RstStatus.CANCEL)
    wire += client.goaway(0)
    return wire


def test_feeding_byte_by_byte_gives_the_same_events():
    wire = conversation()
    whole = SpdyConnection(is_server=True).receive_data(wire)
    # 2 SYN_STREAM, 2+1 DATA, HEADERS, PING, SETTINGS, WINDOW_UPDATE, RST_STREAM, GOAWAY
    assert len(whole) == 11
    server = SpdyConnection(is_server=True)
    piecewise = []
    for i in range(len(wire)):
        piecewise += server.receive_data(wire[i : i + 1])
    assert piecewise == whole


def test_incomplete_frame_waits_for_the_rest():
    client, server = pair()
    frame = client.syn_stream(1, EXEC_HEADERS)
    assert server.receive_data(frame[:-1]) == []
    assert server.receive_data(b"") == []
    [event] = server.receive_data(frame[-1:])
    assert isinstance(event, SynStream)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=30))
def test_any_split_gives_the_same_events(cuts):
    wire = conversation()
    whole = SpdyConnection(is_server=True).receive_data(wire)
    points = sorted({c % (len(wire) + 1) for c in cuts})
    server = SpdyConnection(is_server=True)
    events = []
    for start, end in zip([0, *points], [*points, len(wire)], strict=True):
        events += server.receive_data(wire[start:end])
    assert events == whole


# -- Header compression -------------------------------------------------------------


def test_compression_context_spans_header_blocks():
    client, server = pair()
    frames = [client.syn_stream(sid, EXEC_HEADERS) for sid in (1, 3, 5)]
    # The second block refers back to the first through the shared window,
    # so it is far smaller, and it carries no zlib header of its own.
    assert len(frames[1]) < len(frames[0]) - 20
    assert len(frames[2]) <= len(frames[1])
    events = server.receive_data(b"".join(frames))
    syns = [e for e in events if isinstance(e, SynStream)]
    assert [e.stream_id for e in syns] == [1, 3, 5]
    assert len(syns) == len(events)
    assert all(e.get("streamtype") == "stdout" for e in syns)
    # Without the first block the second cannot be inflated: a session error.
    fresh = SpdyConnection(is_server=True)
    with pytest.raises(SpdyProtocolError, match="inflate"):
        fresh.receive_data(frames[1])


def test_each_direction_has_its_own_context():
    client, server = pair()
    for sid in (1, 3, 5):
        [syn] = server.receive_data(client.syn_stream(sid, {"n": str(sid)}))
        assert isinstance(syn, SynStream)
        assert syn.get("n") == str(sid)
        [reply] = client.receive_data(server.syn_reply(sid, {"m": str(sid)}))
        assert reply == SynReply(sid, (("m", str(sid)),))


def test_multi_value_headers():
    client, server = pair()
    frame = client.syn_stream(1, {"x-multi": ["a", "b", "c"], "empty": "", "one": ["1"]})
    inflater = zlib.decompressobj(zdict=SPDY_DICTIONARY)
    assert parse_block(inflater.decompress(frame[18:])) == [
        (b"x-multi", b"a\x00b\x00c"),
        (b"empty", b""),
        (b"one", b"1"),
    ]
    [event] = server.receive_data(frame)
    assert isinstance(event, SynStream)
    assert event.headers == (
        ("x-multi", "a"),
        ("x-multi", "b"),
        ("x-multi", "c"),
        ("empty", ""),
        ("one", "1"),
    )
    assert event.get_all("x-multi") == ["a", "b", "c"]
    assert event.get("empty") == ""


def test_repeated_pairs_are_merged_into_one_wire_header():
    client, server = pair()
    frame = client.syn_stream(1, [("set-cookie", "a=1"), ("Set-Cookie", "b=2")])
    inflater = zlib.decompressobj(zdict=SPDY_DICTIONARY)
    assert parse_block(inflater.decompress(frame[18:])) == [(b"set-cookie", b"a=1\x00b=2")]
    [event] = server.receive_data(frame)
    assert isinstance(event, SynStream)
    assert event.get_all("set-cookie") == ["a=1", "b=2"]


def test_header_values_round_trip_every_octet():
    client, server = pair()
    value = bytes(range(1, 256)).decode("latin-1")
    [event] = server.receive_data(client.syn_stream(1, {"bin": value}))
    assert isinstance(event, SynStream)
    assert event.get("bin") == value


@pytest.mark.parametrize(
    "headers",
    [
        {"": "x"},
        {"a\x00b": "x"},
        {"naïve": "x"},
        {"a": "x\x00y"},
        {"a": ["x", ""]},
        {"a": []},
        {"a": "snowman \u2603"},
    ],
)
def test_invalid_outgoing_headers_are_refused_without_touching_state(headers):
    client, server = pair()
    with pytest.raises(ValueError, match="header"):
        client.syn_stream(1, headers)
    # Same id still free, and the compressor was not advanced: the peer decodes.
    [event] = server.receive_data(client.syn_stream(1, EXEC_HEADERS))
    assert isinstance(event, SynStream)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (raw_block((b"a", b"1"), (b"a", b"2")), "duplicate"),
        (raw_block((b"Upper", b"1")), "lower-case"),
        (raw_block((b"", b"1")), "empty header name"),
        (raw_block((b"a", b"x\x00\x00y")), "empty value"),
        (raw_block((b"a", b"\x00y")), "empty value"),
        (raw_block((b"a", b"1")) + b"junk", "trailing"),
        (raw_block((b"a", b"1"))[:-1], "truncated"),
        (struct.pack(">I", 0xFFFFFFFF), "truncated"),
        (b"", "truncated"),
    ],
)
def test_malformed_header_block_is_a_stream_error(raw, reason):
    server = SpdyConnection(is_server=True)
    go = GoPeer()
    [event] = server.receive_data(go.syn_stream(1, raw))
    assert isinstance(event, StreamError)
    assert (event.stream_id, event.status) == (1, RstStatus.PROTOCOL_ERROR)
    assert reason in event.reason
    assert server.open_stream_ids() == []
    # The session survives: the compression state is intact.
    [ok] = server.receive_data(go.syn_stream(3, raw_block((b"a", b"1"))))
    assert ok == SynStream(3, (("a", "1"),))


def test_header_block_inflation_is_bounded():
    go = GoPeer()
    bomb = go.syn_stream(1, raw_block((b"a", b"x" * (2 << 20))))
    assert len(bomb) < 8 * 1024  # a few KiB on the wire...
    server = SpdyConnection(is_server=True)
    with pytest.raises(SpdyProtocolError, match="inflates beyond 1048576"):
        server.receive_data(bomb)  # ...refused before it reaches 2 MiB in memory


def test_header_block_limit_is_configurable():
    go = GoPeer()
    server = SpdyConnection(is_server=True, max_header_block_size=64)
    [ok] = server.receive_data(go.syn_stream(1, raw_block((b"a", b"x" * 40))))
    assert isinstance(ok, SynStream)
    with pytest.raises(SpdyProtocolError, match="inflates beyond 64"):
        server.receive_data(go.syn_stream(3, raw_block((b"a", b"x" * 80))))


def test_outgoing_header_block_limit():
    client = SpdyConnection(is_server=False, max_header_block_size=64)
    with pytest.raises(ValueError, match="exceeds 64"):
        client.syn_stream(1, {"a": "x" * 100})
    client.syn_stream(1, {"a": "x"})


def test_finished_zlib_stream_is_fatal():
    deflater = zlib.compressobj(zdict=SPDY_DICTIONARY)
    block = deflater.compress(raw_block((b"a", b"1"))) + deflater.flush(zlib.Z_FINISH)
    frame = control(1, 0, struct.pack(">IIBB", 1, 0, 0, 0) + block)
    with pytest.raises(SpdyProtocolError, match="ended the header compression"):
        SpdyConnection(is_server=True).receive_data(frame)


# -- DATA -----------------------------------------------------------------------


def test_big_data_is_split_into_frames():
    client, server = pair()
    open_stream(client, server)
    payload = random.Random(7).randbytes(100_000)
    wire = server.data(1, payload, fin=True)
    frames = split_frames(wire)
    assert len(frames) == 7  # six of 16 KiB and the rest
    assert [length for _, _, length, _ in frames] == [DEFAULT_MAX_DATA_FRAME_SIZE] * 6 + [1696]
    assert [flags for _, flags, _, _ in frames] == [0] * 6 + [1]
    assert all(word == 1 for word, _, _, _ in frames)  # control bit clear, stream 1
    events = client.receive_data(wire)
    assert all(isinstance(e, Data) for e in events)
    assert b"".join(e.data for e in events if isinstance(e, Data)) == payload
    assert [e.fin for e in events if isinstance(e, Data)] == [False] * 6 + [True]


def test_data_frame_size_is_configurable():
    client = SpdyConnection(is_server=False, max_data_frame_size=1000)
    server = SpdyConnection(is_server=True)
    open_stream(client, server)
    frames = split_frames(client.data(1, b"z" * 2500))
    assert [length for _, _, length, _ in frames] == [1000, 1000, 500]
    with pytest.raises(ValueError, match="max_data_frame_size"):
        SpdyConnection(is_server=False, max_data_frame_size=1 << 24)


def test_empty_data():
    client, server = pair()
    open_stream(client, server)
    assert client.data(1, b"") == b""
    fin = client.data(1, b"", fin=True)
    assert fin == bytes.fromhex("00000001 01000000")
    assert server.receive_data(fin) == [Data(1, b"", fin=True)]


def test_receives_a_maximum_size_data_frame():
    client, server = pair()
    open_stream(client, server)
    payload = b"q" * ((1 << 24) - 1)
    assert server.receive_data(data_frame(1, payload)) == [Data(1, payload)]


def test_data_accepts_bytearray_and_memoryview():
    client, server = pair()
    open_stream(client, server)
    wire = client.data(1, bytearray(b"ab")) + client.data(1, memoryview(b"cd"))
    assert server.receive_data(wire) == [Data(1, b"ab"), Data(1, b"cd")]


@pytest.mark.parametrize(
    ("setup", "frame", "status"),
    [
        ("none", data_frame(1, b"x"), RstStatus.INVALID_STREAM),
        ("fin", data_frame(1, b"x"), RstStatus.STREAM_ALREADY_CLOSED),
        ("open", data_frame(1, b"x", flags=0x02), RstStatus.PROTOCOL_ERROR),
    ],
)
def test_data_stream_errors(setup, frame, status):
    client, server = pair()
    if setup != "none":
        server.receive_data(client.syn_stream(1, EXEC_HEADERS, fin=setup == "fin"))
    [event] = server.receive_data(frame)
    assert isinstance(event, StreamError)
    assert (event.stream_id, event.status) == (1, status)


def test_data_before_syn_reply_on_our_stream_is_a_stream_error():
    client, server = pair()
    server.receive_data(client.syn_stream(1, EXEC_HEADERS))
    [event] = client.receive_data(data_frame(1, b"early"))
    assert isinstance(event, StreamError)
    assert event.status == RstStatus.PROTOCOL_ERROR


def test_frames_for_a_closed_stream_are_dropped():
    client, server = pair()
    open_stream(client, server)
    server.rst_stream(1, RstStatus.CANCEL)
    # In flight when the RST went out (section 2.4.2): dropped, no event.
    assert server.receive_data(client.data(1, b"x") + client.headers(1, {"a": "b"})) == []


def test_second_syn_reply_is_stream_in_use():
    client = SpdyConnection(is_server=False)
    client.syn_stream(1, EXEC_HEADERS)
    go = GoPeer()
    assert client.receive_data(go.syn_reply(1, raw_block())) == [SynReply(1, ())]
    [event] = client.receive_data(go.syn_reply(1, raw_block()))
    assert event == StreamError(1, RstStatus.STREAM_IN_USE, "second SYN_REPLY")


# -- Stream ids -----------------------------------------------------------------------


def test_stream_ids_must_increase():
    server = SpdyConnection(is_server=True)
    go = GoPeer()
    server.receive_data(go.syn_stream(5, raw_block()))
    [dup] = server.receive_data(go.syn_stream(5, raw_block()))
    assert isinstance(dup, StreamError)
    assert dup.status == RstStatus.PROTOCOL_ERROR
    with pytest.raises(SpdyProtocolError, match="ids must increase"):
        server.receive_data(go.syn_stream(3, raw_block()))


def test_syn_stream_with_our_parity_is_a_stream_error():
    server = SpdyConnection(is_server=True)
    [event] = server.receive_data(GoPeer().syn_stream(2, raw_block()))
    assert isinstance(event, StreamError)
    assert event.stream_id == 2


def test_local_stream_id_rules():
    client, server = pair()
    with pytest.raises(ValueError, match="odd"):
        client.syn_stream(2, {})
    with pytest.raises(ValueError, match="even"):
        server.syn_stream(1, {})
    client.syn_stream(5, {})
    assert client.next_stream_id == 7
    with pytest.raises(ValueError, match=r"must be in 7\.\."):
        client.syn_stream(3, {})
    with pytest.raises(ValueError, match="priority"):
        client.syn_stream(7, {}, priority=8)
    assert server.syn_stream(2, {})[:4] == b"\x80\x03\x00\x01"


def test_local_state_errors():
    client, server = pair()
    server.receive_data(client.syn_stream(1, EXEC_HEADERS))
    with pytest.raises(SpdyStateError, match="SYN_REPLY before DATA"):
        server.data(1, b"x")
    with pytest.raises(SpdyStateError, match="ours"):
        client.syn_reply(1, {})
    with pytest.raises(SpdyStateError):
        server.data(9, b"x")
    server.syn_reply(1, {})
    with pytest.raises(SpdyStateError, match="already replied"):
        server.syn_reply(1, {})
    server.data(1, b"bye", fin=True)
    with pytest.raises(SpdyStateError, match="closed for sending"):
        server.data(1, b"more")
    with pytest.raises(SpdyStateError):
        server.headers(1, {})


def test_rst_from_peer_closes_the_stream_for_sending():
    client, server = pair()
    open_stream(client, server)
    server.receive_data(client.rst_stream(1, RstStatus.CANCEL))
    with pytest.raises(SpdyStateError):
        server.data(1, b"stdout")


# -- Flow control ------------------------------------------------------------------


def test_send_window_tracks_data_and_window_updates():
    client, server = pair()
    open_stream(client, server)
    assert server.send_window(1) == DEFAULT_INITIAL_WINDOW_SIZE
    server.data(1, b"x" * 10_000)
    assert server.send_window(1) == DEFAULT_INITIAL_WINDOW_SIZE - 10_000
    assert server.send_window(0) == DEFAULT_INITIAL_WINDOW_SIZE - 10_000
    server.receive_data(client.window_update(1, 10_000))
    assert server.send_window(1) == DEFAULT_INITIAL_WINDOW_SIZE - 10_000  # session still short
    server.receive_data(client.window_update(0, 10_000))
    assert server.send_window(1) == DEFAULT_INITIAL_WINDOW_SIZE
    assert server.peer_uses_flow_control


def test_session_window_is_shared_by_streams():
    client, server = pair()
    open_stream(client, server, 1)
    open_stream(client, server, 3)
    server.data(1, b"a" * 40_000)
    server.data(3, b"b" * 40_000)
    assert server.send_window(0) == DEFAULT_INITIAL_WINDOW_SIZE - 80_000
    assert server.send_window(1) < 0  # the session window is exhausted
    assert server.send_window(99) == 0  # no such stream


def test_spdystream_like_peer_does_not_flow_control():
    client, server = pair()
    open_stream(client, server)
    server.receive_data(client.data(1, b"x" * 100_000))  # over the window: tolerated
    assert not server.peer_uses_flow_control


def test_settings_initial_window_size_shifts_open_streams():
    client, server = pair()
    open_stream(client, server, 1)
    server.data(1, b"x" * 1000)
    [event] = server.receive_data(client.settings({SettingsId.INITIAL_WINDOW_SIZE: 16_384}))
    assert isinstance(event, Settings)
    assert server.peer_uses_flow_control
    assert server.send_window(1) == 16_384 - 1000
    open_stream(client, server, 3)
    assert server.send_window(3) == 16_384


def test_acknowledge_received_batches_window_updates():
    client, server = pair()
    open_stream(client, server)
    events = server.receive_data(client.data(1, b"x" * 40_000))
    updates = b""
    for event in events:
        assert isinstance(event, Data)
        updates += server.acknowledge_received(event.stream_id, len(event.data))
    # Below half a window nothing goes out; past it, one update per window.
    wus = client.receive_data(updates)
    assert wus == [WindowUpdate(1, 32_768), WindowUpdate(0, 32_768)]
    assert client.send_window(1) == DEFAULT_INITIAL_WINDOW_SIZE - 40_000 + 32_768
    assert server.acknowledge_received(1, 0) == b""


def test_acknowledge_after_peer_fin_returns_only_session_credit():
    client, server = pair()
    open_stream(client, server)
    wire = b""
    for event in server.receive_data(client.data(1, b"x" * 40_000, fin=True)):
        assert isinstance(event, Data)
        wire += server.acknowledge_received(1, len(event.data))
    # Two 16 KiB frames reach the session threshold; no stream-level update.
    assert client.receive_data(wire) == [WindowUpdate(0, 32_768)]


def test_dropped_data_still_returns_session_credit():
    client, server = pair()
    open_stream(client, server)
    server.rst_stream(1, RstStatus.CANCEL)
    assert server.receive_data(client.data(1, b"x" * 40_000)) == []
    # The next acknowledgement carries the credit for the dropped bytes too.
    assert client.receive_data(server.acknowledge_received(1, 0)) == [WindowUpdate(0, 40_000)]


def test_local_settings_move_the_acknowledgement_threshold():
    client, server = pair()
    server.settings([SettingsEntry(SettingsId.INITIAL_WINDOW_SIZE, 1000)])
    open_stream(client, server)
    [event] = server.receive_data(client.data(1, b"x" * 600))
    assert isinstance(event, Data)
    assert client.receive_data(server.acknowledge_received(1, 600)) == [WindowUpdate(1, 600)]


def test_window_overflow():
    client, server = pair()
    open_stream(client, server)
    [event] = server.receive_data(client.window_update(1, (1 << 31) - 1))
    assert isinstance(event, StreamError)
    assert event.status == RstStatus.FLOW_CONTROL_ERROR
    with pytest.raises(SpdyProtocolError, match="session window"):
        server.receive_data(client.window_update(0, (1 << 31) - 1))


# -- Session errors and unknown frames ---------------------------------------------------


def test_unknown_control_frames_are_skipped():
    server = SpdyConnection(is_server=True)
    wire = (
        control(5, 0, b"")  # NOOP, SPDY/2
        + control(10, 0, b"\x00\x01" + b"\x00" * 10)  # CREDENTIAL, SPDY/3 only
        + control(0xFFFF, 0xFF, b"future")
        + bytes.fromhex("80030006 00000004 00000001")
    )
    assert server.receive_data(wire) == [Ping(1, needs_reply=True)]


@pytest.mark.parametrize(
    "wire",
    [
        control(6, 0, b"\x00\x00\x00\x01", version=2),  # SPDY/2
        control(1, 0, b"", version=4),
        bytes.fromhex("00000000 00000001") + b"x",  # DATA on stream 0
        control(6, 0, b"\x00" * 8),  # PING must be 4 bytes
        control(3, 0, b"\x00\x00\x00\x01"),  # RST_STREAM must be 8
        control(3, 0, b"\x00\x00\x00\x00\x00\x00\x00\x01"),  # RST_STREAM stream 0
        control(3, 0, b"\x00\x00\x00\x01\x00\x00\x00\x00"),  # RST_STREAM status 0
        control(7, 0, b"\x00" * 4),  # GOAWAY must be 8
        control(9, 0, b"\x00" * 12),  # WINDOW_UPDATE must be 8
        control(4, 0, b"\x00\x00\x00\x02" + b"\x00" * 8),  # SETTINGS count 2, one entry
        control(4, 0, b"\x00\x00\x00\x01\x00\x00\x00\x07\x80\x00\x00\x00"),  # window 2^31
        control(1, 0, b"\x00" * 4),  # SYN_STREAM shorter than 10
        control(2, 0, b"\x00" * 2),  # SYN_REPLY shorter than 4
        control(1, 0, struct.pack(">IIBB", 1, 0, 0, 0) + b"not zlib at all"),
    ],
)
def test_session_errors(wire):
    server = SpdyConnection(is_server=True)
    with pytest.raises(SpdyProtocolError) as info:
        server.receive_data(wire)
    assert info.value.status == GoAwayStatus.PROTOCOL_ERROR


def test_bad_version_fails_on_the_frame_header_alone():
    server = SpdyConnection(is_server=True)
    with pytest.raises(SpdyProtocolError, match="version 2"):
        server.receive_data(bytes.fromhex("80020001 00ffffff"))  # 16 MiB promised, none sent


def test_failed_session_refuses_more_input():
    server = SpdyConnection(is_server=True)
    with pytest.raises(SpdyProtocolError):
        server.receive_data(control(6, 0, b"", version=2))
    with pytest.raises(SpdyProtocolError, match="already failed"):
        server.receive_data(bytes.fromhex("80030006 00000004 00000001"))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.ping(0), "ping id"),
        (lambda c: c.rst_stream(1, 0), "status"),
        (lambda c: c.rst_stream(0, 1), "stream id"),
        (lambda c: c.window_update(1, 0), "delta"),
        (lambda c: c.goaway(-1), "stream id"),
        (lambda c: c.settings({SettingsId.INITIAL_WINDOW_SIZE: 1 << 31}), "INITIAL_WINDOW_SIZE"),
        (lambda c: c.settings([SettingsEntry(1, 1), SettingsEntry(1, 2)]), "repeated"),
        (lambda c: c.acknowledge_received(1, -1), "acknowledge"),
    ],
)
def test_local_argument_checks(call, message):
    with pytest.raises(ValueError, match=message):
        call(SpdyConnection(is_server=False))
