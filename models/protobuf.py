"""Just enough of the protobuf wire format to read and write small ONNX messages by hand.

The ``onnx`` package is not a dependency; two places need to touch ONNX bytes: the CenterFace
adapter retypes its graph inputs to dynamic shapes, and the memory meter builds a one-node
model to pay ONNX Runtime's one-time set-up before measuring.
"""

from __future__ import annotations


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``."""
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number: int, payload: int | bytes) -> bytes:
    """One field: an int as a varint (wire type 0), bytes as length-delimited (wire type 2)."""
    if isinstance(payload, int):
        return encode_varint(number << 3) + encode_varint(payload)
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def fields(buf: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, payload of a length-delimited field or b'', raw bytes) of a message."""
    out = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = decode_varint(buf, pos)
        number, wire = key >> 3, key & 7
        payload = b""
        if wire == 0:
            _, pos = decode_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = decode_varint(buf, pos)
            payload = buf[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        out.append((number, wire, payload, buf[start:pos]))
    return out
