"""Wire formats of the KV transfer layer, versioned and encoded with msgpack (never pickle).

Owns ``KvTransferParams`` (what the prefill side hands the decode side, through the
router or the control plane, so that the decode side can pull) and the small messages
peers exchange over a transport: hello / read / control and their replies.

Every encoded message is a msgpack map with ``"v"`` (the wire version) and ``"t"`` (the
message type). Decoding checks both and every field's type, and raises
``KVTransferError`` naming what is wrong. This module must not open connections or
touch tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import msgpack

from splitserve.errors import KVTransferError

WIRE_VERSION = 4
"""Version of every message below; a peer that speaks another version is refused.
2: the per-transfer ``secret`` in params, reads and controls. 3: zero-copy reads (``runs``).
4: layer-wise streamed transfers (``stream_layers`` in params, ``checksums`` in replies)."""

SECRET_HEX_CHARS = 32
"""A transfer secret: 128 random bits as lowercase hex."""

T = TypeVar("T", bound="WireMessage")


@dataclasses.dataclass(frozen=True)
class WireMessage:
    """Base of every wire message: a frozen dataclass of msgpack-native fields."""

    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"v": WIRE_VERSION, "t": self.TYPE, **dataclasses.asdict(self)}

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        _check_header(data, cls.TYPE)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = data[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KVTransferError(f"malformed {cls.TYPE} message: missing field {f.name!r}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise KVTransferError(f"malformed {cls.TYPE} message: {e}") from e

    @classmethod
    def decode(cls: type[T], payload: bytes | bytearray | memoryview) -> T:
        return cls.from_dict(_unpack(payload))


def _unpack(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        data = msgpack.unpackb(bytes(payload), raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise KVTransferError(f"undecodable KV transfer message: {e}") from e
    if not isinstance(data, dict):
        raise KVTransferError(f"KV transfer message must be a map, got {type(data).__name__}")
    return data


def _check_header(data: Mapping[str, Any], expected_type: str) -> None:
    version = data.get("v")
    if version != WIRE_VERSION:
        raise KVTransferError(
            f"unsupported KV transfer wire version {version!r} (this side speaks {WIRE_VERSION})"
        )
    if data.get("t") != expected_type:
        raise KVTransferError(f"expected a {expected_type!r} message, got {data.get('t')!r}")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_secret(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == SECRET_HEX_CHARS
        and all(c in "0123456789abcdef" for c in value)
    )


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) for x in value)


@dataclasses.dataclass(frozen=True)
class KvTransferParams(WireMessage):
    """What a decode worker needs to pull one request's KV from a prefill worker."""

    TYPE: ClassVar[str] = "params"
    request_id: str
    """The request whose KV this is."""
    engine_id: str
    """Identity of the prefill engine holding the blocks."""
    address: str
    """Where that engine's transport listens: ``ucx://host:port`` or ``loopback://name``."""
    block_ids: list[int]
    """The prefill side's block ids, in token order."""
    num_tokens: int
    """Tokens whose KV the blocks hold (the last block may be partial)."""
    lease_id: int
    """Lease under which the prefill side holds the blocks; every read and heartbeat names it."""
    lease_ttl_s: float
    """Lease duration; the decode side renews it by heartbeats well before it runs out."""
    checksums: list[list[int]]
    """``checksums[layer][i]``: checksum of ``block_ids[i]`` in ``layer`` (layout.py)."""
    compat_hash: int
    """``KvLayout.compatibility_hash()`` of the prefill side."""
    secret: str = dataclasses.field(repr=False)
    """The transfer's 128-bit random secret (hex): every read and control must present it.
    Travels only inside these params (router / control plane), never printed."""
    stream_layers: int = 0
    """> 0: a layer-wise streamed transfer, offered before the prefill forward that computes
    the KV ran: reads go in groups of this many layers, the serving side answers each once
    its layers are computed, and the group's checksums come with its reply (``checksums``
    is then empty). 0: the KV was complete when offered."""
    num_stream_layers: int = 0
    """Layers of a streamed transfer (``checksums`` carries them otherwise)."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.request_id, str) and bool(self.request_id),
            "request_id must be a non-empty string",
        )
        _require(
            isinstance(self.stream_layers, int) and self.stream_layers >= 0,
            f"stream_layers must be an int >= 0, got {self.stream_layers!r}",
        )
        if self.stream_layers:
            _require(
                isinstance(self.num_stream_layers, int) and self.num_stream_layers > 0,
                "a streamed transfer needs num_stream_layers > 0",
            )
            _require(self.checksums == [], "a streamed transfer's checksums come per read")
        _require(_is_secret(self.secret), "secret must be 32 lowercase hex characters")
        _require(
            isinstance(self.address, str) and "://" in self.address,
            f"address must look like scheme://where, got {self.address!r}",
        )
        _require(
            _is_int_list(self.block_ids) and len(self.block_ids) > 0,
            "block_ids must be a non-empty list of ints",
        )
        _require(
            isinstance(self.num_tokens, int) and self.num_tokens > 0,
            f"num_tokens must be a positive int, got {self.num_tokens!r}",
        )
        _require(
            isinstance(self.lease_ttl_s, int | float) and self.lease_ttl_s > 0,
            f"lease_ttl_s must be > 0, got {self.lease_ttl_s!r}",
        )
        _require(
            isinstance(self.checksums, list)
            and (len(self.checksums) > 0 or self.stream_layers > 0)
            and all(
                _is_int_list(row) and len(row) == len(self.block_ids) for row in self.checksums
            ),
            "checksums must be one list per layer with one int per block",
        )

    @property
    def num_layers(self) -> int:
        return self.num_stream_layers if self.stream_layers else len(self.checksums)

    @classmethod
    def decode_any(cls, payload: bytes | Mapping[str, Any]) -> KvTransferParams:
        """From encoded bytes or from ``to_dict()`` (as carried inside a Ray or JSON payload)."""
        if isinstance(payload, Mapping):
            return cls.from_dict(payload)
        return cls.decode(payload)


@dataclasses.dataclass(frozen=True)
class Hello(WireMessage):
    """First message on a new connection: the connecting side's layout."""

    TYPE: ClassVar[str] = "hello"
    engine_id: str
    layout: dict[str, Any]
    compat_hash: int
    data_address: bytes = b""
    """Transport-specific address for a separate bulk-data lane (UCX worker address), or empty."""


@dataclasses.dataclass(frozen=True)
class ReadRequest(WireMessage):
    """Ask the serving side for some layers of some of a request's leased blocks."""

    TYPE: ClassVar[str] = "read"
    xfer_id: int
    """Correlates the reply and tags the data message; unique per connection."""
    request_id: str
    lease_id: int
    block_ids: list[int]
    """Serving side's block ids, a subset of the leased ones."""
    layer_start: int
    layer_end: int
    secret: str = dataclasses.field(repr=False)
    """The transfer's secret from its ``KvTransferParams``; the server refuses a wrong one."""
    data_tag: int = 0
    """Non-zero: send the data on the bulk-data lane under this tag (see ``Hello``)."""
    runs: list[int] = dataclasses.field(default_factory=list)
    """Non-empty: a zero-copy read of every layer. ``block_ids`` split into runs of these
    lengths, each run of consecutive serving-side ids; each run goes as one message straight
    from the serving side's block-major KV pool (``[n, num_layers, 2, block_size, heads,
    head_dim]`` bytes) into the reader's destination blocks. Empty: staged (``part_layers``)."""

    def __post_init__(self) -> None:
        _require(
            _is_int_list(self.block_ids) and len(self.block_ids) > 0,
            "block_ids must be a non-empty list of ints",
        )
        _require(
            _is_int_list(self.runs) and all(n > 0 for n in self.runs),
            "runs must be a list of positive ints",
        )
        _require(
            not self.runs or sum(self.runs) == len(self.block_ids),
            f"runs cover {sum(self.runs)} blocks, block_ids has {len(self.block_ids)}",
        )
        _require(
            0 <= self.layer_start < self.layer_end,
            f"need 0 <= layer_start < layer_end, got [{self.layer_start}, {self.layer_end})",
        )

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


CONTROL_KINDS = ("heartbeat", "release", "abort")


@dataclasses.dataclass(frozen=True)
class Control(WireMessage):
    """Lease control from the reading side: renew (heartbeat), release (done) or abort."""

    TYPE: ClassVar[str] = "control"
    xfer_id: int
    kind: str
    request_id: str
    lease_id: int
    secret: str = dataclasses.field(repr=False)
    """The transfer's secret from its ``KvTransferParams``; the server refuses a wrong one."""

    def __post_init__(self) -> None:
        _require(self.kind in CONTROL_KINDS, f"control kind must be one of {CONTROL_KINDS}")
        _require(isinstance(self.secret, str), "secret must be a string")


@dataclasses.dataclass(frozen=True)
class Reply(WireMessage):
    """Answer to hello, read or control. For a read, ``ok`` means the data message follows."""

    TYPE: ClassVar[str] = "reply"
    xfer_id: int
    ok: bool
    error: str = ""
    """Why not ok, in words."""
    code: str = ""
    """Machine-readable reason: ``layout`` (field in ``field``), ``lease``, ``aborted``,
    ``secret`` (refused: wrong transfer secret), ``bad``."""
    field: str = ""
    nbytes: int = 0
    """For a read: total size of the data that follows."""
    part_layers: int = 0
    """For a read: the data comes as one message per this many layers (0: one message).
    Part k lands in layers ``[k * part_layers, (k + 1) * part_layers)`` of the reader's
    staging buffer, under the read's tag plus k (see ucx_transport.py)."""
    checksums: list[list[int]] = dataclasses.field(default_factory=list)
    """For a read of a streamed transfer: ``[layer][i]`` checksums of the read's layers and
    blocks, computed when those layers were (empty otherwise: they came with the params)."""


MESSAGE_TYPES: dict[str, type[WireMessage]] = {
    m.TYPE: m for m in (KvTransferParams, Hello, ReadRequest, Control, Reply)
}


def decode_message(payload: bytes | bytearray | memoryview) -> WireMessage:
    """Decode any wire message by its ``"t"`` field."""
    data = _unpack(payload)
    cls = MESSAGE_TYPES.get(str(data.get("t")))
    if cls is None:
        raise KVTransferError(f"unknown KV transfer message type {data.get('t')!r}")
    return cls.from_dict(data)
