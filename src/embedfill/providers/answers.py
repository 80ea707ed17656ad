"""Pure checks of what a provider answers: nothing it says is trusted before it is checked.

``decode_embeddings`` reads an OpenAI-style embeddings response: ``data`` must be a list
with one item per input, whose ``index`` fields are exactly the integers 0..n-1, each
once, and whose ``embedding`` is a non-empty list of numbers or base64 of float32
values. ``check_vectors`` is the shape check every provider's output goes through (the
engine calls it for local and hash providers too). Either raises ``BadAnswer`` naming
the first problem; the engine retries it like any transient provider error.

Non-finite values are not a malformed answer: ``non_finite`` says which vectors hold
one, and the engine fails those rows alone.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BadAnswer
from .base import Matrix, Vector

_FLOAT_BYTES = 4


def malformed(reason: str) -> BadAnswer:
    return BadAnswer(f"The provider's answer was malformed: {reason}.")


def kind(value: Any) -> str:
    """What a JSON value is, in words ("a string", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Sequence):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 20 else text[:17] + "..."


def decode_embeddings(content: bytes, count: int) -> list[Vector]:
    """The vectors of an embeddings response, in input order, as float32."""
    try:
        payload = json.loads(content)
    except (ValueError, RecursionError):  # RecursionError: arrays nested beyond any answer
        raise malformed("the body is not JSON; check base_url") from None
    if not isinstance(payload, dict) or "data" not in payload:
        raise malformed("it has no 'data' list; check base_url")
    data = payload["data"]
    if not isinstance(data, list):
        raise malformed(f"'data' is {kind(data)}, not a list")
    if len(data) != count:
        raise malformed(f"it holds {len(data)} embeddings for {count} inputs")
    out: list[Vector | None] = [None] * count
    for position, item in enumerate(data):
        if not isinstance(item, dict):
            raise malformed(f"item {position} is {kind(item)}, not an object")
        if "index" not in item:
            raise malformed(f"item {position} has no index")
        index = item["index"]
        if type(index) is not int:  # bool is an int subclass; 1.0 is not an index either
            raise malformed(f"index {_short(index)} is {kind(index)}, not an integer")
        if not 0 <= index < count:
            raise malformed(f"index {_short(index)} is out of range for {count} inputs")
        if out[index] is not None:
            raise malformed(f"index {index} appears twice")
        if "embedding" not in item:
            raise malformed(f"embedding {index} is missing")
        out[index] = _vector(item["embedding"], index)
    # n items, each index in range and none twice: every position is filled
    return list(check_vectors(out, count))


def _vector(embedding: Any, index: int) -> Vector:
    if isinstance(embedding, str):
        try:
            raw = binascii.a2b_base64(embedding, strict_mode=True)  # no junk skipped
        except (binascii.Error, ValueError):
            raise malformed(f"embedding {index} is not valid base64") from None
        if len(raw) % _FLOAT_BYTES:
            raise malformed(
                f"embedding {index} is base64 of {len(raw)} bytes, "
                "not a whole number of 4-byte floats"
            )
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    if isinstance(embedding, list):
        for value in embedding:
            if type(value) is not float and type(value) is not int:  # not bool, not "0.5"
                raise malformed(f"embedding {index} holds {kind(value)}, not only numbers")
        with np.errstate(over="ignore"):  # beyond float32's range: infinite, failed later
            try:
                return np.asarray(embedding, dtype=np.float32)
            except OverflowError:  # an integer beyond any float (10**400): infinite too
                return np.asarray([_clamp(v) for v in embedding], dtype=np.float32)
    raise malformed(f"embedding {index} is {kind(embedding)}, not a list of numbers or base64")


def _clamp(value: float) -> float:
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def check_vectors(vectors: Any, count: int) -> Matrix:
    """Any provider's output: one flat, non-empty numeric vector per input, all of one
    size; returned as one float32 matrix, a row per input."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:  # a local or hash model's
        if vectors.shape[0] != count:
            raise malformed(f"it holds {vectors.shape[0]} embeddings for {count} inputs")
        if vectors.shape[1] == 0:
            raise malformed("embedding 0 is empty")
        if vectors.dtype.kind not in "fiu":
            raise malformed(f"embedding 0 holds {kind(vectors.flat[0])}, not only numbers")
        with np.errstate(over="ignore"):  # beyond float32's range: infinite, failed later
            return vectors.astype(np.float32, copy=False)
    if len(vectors) != count:
        raise malformed(f"it holds {len(vectors)} embeddings for {count} inputs")
    whole = _as_matrix(vectors)
    if whole is not None:  # the usual answer: one pass over the batch, not one per vector
        return whole
    out: list[Vector] = []
    for index, raw in enumerate(vectors):
        array = np.asarray(raw)
        if array.ndim != 1:
            raise malformed(f"embedding {index} is not a flat vector")
        if array.size == 0:
            raise malformed(f"embedding {index} is empty")
        if array.dtype.kind not in "fiu":
            sample = array.flat[0]
            raise malformed(f"embedding {index} holds {kind(sample)}, not only numbers")
        if out and array.shape != out[0].shape:
            raise malformed(
                f"embedding {index} has {array.shape[0]} values "
                f"where embedding 0 has {out[0].shape[0]}"
            )
        if array.dtype != np.float32:
            with np.errstate(over="ignore"):
                array = array.astype(np.float32)
        out.append(array)
    if not out:
        return np.empty((0, 0), dtype=np.float32)
    return np.stack(out)


def _as_matrix(vectors: Sequence[Any]) -> Matrix | None:
    """The answer as one float32 matrix when it is a list of flat numeric numpy vectors
    of one non-zero size (the usual answer: the decoders give these); None otherwise,
    and check_vectors looks at each vector, finds and names the fault. Only numpy
    vectors: converted whole, a list mixing a row of bools with rows of floats would
    pass as floats."""
    first = vectors[0] if len(vectors) else None
    if not isinstance(first, np.ndarray) or first.ndim != 1 or first.size == 0:
        return None
    shape = first.shape
    for v in vectors:
        if type(v) is not np.ndarray or v.shape != shape or v.dtype.kind not in "fiu":
            return None
    matrix = np.stack(vectors)
    if matrix.dtype != np.float32:
        with np.errstate(over="ignore"):
            matrix = matrix.astype(np.float32)
    return matrix


def non_finite(vectors: Matrix | Sequence[Vector], limit: float | None = None) -> list[int]:
    """Positions of the vectors holding a NaN or an infinite value, or (``limit``) a
    value beyond ±limit (the rows of check_vectors' matrix: one numpy pass over the
    batch, not one per vector)."""
    if not len(vectors):
        return []
    matrix = np.asarray(vectors)
    finite = np.isfinite(matrix).all(axis=1)
    if limit is not None:
        finite &= (np.abs(matrix) <= limit).all(axis=1)
    if finite.all():
        return []
    return [int(i) for i in np.flatnonzero(~finite)]
