"""SPDY/3.1 framing as a sans-IO state machine.

Kubernetes' streaming protocols for ``exec``/``attach`` (remotecommand) and
``port-forward`` are SPDY/3.1 sessions: ``kubectl`` speaks it through
``k8s.io/apimachinery/pkg/util/httpstream/spdy``, which is ``moby/spdystream``
on top of a fork of ``golang.org/x/net/spdy``.  This module owns the bytes on
the wire and nothing else, in the manner of h11 and hypercorn's
``protocol/``: the caller feeds received bytes to
:meth:`SpdyConnection.receive_data` and gets events back, and every method that
produces output returns the bytes to write.  There is no I/O, no clock and no
task here; the stream server (``pouch.stream.session``) does that.

Spec references are to "SPDY Protocol", draft-mbelshe-httpbis-spdy-00 (Feb
2012), which is SPDY/3, plus the SPDY/3.1 delta published on chromium.org:
3.1 adds a session-wide flow-control window (a WINDOW_UPDATE on stream 0,
initially 64 KiB and not changed by SETTINGS) and drops the CREDENTIAL frame.
The frame version field stays 3.

Interop notes, measured against ``moby/spdystream`` (the Go peer we serve):

* It never sends WINDOW_UPDATE and ignores received WINDOW_UPDATE and SETTINGS
  frames (its frame loop logs "unhandled frame type").  A sender that waits
  for window credit from ``kubectl`` therefore waits forever; see
  :meth:`SpdyConnection.send_window` and
  :attr:`SpdyConnection.peer_uses_flow_control`.  For the same reason a
  receive-window overrun by the peer is tolerated, not punished.
* Its frame reader fails the whole session on an unknown control frame type,
  so this module never emits one.
* It drops DATA on a stream it created until it has seen the SYN_REPLY, so
  :meth:`SpdyConnection.data` refuses to send before :meth:`syn_reply`.
* It rejects header names that are not lower case, and splits values on NUL.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, TypeAlias

__all__ = [
    "DEFAULT_INITIAL_WINDOW_SIZE",
    "DEFAULT_MAX_DATA_FRAME_SIZE",
    "DEFAULT_MAX_HEADER_BLOCK_SIZE",
    "MAX_FRAME_LENGTH",
    "MAX_STREAM_ID",
    "MAX_WINDOW_SIZE",
    "SPDY_DICTIONARY",
    "SPDY_VERSION",
    "Data",
    "Event",
    "FrameType",
    "GoAway",
    "GoAwayStatus",
    "HeaderList",
    "Headers",
    "HeadersLike",
    "Ping",
    "RstStatus",
    "RstStream",
    "Settings",
    "SettingsEntry",
    "SettingsId",
    "SpdyConnection",
    "SpdyError",
    "SpdyProtocolError",
    "SpdyStateError",
    "StreamError",
    "SynReply",
    "SynStream",
    "WindowUpdate",
]

SPDY_VERSION: Final = 3
"""The version field of every control frame; SPDY/3.1 still sends 3."""

MAX_FRAME_LENGTH: Final = (1 << 24) - 1
"""The largest payload the 24-bit length field can describe (section 2.2)."""

MAX_STREAM_ID: Final = (1 << 31) - 1
"""Stream ids are 31 bits and never wrap (section 2.3.2)."""

MAX_WINDOW_SIZE: Final = (1 << 31) - 1
"""Largest legal window and WINDOW_UPDATE delta (section 2.6.8)."""

DEFAULT_INITIAL_WINDOW_SIZE: Final = 64 * 1024
"""Initial stream window (section 2.6.8) and, in 3.1, the session window."""

DEFAULT_MAX_HEADER_BLOCK_SIZE: Final = 1 << 20
"""Cap on an inflated header block: a few bytes of zlib can inflate to
gigabytes, and Kubernetes' header blocks are well under 1 KiB."""

DEFAULT_MAX_DATA_FRAME_SIZE: Final = 16 * 1024
"""Chunk size for outgoing DATA.  Any size up to 2^24-1 is legal; 16 KiB
keeps stdout and stderr interleaved fairly and keeps one frame well inside
the 64 KiB initial window of a peer that does flow control."""

# -- The header compression dictionary (section 2.6.10.1) ---------------------
#
# The spec prints it as 1423 hex bytes.  It is built here from its own
# structure so a reader can check it: 65 words, each preceded by its length as
# a 32-bit big-endian integer, then a run of raw text.  The result is pinned in
# tests/unit/stream/test_spdy.py by length and SHA-256, computed from the hex
# listing in draft-mbelshe-httpbis-spdy-00 section 2.6.10.1.
_DICTIONARY_WORDS: Final = (
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
)
_DICTIONARY_TAIL: Final = (
    "100101201202205206300302303304305306307402405406407408409410411412413414"
    "415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently"
    "400 Bad Request401 Unauthorized403 Forbidden404 Not Found"
    "500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,"
    "application/xhtml+xml,text/plain,text/javascript,"
    "publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
SPDY_DICTIONARY: Final = b"".join(
    struct.pack(">I", len(word)) + word.encode("ascii") for word in _DICTIONARY_WORDS
) + _DICTIONARY_TAIL.encode("ascii")
"""The zlib preset dictionary for SPDY/3 header blocks (1423 bytes)."""

# Frame header layout (section 2.2): two 32-bit words.
_FRAME_HEADER: Final = struct.Struct(">II")
_HEADER_SIZE: Final = _FRAME_HEADER.size
_CONTROL_BIT: Final = 0x8000_0000
_ID_MASK: Final = 0x7FFF_FFFF  # the X bit in front of stream ids is reserved
_U32: Final = struct.Struct(">I")
_U32_MAX: Final = (1 << 32) - 1

_FLAG_FIN: Final = 0x01
_FLAG_UNIDIRECTIONAL: Final = 0x02
_FLAG_DATA_COMPRESS: Final = 0x02  # SPDY/3 section 2.2.2; nobody implements it
_FLAG_SETTINGS_CLEAR: Final = 0x01

# The compressor follows the implementation note in section 2.6.10.1: header
# blocks are small, so a 2 KiB window (it still holds the whole dictionary)
# and a small memLevel cost ~10 KiB per connection instead of ~260 KiB.  The
# decompressor must accept any window the peer chose, so it keeps 15 bits.
_DEFLATE_LEVEL: Final = 9
_DEFLATE_WBITS: Final = 11
_DEFLATE_MEMLEVEL: Final = 1
# Largest header block we will compress: deflate adds at most a few bytes per
# 64 KiB, so 15 MiB always fits the 24-bit length once compressed.  The check
# must happen before compressing (see SpdyConnection._deflate).
_MAX_SENDABLE_HEADER_BLOCK: Final = 15 << 20


class FrameType(enum.IntEnum):
    """Control frame types (section 2.6).

    4 is SETTINGS; 5 (NOOP, SPDY/2) and 10 (CREDENTIAL, gone in 3.1) are not
    listed and are skipped like any other unknown type.
    """

    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(enum.IntEnum):
    """RST_STREAM status codes (section 2.6.3); 0 is not valid."""

    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    INVALID_CREDENTIALS = 10
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    """GOAWAY status codes (section 2.6.6).

    The draft's text lists INTERNAL_ERROR as 11, apparently a slip:
    golang.org/x/net/spdy, and so spdystream and kubectl, use 2.
    """

    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SettingsId(enum.IntEnum):
    """SETTINGS ids (section 2.6.4).  Only INITIAL_WINDOW_SIZE changes state here."""

    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


HeaderList: TypeAlias = tuple[tuple[str, str], ...]
"""Decoded headers: (name, value) pairs in wire order.

A NUL-separated multi-value on the wire becomes one pair per value, so
``x: a\\0b`` arrives as ``(("x", "a"), ("x", "b"))``.  Octets are decoded as
Latin-1, which maps every byte to one code point and so round-trips
anything the peer sends.
"""

HeadersLike: TypeAlias = Mapping[str, str | Sequence[str]] | Iterable[tuple[str, str]]
"""Headers to send: a mapping (a value may be a list of values) or pairs.

Names are lower-cased, as Go's framer does, and repeated names are merged
into one NUL-separated value, because the wire forbids duplicate names
(section 2.6.10).
"""


# -- Errors --------------------------------------------------------------------


class SpdyError(Exception):
    """Base for the errors of this module."""


class SpdyProtocolError(SpdyError):
    """The peer broke the protocol in a way that ends the session.

    These are the spec's session errors (section 2.4.1): a frame that cannot be
    parsed, or a header block that cannot be inflated, so the shared
    compression state is lost.  The caller should send
    ``goaway(conn.last_peer_stream_id, err.status)`` and close the transport.
    The connection refuses further input afterwards.

    Attributes:
        status: The GOAWAY status to report.
    """

    def __init__(self, message: str, *, status: int = GoAwayStatus.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.status = status


class SpdyStateError(SpdyError):
    """A local call that the session or stream state does not allow.

    For example sending on a stream that is closed for sending (after FIN, or
    after a RST_STREAM either way), DATA on a peer's stream before the
    SYN_REPLY, or a new stream after the peer's GOAWAY.  Nothing was encoded
    and no state changed.
    """


class _BadHeaderBlock(ValueError):
    """A header block inflated fine but its content is malformed (a stream error)."""


# -- Events --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _HeaderEvent:
    stream_id: int
    headers: HeaderList
    fin: bool = False

    def get(self, name: str) -> str | None:
        """Return the first value of header ``name``, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def get_all(self, name: str) -> list[str]:
        """Return every value of header ``name``, in order."""
        return [value for key, value in self.headers if key == name]


@dataclasses.dataclass(frozen=True, slots=True)
class SynStream(_HeaderEvent):
    """The peer opened a stream (SYN_STREAM, section 2.6.1).

    ``fin`` means the peer will send nothing more; ``unidirectional`` means
    we may not send on it (section 2.3.2.1).  Reply with
    :meth:`SpdyConnection.syn_reply`, or refuse with ``rst_stream``.
    """

    associated_id: int = 0
    priority: int = 0
    unidirectional: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class SynReply(_HeaderEvent):
    """The peer accepted a stream we opened (SYN_REPLY, section 2.6.2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Headers(_HeaderEvent):
    """More headers on an open stream (HEADERS, section 2.6.7)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Data:
    """Payload on a stream (section 2.2.2).

    Every Data event must be passed to
    :meth:`SpdyConnection.acknowledge_received` once the application has
    consumed it, so that a flow-controlling peer gets its window back.
    """

    stream_id: int
    data: bytes
    fin: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class RstStream:
    """The peer aborted a stream (section 2.6.3); ``status`` is a RstStatus value."""

    stream_id: int
    status: int


@dataclasses.dataclass(frozen=True, slots=True)
class SettingsEntry:
    """One SETTINGS id/value pair; ``flags`` are the PERSIST bits (section 2.6.4)."""

    setting_id: int
    value: int
    flags: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The peer's SETTINGS frame (section 2.6.4)."""

    entries: tuple[SettingsEntry, ...]
    clear: bool = False

    def get(self, setting_id: int) -> int | None:
        """Return the value for ``setting_id``; the first one wins, as the spec says."""
        for entry in self.entries:
            if entry.setting_id == setting_id:
                return entry.value
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    """A PING (section 2.6.5).

    ``needs_reply`` is true when the id has the peer's parity (clients use odd
    ids, servers even), i.e. the peer is asking: echo it with
    ``conn.ping(event.ping_id)``.  Otherwise it is the echo of our own ping.
    """

    ping_id: int
    needs_reply: bool


@dataclasses.dataclass(frozen=True, slots=True)
class GoAway:
    """The peer will accept no new streams (section 2.6.6)."""

    last_good_stream_id: int
    status: int


@dataclasses.dataclass(frozen=True, slots=True)
class WindowUpdate:
    """The peer granted send credit; ``stream_id`` 0 is the session window (3.1)."""

    stream_id: int
    delta: int


@dataclasses.dataclass(frozen=True, slots=True)
class StreamError:
    """The peer broke the protocol on one stream (section 2.4.2).

    The session is fine.  The spec asks the caller to send
    ``conn.rst_stream(stream_id, status)`` and forget the stream; the frame
    that caused it has been consumed and produced no other event.
    """

    stream_id: int
    status: int
    reason: str


Event: TypeAlias = (
    SynStream
    | SynReply
    | Headers
    | Data
    | RstStream
    | Settings
    | Ping
    | GoAway
    | WindowUpdate
    | StreamError
)


# -- Header blocks (section 2.6.10) --------------------------------------------


def _encode_header_block(headers: HeadersLike) -> bytes:
    """Serialize headers to an (uncompressed) Name/Value Header Block."""
    items: Iterable[tuple[str, str | Sequence[str]]] = (
        headers.items() if isinstance(headers, Mapping) else headers
    )
    grouped: dict[str, list[str]] = {}
    for name, value in items:
        key = name.lower()
        if not key or not key.isascii() or "\0" in key:
            raise ValueError(f"invalid header name {name!r}: must be non-empty US-ASCII")
        grouped.setdefault(key, []).extend([value] if isinstance(value, str) else value)

    parts = [_U32.pack(len(grouped))]
    for name, values in grouped.items():
        if not values:
            raise ValueError(f"header {name!r} has no value")
        if any("\0" in v for v in values):
            raise ValueError(f"header {name!r} has a NUL in a value")
        # "A header value can either be empty ... or it can contain multiple,
        # NUL-separated values, each with length greater than zero."
        if len(values) > 1 and "" in values:
            raise ValueError(f"header {name!r} has an empty value among several")
        try:
            raw_value = "\0".join(values).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise ValueError(f"header {name!r} has a value outside Latin-1") from exc
        raw_name = name.encode("ascii")
        parts += (_U32.pack(len(raw_name)), raw_name, _U32.pack(len(raw_value)), raw_value)
    return b"".join(parts)


def _read_string(block: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(block):
        raise _BadHeaderBlock("header block is truncated")
    (length,) = _U32.unpack_from(block, pos)
    end = pos + 4 + length
    if end > len(block):
        raise _BadHeaderBlock("header block is truncated")
    return block[pos + 4 : end], end


def _decode_header_block(block: bytes) -> HeaderList:
    """Parse an inflated Name/Value Header Block.

    Raises:
        _BadHeaderBlock: The content breaks section 2.6.10; a stream error.
    """
    if len(block) < 4:
        raise _BadHeaderBlock("header block is truncated")
    (count,) = _U32.unpack_from(block, 0)
    pos = 4
    seen: set[bytes] = set()
    pairs: list[tuple[str, str]] = []
    # Each pair takes at least 8 bytes, so a lying count runs out of input
    # after len(block) / 8 rounds: the loop is bounded by the block size.
    for _ in range(count):
        name, pos = _read_string(block, pos)
        value, pos = _read_string(block, pos)
        if not name:
            raise _BadHeaderBlock("empty header name")
        if not name.isascii() or b"\0" in name or name != name.lower():
            raise _BadHeaderBlock(f"header name {name!r} is not lower-case US-ASCII")
        if name in seen:
            raise _BadHeaderBlock(f"duplicate header name {name!r}")
        seen.add(name)
        values = value.split(b"\0")
        if len(values) > 1 and b"" in values:
            raise _BadHeaderBlock(f"header {name!r} has an empty value among several")
        text_name = name.decode("ascii")
        pairs += ((text_name, v.decode("latin-1")) for v in values)
    if pos != len(block):
        raise _BadHeaderBlock("trailing bytes after the header block")
    return tuple(pairs)


# -- The connection ------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Stream:
    """What the connection tracks per open stream: half-close state and windows."""

    peer_initiated: bool
    send_window: int
    recv_window: int
    local_open: bool = True  # we may still send
    remote_open: bool = True  # the peer may still send
    replied: bool = False  # SYN_REPLY sent (peer's stream) or received (ours)
    unacked: int = 0  # consumed by the app, not yet returned in a WINDOW_UPDATE


class SpdyConnection:
    """One SPDY/3.1 session, either end, without I/O.

    Feed every received byte to :meth:`receive_data`, write every byte string
    the other methods return, in the order they were returned: the header
    compressor is one zlib stream per direction (section 2.6.10.1), so
    header-carrying frames must reach the wire in the order they were made.

    Stream lifecycle: a stream exists from SYN_STREAM until both sides have
    sent FIN, or until a RST_STREAM in either direction.  Frames that arrive
    for a stream that existed but has since closed are dropped silently, since
    they were in flight when it closed (section 2.4.2).

    Not thread-safe; one task owns it.
    """

    def __init__(
        self,
        is_server: bool,
        *,
        max_header_block_size: int = DEFAULT_MAX_HEADER_BLOCK_SIZE,
        max_data_frame_size: int = DEFAULT_MAX_DATA_FRAME_SIZE,
    ) -> None:
        """Create the session state.

        Args:
            is_server: True on the accepting side.  It fixes which stream and
                ping ids are ours: clients use odd ids, servers even ones.
            max_header_block_size: Largest inflated header block accepted
                from the peer, and largest one we agree to send.
            max_data_frame_size: Largest payload put in one DATA frame.

        Raises:
            ValueError: A limit is out of range.
        """
        if not 1 <= max_data_frame_size <= MAX_FRAME_LENGTH:
            raise ValueError(f"max_data_frame_size must be in 1..{MAX_FRAME_LENGTH}")
        if max_header_block_size < 4:
            raise ValueError("max_header_block_size must be at least 4")
        self._is_server = is_server
        self._max_header_block_size = max_header_block_size
        self._max_data_frame_size = max_data_frame_size

        self._buffer = bytearray()
        self._failed = False
        # One compression context per direction for the whole session.
        self._deflater = zlib.compressobj(
            _DEFLATE_LEVEL, zlib.DEFLATED, _DEFLATE_WBITS, _DEFLATE_MEMLEVEL, zdict=SPDY_DICTIONARY
        )
        self._inflater = zlib.decompressobj(zdict=SPDY_DICTIONARY)

        self._streams: dict[int, _Stream] = {}
        self._next_stream_id = 2 if is_server else 1
        self._last_peer_stream_id = 0
        self._goaway_sent = False
        self._goaway_received = False
        self._peer_uses_flow_control = False

        # Windows.  "send" is credit the peer gave us; "recv" is credit we
        # gave the peer.  The stream initial windows follow SETTINGS; the
        # session windows start at 64 KiB and only move by WINDOW_UPDATE.
        self._peer_initial_window = DEFAULT_INITIAL_WINDOW_SIZE
        self._local_initial_window = DEFAULT_INITIAL_WINDOW_SIZE
        self._session_send_window = DEFAULT_INITIAL_WINDOW_SIZE
        self._session_recv_window = DEFAULT_INITIAL_WINDOW_SIZE
        self._session_unacked = 0

    # -- Introspection ---------------------------------------------------------

    @property
    def is_server(self) -> bool:
        """Whether this is the accepting side."""
        return self._is_server

    @property
    def next_stream_id(self) -> int:
        """The smallest id :meth:`syn_stream` accepts now."""
        return self._next_stream_id

    @property
    def last_peer_stream_id(self) -> int:
        """Highest stream id the peer opened, 0 if none: the id for :meth:`goaway`."""
        return self._last_peer_stream_id

    @property
    def peer_uses_flow_control(self) -> bool:
        """Whether the peer has shown it does SPDY/3.1 flow control.

        True once it sent a WINDOW_UPDATE or a SETTINGS INITIAL_WINDOW_SIZE.
        spdystream (kubectl, kubelet) never does either, and it never grants
        credit, so a sender must only wait on :meth:`send_window` when this is
        true, or it waits forever.
        """
        return self._peer_uses_flow_control

    @property
    def goaway_received(self) -> bool:
        """Whether the peer sent GOAWAY; :meth:`syn_stream` is then refused."""
        return self._goaway_received

    def open_stream_ids(self) -> list[int]:
        """Ids of the streams not yet closed in both directions."""
        return sorted(self._streams)

    def send_window(self, stream_id: int) -> int:
        """Return how many DATA bytes the peer's windows allow on a stream now.

        This is the smaller of the stream's window and the session window
        (``stream_id`` 0 gives the session window alone).  It can be zero or
        negative.  The connection does not enforce it: :meth:`data` encodes
        whatever it is given, because the Go peer never grants credit (see
        :attr:`peer_uses_flow_control`).

        Args:
            stream_id: The stream, or 0.

        Returns:
            The allowance in bytes; 0 for a stream we cannot send on.
        """
        if stream_id == 0:
            return self._session_send_window
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            return 0
        return min(stream.send_window, self._session_send_window)

    # -- Input -----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse received bytes into events.

        Input may be split anywhere; an incomplete frame waits in a buffer for
        the rest.  Unknown control frame types are skipped.

        Args:
            data: Bytes read from the transport (``b""`` at EOF is harmless).

        Returns:
            The events of every frame completed by ``data``, in wire order.

        Raises:
            SpdyProtocolError: A session error.  The events of earlier frames
                in the same call are lost with the session.
        """
        if self._failed:
            raise SpdyProtocolError("the session already failed")
        buf = self._buffer
        buf += data
        events: list[Event] = []
        pos = 0
        try:
            while len(buf) - pos >= _HEADER_SIZE:
                word, flags_length = _FRAME_HEADER.unpack_from(buf, pos)
                # Check what the header alone can tell before waiting for up
                # to 16 MiB of payload: a wrong version or DATA on stream 0
                # (e.g. zeroed or misaligned input) fails at once.
                if word & _CONTROL_BIT:
                    version = (word >> 16) & 0x7FFF
                    if version != SPDY_VERSION:
                        raise SpdyProtocolError(f"unsupported SPDY version {version}")
                elif word & _ID_MASK == 0:
                    raise SpdyProtocolError("DATA frame on stream 0")
                end = pos + _HEADER_SIZE + (flags_length & 0xFFFFFF)
                if len(buf) < end:
                    break
                payload = bytes(buf[pos + _HEADER_SIZE : end])
                pos = end
                flags = flags_length >> 24
                if word & _CONTROL_BIT:
                    self._on_control(word & 0xFFFF, flags, payload, events)
                else:
                    self._on_data(word & _ID_MASK, flags, payload, events)
        except SpdyProtocolError:
            self._failed = True
            raise
        finally:
            del buf[:pos]
        return events

    def _on_control(self, frame_type: int, flags: int, payload: bytes, events: list[Event]) -> None:
        match frame_type:
            case FrameType.SYN_STREAM:
                self._on_syn_stream(flags, payload, events)
            case FrameType.SYN_REPLY | FrameType.HEADERS:
                self._on_reply_or_headers(frame_type, flags, payload, events)
            case FrameType.RST_STREAM:
                self._on_rst_stream(payload, events)
            case FrameType.SETTINGS:
                self._on_settings(flags, payload, events)
            case FrameType.PING:
                _expect_length("PING", payload, 4)
                (ping_id,) = _U32.unpack(payload)
                peer_parity = 1 if self._is_server else 0
                events.append(Ping(ping_id, needs_reply=ping_id % 2 == peer_parity))
            case FrameType.GOAWAY:
                _expect_length("GOAWAY", payload, 8)
                last_good, status = struct.unpack(">II", payload)
                self._goaway_received = True
                events.append(GoAway(last_good & _ID_MASK, status))
            case FrameType.WINDOW_UPDATE:
                self._on_window_update(payload, events)
            case _:
                # Section 2.2.1 gives every control frame a length, so an
                # unknown type (NOOP from SPDY/2, CREDENTIAL from SPDY/3,
                # anything newer) can be skipped without losing sync.
                pass

    def _inflate(self, block: bytes) -> bytes:
        """Inflate one header block through the session's shared zlib stream.

        Every block must go through here, even one whose frame is otherwise
        rejected, or the next block will not inflate (section 2.4.1).
        """
        limit = self._max_header_block_size
        try:
            raw = self._inflater.decompress(block, limit + 1)
        except zlib.error as exc:
            raise SpdyProtocolError(f"cannot inflate header block: {exc}") from exc
        if len(raw) > limit or self._inflater.unconsumed_tail:
            # The rest of the block stays un-inflated, so the shared zlib
            # state is lost: a session error, as FRAME_TOO_LARGE's note in
            # section 2.6.3 says.
            raise SpdyProtocolError(f"header block inflates beyond {limit} bytes")
        if self._inflater.eof:
            raise SpdyProtocolError("peer ended the header compression stream")
        return raw

    def _headers_or_error(
        self, stream_id: int, block: bytes, events: list[Event]
    ) -> HeaderList | None:
        raw = self._inflate(block)
        try:
            return _decode_header_block(raw)
        except _BadHeaderBlock as exc:
            events.append(StreamError(stream_id, RstStatus.PROTOCOL_ERROR, str(exc)))
            return None

    def _is_peer_id(self, stream_id: int) -> bool:
        # Clients open odd streams, servers even ones (section 2.3.2).
        return stream_id % 2 == (1 if self._is_server else 0)

    def _ever_opened(self, stream_id: int) -> bool:
        if self._is_peer_id(stream_id):
            return stream_id <= self._last_peer_stream_id
        return stream_id < self._next_stream_id

    def _unknown_stream(self, stream_id: int, what: str, events: list[Event]) -> None:
        # A frame for a stream that is not open.  If it never existed the
        # peer is confused (INVALID_STREAM, section 2.2.2); if it closed, the
        # frame was in flight and is dropped.
        if not self._ever_opened(stream_id):
            events.append(
                StreamError(
                    stream_id, RstStatus.INVALID_STREAM, f"{what} for a stream never opened"
                )
            )

    def _on_syn_stream(self, flags: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) < 10:
            raise SpdyProtocolError(f"SYN_STREAM of {len(payload)} bytes, need at least 10")
        stream_id, associated = struct.unpack_from(">II", payload)
        stream_id &= _ID_MASK
        priority = payload[8] >> 5
        headers = self._headers_or_error(stream_id, payload[10:], events)
        fin = bool(flags & _FLAG_FIN)
        unidirectional = bool(flags & _FLAG_UNIDIRECTIONAL)
        if stream_id == 0:
            raise SpdyProtocolError("SYN_STREAM for stream 0")
        if not self._is_peer_id(stream_id):
            if headers is not None:
                events.append(
                    StreamError(stream_id, RstStatus.PROTOCOL_ERROR, "stream id has our parity")
                )
            return
        if stream_id < self._last_peer_stream_id:
            # Section 2.3.2: "MUST issue a session error".
            raise SpdyProtocolError(
                f"SYN_STREAM {stream_id} after {self._last_peer_stream_id}: ids must increase"
            )
        if stream_id == self._last_peer_stream_id:
            if headers is not None:
                events.append(
                    StreamError(
                        stream_id, RstStatus.PROTOCOL_ERROR, "second SYN_STREAM for the stream"
                    )
                )
            return
        self._last_peer_stream_id = stream_id
        if headers is None or self._goaway_sent:
            # Section 2.6.6: after GOAWAY, new streams are ignored.
            return
        self._streams[stream_id] = _Stream(
            peer_initiated=True,
            send_window=self._peer_initial_window,
            recv_window=self._local_initial_window,
            local_open=not unidirectional,
            remote_open=not fin,
        )
        self._forget_if_closed(stream_id)
        events.append(
            SynStream(
                stream_id,
                headers,
                fin=fin,
                associated_id=associated & _ID_MASK,
                priority=priority,
                unidirectional=unidirectional,
            )
        )

    def _on_reply_or_headers(
        self, frame_type: int, flags: int, payload: bytes, events: list[Event]
    ) -> None:
        name = FrameType(frame_type).name
        if len(payload) < 4:
            raise SpdyProtocolError(f"{name} of {len(payload)} bytes, need at least 4")
        stream_id = _U32.unpack_from(payload)[0] & _ID_MASK
        headers = self._headers_or_error(stream_id, payload[4:], events)
        if stream_id == 0:
            raise SpdyProtocolError(f"{name} for stream 0")
        if headers is None:
            return
        fin = bool(flags & _FLAG_FIN)
        stream = self._streams.get(stream_id)
        if stream is None:
            self._unknown_stream(stream_id, name, events)
            return
        if frame_type == FrameType.SYN_REPLY:
            if stream.peer_initiated:
                events.append(
                    StreamError(
                        stream_id, RstStatus.PROTOCOL_ERROR, "SYN_REPLY for the peer's stream"
                    )
                )
                return
            if stream.replied:
                # Section 2.6.2: a second SYN_REPLY is STREAM_IN_USE.
                events.append(StreamError(stream_id, RstStatus.STREAM_IN_USE, "second SYN_REPLY"))
                return
            stream.replied = True
        elif not stream.remote_open:
            events.append(
                StreamError(stream_id, RstStatus.STREAM_ALREADY_CLOSED, "HEADERS after FIN")
            )
            return
        event_type = SynReply if frame_type == FrameType.SYN_REPLY else Headers
        if fin:
            stream.remote_open = False
            self._forget_if_closed(stream_id)
        events.append(event_type(stream_id, headers, fin=fin))

    def _on_data(self, stream_id: int, flags: int, payload: bytes, events: list[Event]) -> None:
        size = len(payload)
        # The session window counts every DATA byte, delivered or not.
        self._session_recv_window -= size
        stream = self._streams.get(stream_id)
        error: StreamError | None = None
        if stream is None:
            self._unknown_stream(stream_id, "DATA", events)
        elif not stream.remote_open:
            # Section 2.3.6.
            error = StreamError(stream_id, RstStatus.STREAM_ALREADY_CLOSED, "DATA after FIN")
        elif not stream.peer_initiated and not stream.replied:
            # Section 2.2.2: DATA on our stream before its SYN_REPLY.
            error = StreamError(stream_id, RstStatus.PROTOCOL_ERROR, "DATA before SYN_REPLY")
        elif flags & _FLAG_DATA_COMPRESS:
            error = StreamError(stream_id, RstStatus.PROTOCOL_ERROR, "compressed DATA unsupported")
        if stream is None or error is not None:
            # Nobody will acknowledge these bytes, so return the session
            # credit ourselves with the next WINDOW_UPDATE.
            self._session_unacked += size
            if error is not None:
                events.append(error)
            return
        # A peer overrunning the window is tolerated: spdystream sends without
        # looking at windows, and punishing it would break every kubectl cp.
        stream.recv_window -= size
        fin = bool(flags & _FLAG_FIN)
        if fin:
            stream.remote_open = False
            self._forget_if_closed(stream_id)
        events.append(Data(stream_id, payload, fin=fin))

    def _on_rst_stream(self, payload: bytes, events: list[Event]) -> None:
        _expect_length("RST_STREAM", payload, 8)
        stream_id, status = struct.unpack(">II", payload)
        stream_id &= _ID_MASK
        if stream_id == 0:
            raise SpdyProtocolError("RST_STREAM for stream 0")
        if status == 0:
            raise SpdyProtocolError("RST_STREAM with status 0")
        self._streams.pop(stream_id, None)
        events.append(RstStream(stream_id, status))

    def _on_settings(self, flags: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) < 4:
            raise SpdyProtocolError(f"SETTINGS of {len(payload)} bytes, need at least 4")
        (count,) = _U32.unpack_from(payload)
        if len(payload) != 4 + 8 * count:
            raise SpdyProtocolError(f"SETTINGS of {len(payload)} bytes for {count} entries")
        entries: list[SettingsEntry] = []
        for offset in range(4, len(payload), 8):
            flags_id, value = struct.unpack_from(">II", payload, offset)
            entries.append(SettingsEntry(flags_id & 0xFFFFFF, value, flags_id >> 24))
        event = Settings(tuple(entries), clear=bool(flags & _FLAG_SETTINGS_CLEAR))
        initial = event.get(SettingsId.INITIAL_WINDOW_SIZE)
        if initial is not None:
            if initial > MAX_WINDOW_SIZE:
                raise SpdyProtocolError(f"INITIAL_WINDOW_SIZE {initial} exceeds 2^31-1")
            # Section 2.6.8: a new initial window shifts every open stream's
            # window by the difference, possibly below zero.
            delta = initial - self._peer_initial_window
            self._peer_initial_window = initial
            for stream in self._streams.values():
                stream.send_window += delta
            self._peer_uses_flow_control = True
        events.append(event)

    def _on_window_update(self, payload: bytes, events: list[Event]) -> None:
        _expect_length("WINDOW_UPDATE", payload, 8)
        stream_id, delta = struct.unpack(">II", payload)
        stream_id &= _ID_MASK
        delta &= _ID_MASK
        self._peer_uses_flow_control = True
        if stream_id == 0:
            self._session_send_window += delta
            if self._session_send_window > MAX_WINDOW_SIZE:
                raise SpdyProtocolError("session window exceeds 2^31-1")
        else:
            stream = self._streams.get(stream_id)
            # Section 2.6.8: after our FIN, WINDOW_UPDATEs are ignored.
            if stream is not None and stream.local_open:
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW_SIZE:
                    events.append(
                        StreamError(
                            stream_id, RstStatus.FLOW_CONTROL_ERROR, "window exceeds 2^31-1"
                        )
                    )
                    return
        events.append(WindowUpdate(stream_id, delta))

    def _forget_if_closed(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and not stream.local_open and not stream.remote_open:
            del self._streams[stream_id]

    # -- Output ----------------------------------------------------------------

    def _deflate(self, headers: HeadersLike) -> bytes:
        raw = _encode_header_block(headers)
        # Checked before compressing: once bytes enter the deflater they are
        # part of the shared stream, and refusing to send them afterwards
        # would desynchronise the peer's inflater.
        limit = min(self._max_header_block_size, _MAX_SENDABLE_HEADER_BLOCK)
        if len(raw) > limit:
            raise ValueError(f"header block of {len(raw)} bytes exceeds {limit}")
        # One SYNC_FLUSH per block (section 2.6.10.1) so the peer can inflate
        # it whole; the stream itself is never finished.
        return self._deflater.compress(raw) + self._deflater.flush(zlib.Z_SYNC_FLUSH)

    def syn_stream(
        self,
        stream_id: int,
        headers: HeadersLike,
        *,
        fin: bool = False,
        unidirectional: bool = False,
        priority: int = 0,
        associated_id: int = 0,
    ) -> bytes:
        """Open a stream (SYN_STREAM, section 2.6.1).

        Args:
            stream_id: At least :attr:`next_stream_id`, with our parity.
            headers: The stream's headers.
            fin: Send nothing after the headers.
            unidirectional: The peer may not send on the stream.
            priority: 0 (highest) to 7.
            associated_id: The stream this one belongs to, or 0.

        Returns:
            The frame.

        Raises:
            ValueError: An argument is out of range or a header is invalid.
            SpdyStateError: The peer sent GOAWAY.
        """
        if self._goaway_received:
            raise SpdyStateError("the peer sent GOAWAY; no new streams")
        if stream_id % 2 != self._next_stream_id % 2:
            parity = "even" if self._is_server else "odd"
            raise ValueError(f"stream id {stream_id}: a {self._role()} opens {parity} ids")
        if not self._next_stream_id <= stream_id <= MAX_STREAM_ID:
            raise ValueError(f"stream id {stream_id} must be in {self._next_stream_id}..2^31-1")
        if not 0 <= priority <= 7:
            raise ValueError(f"priority {priority} must be in 0..7")
        _check_id("associated_id", associated_id, allow_zero=True)
        block = self._deflate(headers)
        flags = (_FLAG_FIN if fin else 0) | (_FLAG_UNIDIRECTIONAL if unidirectional else 0)
        # The slot byte (a CREDENTIAL index, gone in 3.1) is always 0.
        body = struct.pack(">IIBB", stream_id, associated_id, priority << 5, 0) + block
        self._next_stream_id = stream_id + 2
        self._streams[stream_id] = _Stream(
            peer_initiated=False,
            send_window=self._peer_initial_window,
            recv_window=self._local_initial_window,
            local_open=not fin,
            remote_open=not unidirectional,
        )
        self._forget_if_closed(stream_id)
        return _control_frame(FrameType.SYN_STREAM, flags, body)

    def syn_reply(self, stream_id: int, headers: HeadersLike, fin: bool = False) -> bytes:
        """Accept a stream the peer opened (SYN_REPLY, section 2.6.2).

        Args:
            stream_id: A stream from a :class:`SynStream` event.
            headers: The reply headers (Kubernetes sends none).
            fin: Send nothing after the reply.

        Returns:
            The frame.

        Raises:
            ValueError: A header is invalid.
            SpdyStateError: The stream is not the peer's, is closed for
                sending, or was already replied to.
        """
        stream = self._sendable(stream_id)
        if not stream.peer_initiated:
            raise SpdyStateError(f"stream {stream_id} is ours; only the peer replies to it")
        if stream.replied:
            raise SpdyStateError(f"stream {stream_id} was already replied to")
        block = self._deflate(headers)
        stream.replied = True
        self._local_fin(stream_id, stream, fin)
        return _control_frame(
            FrameType.SYN_REPLY, _FLAG_FIN if fin else 0, _U32.pack(stream_id) + block
        )

    def headers(self, stream_id: int, headers: HeadersLike, fin: bool = False) -> bytes:
        """Send more headers on a stream (HEADERS, section 2.6.7).

        Args:
            stream_id: A stream open for sending.
            headers: The headers.
            fin: Close our side of the stream after them.

        Returns:
            The frame.

        Raises:
            ValueError: A header is invalid.
            SpdyStateError: The stream is closed for sending.
        """
        stream = self._sendable(stream_id)
        block = self._deflate(headers)
        self._local_fin(stream_id, stream, fin)
        return _control_frame(
            FrameType.HEADERS, _FLAG_FIN if fin else 0, _U32.pack(stream_id) + block
        )

    def data(
        self, stream_id: int, payload: bytes | bytearray | memoryview, fin: bool = False
    ) -> bytes:
        """Send payload on a stream, split into DATA frames (section 2.2.2).

        Frames carry at most ``max_data_frame_size`` bytes and only the last
        has FIN.  An empty payload gives one empty FIN frame, or nothing
        without ``fin``.  The send windows are charged but not enforced (see
        :meth:`send_window`).

        Args:
            stream_id: An open stream.
            payload: The bytes.
            fin: Close our side of the stream after them.

        Returns:
            The frames, concatenated.

        Raises:
            SpdyStateError: The stream is closed for sending, or it is the
                peer's and we have not sent SYN_REPLY yet.
        """
        stream = self._sendable(stream_id)
        if stream.peer_initiated and not stream.replied:
            # The creator drops (spdystream) or rejects (section 2.2.2) DATA
            # that arrives before the SYN_REPLY.
            raise SpdyStateError(f"stream {stream_id}: send SYN_REPLY before DATA")
        view = memoryview(payload).cast("B")
        size = len(view)
        if size == 0 and not fin:
            return b""
        out = bytearray()
        chunk = self._max_data_frame_size
        for offset in range(0, max(size, 1), chunk):
            piece = view[offset : offset + chunk]
            last = offset + chunk >= size
            out += _FRAME_HEADER.pack(
                stream_id, ((_FLAG_FIN if fin and last else 0) << 24) | len(piece)
            )
            out += piece
        stream.send_window -= size
        self._session_send_window -= size
        self._local_fin(stream_id, stream, fin)
        return bytes(out)

    def rst_stream(self, stream_id: int, status: int) -> bytes:
        """Abort a stream (RST_STREAM, section 2.6.3); allowed in any state.

        Args:
            stream_id: The stream, open or not.
            status: A :class:`RstStatus` value (0 is invalid).

        Returns:
            The frame.

        Raises:
            ValueError: An argument is out of range.
        """
        _check_id("stream_id", stream_id)
        if not 1 <= status <= _U32_MAX:
            raise ValueError(f"RST_STREAM status {status} must be in 1..2^32-1")
        self._streams.pop(stream_id, None)
        return _control_frame(FrameType.RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def settings(
        self,
        entries: Iterable[SettingsEntry] | Mapping[SettingsId, int] | Mapping[int, int],
        *,
        clear: bool = False,
    ) -> bytes:
        """Send SETTINGS (section 2.6.4).

        INITIAL_WINDOW_SIZE also resizes our receive windows, so the
        bookkeeping behind :meth:`acknowledge_received` matches what the peer
        will assume.

        Args:
            entries: Entries, or a mapping of setting id to value.
            clear: Set FLAG_SETTINGS_CLEAR_SETTINGS.

        Returns:
            The frame, entries sorted by id as section 2.6.4 asks.

        Raises:
            ValueError: An id or value is out of range, or an id repeats.
        """
        if isinstance(entries, Mapping):
            items = [SettingsEntry(k, v) for k, v in entries.items()]
        else:
            items = list(entries)
        items.sort(key=lambda e: e.setting_id)
        body = [_U32.pack(len(items))]
        seen: set[int] = set()
        for entry in items:
            if not 0 <= entry.setting_id <= 0xFFFFFF or entry.setting_id in seen:
                raise ValueError(f"setting id {entry.setting_id} is out of range or repeated")
            if not 0 <= entry.value <= _U32_MAX or not 0 <= entry.flags <= 0xFF:
                raise ValueError(f"setting {entry.setting_id}: value or flags out of range")
            seen.add(entry.setting_id)
            body.append(struct.pack(">II", entry.flags << 24 | entry.setting_id, entry.value))
        for entry in items:
            if entry.setting_id == SettingsId.INITIAL_WINDOW_SIZE:
                if entry.value > MAX_WINDOW_SIZE:
                    raise ValueError("INITIAL_WINDOW_SIZE must be at most 2^31-1")
                delta = entry.value - self._local_initial_window
                self._local_initial_window = entry.value
                for stream in self._streams.values():
                    stream.recv_window += delta
        return _control_frame(
            FrameType.SETTINGS, _FLAG_SETTINGS_CLEAR if clear else 0, b"".join(body)
        )

    def ping(self, ping_id: int) -> bytes:
        """Send a PING, or echo one whose event had ``needs_reply`` (section 2.6.5).

        Args:
            ping_id: Our parity for a new ping (odd for a client, even for a
                server), or the id of the ping being echoed.

        Returns:
            The frame.

        Raises:
            ValueError: ``ping_id`` is not in 1..2^32-1 (Go rejects 0).
        """
        if not 1 <= ping_id <= _U32_MAX:
            raise ValueError(f"ping id {ping_id} must be in 1..2^32-1")
        return _control_frame(FrameType.PING, 0, _U32.pack(ping_id))

    def goaway(self, last_good_stream_id: int, status: int = GoAwayStatus.OK) -> bytes:
        """Refuse new streams from now on (GOAWAY, section 2.6.6).

        Later SYN_STREAMs from the peer are dropped without an event.

        Args:
            last_good_stream_id: Usually :attr:`last_peer_stream_id`.
            status: A :class:`GoAwayStatus` value.

        Returns:
            The frame.

        Raises:
            ValueError: An argument is out of range.
        """
        _check_id("last_good_stream_id", last_good_stream_id, allow_zero=True)
        if not 0 <= status <= _U32_MAX:
            raise ValueError(f"GOAWAY status {status} must be in 0..2^32-1")
        self._goaway_sent = True
        return _control_frame(FrameType.GOAWAY, 0, struct.pack(">II", last_good_stream_id, status))

    def window_update(self, stream_id: int, delta: int) -> bytes:
        """Grant the peer ``delta`` more bytes by hand (WINDOW_UPDATE, section 2.6.8).

        :meth:`acknowledge_received` does this automatically; this is for
        callers that manage windows themselves, e.g. to open a large session
        window up front.

        Args:
            stream_id: The stream, or 0 for the session window.
            delta: 1..2^31-1.

        Returns:
            The frame.

        Raises:
            ValueError: An argument is out of range.
        """
        _check_id("stream_id", stream_id, allow_zero=True)
        if not 1 <= delta <= MAX_WINDOW_SIZE:
            raise ValueError(f"window delta {delta} must be in 1..2^31-1")
        if stream_id == 0:
            self._session_recv_window += delta
        elif (stream := self._streams.get(stream_id)) is not None:
            stream.recv_window += delta
        return _window_update_frame(stream_id, delta)

    def acknowledge_received(self, stream_id: int, n: int) -> bytes:
        """Report that the application consumed ``n`` bytes of a Data event.

        Credit is returned in batches: a WINDOW_UPDATE goes out once half a
        window has been consumed, for the stream and for the session
        separately.  That keeps a flow-controlling peer streaming without a
        frame per read.  The stream update is skipped once the peer has sent
        FIN (section 2.6.8); the session one never is.

        Args:
            stream_id: The Data event's stream, even if it has closed since.
            n: Bytes consumed.

        Returns:
            Zero, one or two WINDOW_UPDATE frames, or ``b""``.

        Raises:
            ValueError: ``n`` is negative.
        """
        if n < 0:
            raise ValueError(f"cannot acknowledge {n} bytes")
        out = bytearray()
        stream = self._streams.get(stream_id)
        if stream is not None and stream.remote_open:
            stream.unacked += n
            if stream.unacked and stream.unacked >= self._local_initial_window // 2:
                while stream.unacked:
                    delta = min(stream.unacked, MAX_WINDOW_SIZE)
                    out += _window_update_frame(stream_id, delta)
                    stream.recv_window += delta
                    stream.unacked -= delta
        self._session_unacked += n
        if self._session_unacked >= DEFAULT_INITIAL_WINDOW_SIZE // 2:
            while self._session_unacked:
                delta = min(self._session_unacked, MAX_WINDOW_SIZE)
                out += _window_update_frame(0, delta)
                self._session_recv_window += delta
                self._session_unacked -= delta
        return bytes(out)

    # -- Helpers ---------------------------------------------------------------

    def _role(self) -> str:
        return "server" if self._is_server else "client"

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise SpdyStateError(f"stream {stream_id} is closed for sending")
        return stream

    def _local_fin(self, stream_id: int, stream: _Stream, fin: bool) -> None:
        if fin:
            stream.local_open = False
            self._forget_if_closed(stream_id)


def _control_frame(frame_type: FrameType, flags: int, body: bytes) -> bytes:
    if len(body) > MAX_FRAME_LENGTH:
        raise ValueError(f"{frame_type.name} body of {len(body)} bytes exceeds 2^24-1")
    return struct.pack(">HHI", 0x8000 | SPDY_VERSION, frame_type, flags << 24 | len(body)) + body


def _window_update_frame(stream_id: int, delta: int) -> bytes:
    return _control_frame(FrameType.WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))


def _expect_length(name: str, payload: bytes, length: int) -> None:
    if len(payload) != length:
        raise SpdyProtocolError(f"{name} of {len(payload)} bytes, must be {length}")


def _check_id(what: str, value: int, *, allow_zero: bool = False) -> None:
    if not (0 if allow_zero else 1) <= value <= MAX_STREAM_ID:
        raise ValueError(f"{what} {value} is not a valid stream id")
