"""Wire formats: msgpack round trips, version checks, malformed input, no pickle."""

from __future__ import annotations

import msgpack
import pytest

from splitserve.errors import KVTransferError
from splitserve.kvtransfer.params import (
    WIRE_VERSION,
    Control,
    Hello,
    KvTransferParams,
    ReadRequest,
    Reply,
    decode_message,
)


def _params(**over: object) -> KvTransferParams:
    fields: dict = dict(
        request_id="r1",
        engine_id="prefill-0",
        address="ucx://10.0.0.1:4000",
        block_ids=[4, 9],
        num_tokens=20,
        lease_id=2**62 + 5,
        lease_ttl_s=30.0,
        checksums=[[2**64 - 1, 7], [1, 2]],
        compat_hash=2**63 + 1,
        secret="0123456789abcdef" * 2,
    )
    fields.update(over)
    return KvTransferParams(**fields)


def test_params_round_trip_bytes_and_dict() -> None:
    params = _params()
    payload = params.encode()
    assert isinstance(payload, bytes) and b"\x80\x04" not in payload[:2]  # not a pickle
    assert KvTransferParams.decode(payload) == params
    assert KvTransferParams.decode_any(params.to_dict()) == params
    assert decode_message(payload) == params
    assert params.num_layers == 2


@pytest.mark.parametrize(
    "message",
    [
        Hello(engine_id="d", layout={"model_id": "m"}, compat_hash=3),
        ReadRequest(
            xfer_id=1, request_id="r", lease_id=5, block_ids=[1, 2], layer_start=0, layer_end=3,
            secret="ab" * 16,
        ),
        Control(xfer_id=2, kind="heartbeat", request_id="r", lease_id=5, secret="ab" * 16),
        Reply(xfer_id=3, ok=False, error="gone", code="lease"),
    ],
)
def test_messages_round_trip(message: object) -> None:
    assert decode_message(message.encode()) == message  # type: ignore[attr-defined]


def test_version_and_type_are_checked() -> None:
    data = _params().to_dict()
    with pytest.raises(KVTransferError, match="wire version 99"):
        KvTransferParams.from_dict({**data, "v": 99})
    with pytest.raises(KVTransferError, match="expected a 'params'"):
        KvTransferParams.from_dict({**data, "t": "read"})
    with pytest.raises(KVTransferError, match="unknown KV transfer message type"):
        decode_message(msgpack.packb({"v": WIRE_VERSION, "t": "evil"}))


@pytest.mark.parametrize(
    "payload, match",
    [(b"\xc1", "undecodable"), (msgpack.packb([1, 2]), "must be a map")],
)
def test_garbage_is_refused(payload: bytes, match: str) -> None:
    with pytest.raises(KVTransferError, match=match):
        decode_message(payload)


def test_secret_is_required_well_formed_and_never_printed() -> None:
    data = _params().to_dict()
    del data["secret"]
    with pytest.raises(KVTransferError, match="missing field 'secret'"):
        KvTransferParams.from_dict(data)
    for bad in ("", "ab" * 8, "AB" * 16, "zz" * 16, 7):
        with pytest.raises(ValueError, match="secret"):
            _params(secret=bad)
    params = _params()
    assert params.secret not in repr(params)
    read = ReadRequest(xfer_id=1, request_id="r", lease_id=5, block_ids=[1], layer_start=0,
                       layer_end=1, secret=params.secret)
    assert params.secret not in repr(read)
    assert WIRE_VERSION == 4  # the secret (2), zero-copy runs (3), layer-wise streaming (4)


def test_missing_and_invalid_fields_are_named() -> None:
    data = _params().to_dict()
    del data["lease_id"]
    with pytest.raises(KVTransferError, match="missing field 'lease_id'"):
        KvTransferParams.from_dict(data)
    with pytest.raises(ValueError, match="checksums"):
        _params(checksums=[[1]])
    with pytest.raises(ValueError, match="address"):
        _params(address="10.0.0.1:4000")
    with pytest.raises(KVTransferError, match="block_ids"):
        KvTransferParams.from_dict({**_params().to_dict(), "block_ids": ["x", 1]})
    with pytest.raises(ValueError, match="control kind"):
        Control(xfer_id=1, kind="steal", request_id="r", lease_id=1, secret="")


def test_ucx_transport_finds_the_interface_of_its_host() -> None:
    from splitserve.kvtransfer.ucx_transport import _interface_of

    assert _interface_of("127.0.0.1") == "lo"
    assert _interface_of("localhost") == "lo"
    assert _interface_of("0.0.0.0") is None  # the wildcard: UCX keeps every interface
    assert _interface_of("203.0.113.77") is None  # not an address of this machine
