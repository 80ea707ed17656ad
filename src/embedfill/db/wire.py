"""Bulk-write parameters in PostgreSQL's binary array format, built by numpy.

Dumping a list element by element costs microseconds per row in Python (and pgvector's
adapter builds an object per vector). For the one hot statement, the batch's ids,
fingerprints and vectors are instead encoded as whole binary arrays in a few numpy
calls; a pass-through dumper sends them with the right array type.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types import TypeInfo

INT8_OID, TEXT_OID, UUID_OID = 20, 25, 2950
INT8_ARRAY_OID, TEXT_ARRAY_OID, UUID_ARRAY_OID = 1016, 1009, 2951
_NULL = (-1).to_bytes(4, "big", signed=True)
_HEADER = np.dtype(
    [("ndim", ">i4"), ("flags", ">i4"), ("elem", ">u4"), ("size", ">i4"), ("lbound", ">i4")]
)


class Int8Array(bytes):
    __slots__ = ()


class TextArray(bytes):
    __slots__ = ()


class UuidArray(bytes):
    __slots__ = ()


class VectorArray(bytes):
    __slots__ = ()


def _header(elem_oid: int, n: int) -> bytes:
    return np.array([(1, 0, elem_oid, n, 1)], dtype=_HEADER).tobytes()


def int8_array(values: Sequence[Any]) -> Int8Array | None:
    """ids as int8[]; None when they are not all integers (then psycopg dumps them)."""
    if not all(type(v) is int for v in values):
        return None
    items = np.empty(len(values), dtype=[("len", ">i4"), ("v", ">i8")])
    items["len"] = 8
    try:
        items["v"] = values
    except OverflowError:
        return None
    return Int8Array(_header(INT8_OID, len(values)) + items.tobytes())


def uuid_array(values: Sequence[Any]) -> UuidArray:
    """uuid.UUID values or their 16 bytes (None: NULL) as uuid[]."""
    item = (16).to_bytes(4, "big")
    body = b"".join(
        _NULL if v is None else item + (v if type(v) is bytes else v.bytes) for v in values
    )
    return UuidArray(_header(UUID_OID, len(values)) + body)


def text_array(values: Sequence[str | None]) -> TextArray:
    """Strings (None: NULL) as text[]. A batch holds few distinct values (its tenants):
    each is encoded once."""
    encoded: dict[str | None, bytes] = {None: _NULL}
    parts = []
    for v in values:
        part = encoded.get(v)
        if part is None:
            data = v.encode("utf-8")  # type: ignore[union-attr]
            part = encoded[v] = len(data).to_bytes(4, "big") + data
        parts.append(part)
    return TextArray(_header(TEXT_OID, len(values)) + b"".join(parts))


def vector_array(
    vectors: Sequence[npt.NDArray[np.float32]], vector_oid: int, *, half: bool = False
) -> VectorArray:
    """Vectors as pgvector vector[] (``half``: halfvec[]): each element int16 dim, int16 0,
    then float4s (float2s), big-endian."""
    matrix = np.asarray(vectors, dtype=np.float32)
    n, dims = matrix.shape
    width = 2 if half else 4
    items = np.empty(
        n,
        dtype=[("len", ">i4"), ("dim", ">u2"), ("unused", ">u2"), ("v", f">f{width}", (dims,))],
    )
    items["len"] = 4 + width * dims
    items["dim"] = dims
    items["unused"] = 0
    items["v"] = matrix
    return VectorArray(_header(vector_oid, n) + items.tobytes())


def _passthrough(array_oid: int) -> type[Dumper]:
    class PassThrough(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: bytes) -> bytes:
            return obj  # already bytes (a subclass): not copied again

    return PassThrough


async def type_info(conn: psycopg.AsyncConnection[Any], vector_type: str) -> TypeInfo:
    """pgvector's ``vector_type`` (``vector``, ``halfvec``) as this database has it."""
    info = await TypeInfo.fetch(conn, vector_type)
    if info is None:
        raise psycopg.ProgrammingError(f"type {vector_type} not found")
    return info


def register_arrays(conn: psycopg.AsyncConnection[Any], vector: TypeInfo) -> None:
    """Teach a connection to send the arrays above, its ``VectorArray`` as ``vector``'s."""
    conn.adapters.register_dumper(Int8Array, _passthrough(INT8_ARRAY_OID))
    conn.adapters.register_dumper(TextArray, _passthrough(TEXT_ARRAY_OID))
    conn.adapters.register_dumper(UuidArray, _passthrough(UUID_ARRAY_OID))
    conn.adapters.register_dumper(VectorArray, _passthrough(vector.array_oid))


async def register(conn: psycopg.AsyncConnection[Any], vector_type: str = "vector") -> int:
    """Teach a connection to send the arrays above; returns the vector type's oid."""
    info = await type_info(conn, vector_type)
    register_arrays(conn, info)
    return int(info.oid)
