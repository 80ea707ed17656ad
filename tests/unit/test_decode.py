"""A provider's answer is checked before any vector of it is used."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest

from embedfill.errors import BadAnswer, ProviderError
from embedfill.providers.answers import check_vectors, decode_embeddings, non_finite
from embedfill.retry import RetryPolicy, decide


def b64(*values: float) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def answer(*embeddings: Any, indices: list[Any] | None = None) -> bytes:
    indices = list(range(len(embeddings))) if indices is None else indices
    data = [
        {"object": "embedding", "index": i, "embedding": e}
        for i, e in zip(indices, embeddings, strict=True)
    ]
    return json.dumps({"object": "list", "data": data}).encode()


def test_base64_and_float_lists_are_decoded_in_index_order() -> None:
    content = answer(b64(1, 2), [3.0, 4], b64(5, 6), indices=[2, 0, 1])
    vectors = decode_embeddings(content, 3)
    assert [v.tolist() for v in vectors] == [[3.0, 4.0], [5.0, 6.0], [1.0, 2.0]]
    assert all(v.dtype == np.float32 for v in vectors)


def test_twelve_indices_are_ordered_as_numbers() -> None:
    content = answer(*[b64(i, i) for i in range(12)], indices=list(range(12)))
    assert [v[0] for v in decode_embeddings(content, 12)] == list(range(12))


def test_non_finite_values_are_decoded_for_the_engine_to_fail_one_row() -> None:
    content = b'{"data": [{"index": 0, "embedding": [NaN, 1]}, {"index": 1, "embedding": [1, 2]}]}'
    vectors = decode_embeddings(content, 2)
    assert non_finite(vectors) == [0]
    assert non_finite([np.array([1.0, np.inf], dtype=np.float32)]) == [0]


def test_floats_too_large_for_float32_become_infinite_without_a_warning() -> None:
    with np.errstate(all="raise"):
        (vector,) = decode_embeddings(answer([1e39, 1.0]), 1)
    assert non_finite([vector]) == [0]


OK = b64(1, 2)


@pytest.mark.parametrize(
    ("content", "count", "reason"),
    [
        (b"<html>502 Bad Gateway</html>", 1, "the body is not JSON; check base_url"),
        (b"[]", 1, "it has no 'data' list; check base_url"),
        (b'{"object": "list"}', 1, "it has no 'data' list; check base_url"),
        (b'{"data": {"0": 1}}', 1, "'data' is an object, not a list"),
        (b'{"data": null}', 1, "'data' is null, not a list"),
        (answer(OK, OK), 3, "it holds 2 embeddings for 3 inputs"),
        (answer(OK, OK, OK), 2, "it holds 3 embeddings for 2 inputs"),
        (b'{"data": ["AAAA"]}', 1, "item 0 is a string, not an object"),
        (b'{"data": [{"embedding": "AACAPw=="}]}', 1, "item 0 has no index"),
        (answer(OK, indices=["0"]), 1, "index 0 is a string, not an integer"),
        (answer(OK, OK, indices=[0, True]), 2, "index True is a boolean, not an integer"),
        (answer(OK, OK, indices=[0, 1.0]), 2, "index 1.0 is a float, not an integer"),
        (answer(OK, indices=[None]), 1, "index None is null, not an integer"),
        (answer(OK, OK, indices=[0, -1]), 2, "index -1 is out of range for 2 inputs"),
        (answer(OK, OK, indices=[0, 2]), 2, "index 2 is out of range for 2 inputs"),
        (answer(OK, OK, indices=[1, 1]), 2, "index 1 appears twice"),
        (b'{"data": [{"index": 0}]}', 1, "embedding 0 is missing"),
        (answer(None), 1, "embedding 0 is null, not a list of numbers or base64"),
        (answer(7), 1, "embedding 0 is an integer, not a list of numbers or base64"),
        (answer({"x": 1}), 1, "embedding 0 is an object, not a list of numbers or base64"),
        (answer(OK, "not*base64!"), 2, "embedding 1 is not valid base64"),
        (answer("AAA"), 1, "embedding 0 is not valid base64"),
        (answer("AAA\u00e9"), 1, "embedding 0 is not valid base64"),
        (
            answer(base64.b64encode(bytes(30)).decode()),
            1,
            "embedding 0 is base64 of 30 bytes, not a whole number of 4-byte floats",
        ),
        (answer(""), 1, "embedding 0 is empty"),
        (answer([]), 1, "embedding 0 is empty"),
        (answer(["0.5", "1"]), 1, "embedding 0 holds a string, not only numbers"),
        (answer([0.5, None]), 1, "embedding 0 holds null, not only numbers"),
        (answer([0.5, True]), 1, "embedding 0 holds a boolean, not only numbers"),
        (answer([0.5, [1]]), 1, "embedding 0 holds a list, not only numbers"),
        (answer(OK, b64(1, 2, 3)), 2, "embedding 1 has 3 values where embedding 0 has 2"),
        (answer([1, 2, 3], OK), 2, "embedding 1 has 2 values where embedding 0 has 3"),
    ],
)
def test_malformed_answers_are_refused_with_the_reason(
    content: bytes, count: int, reason: str
) -> None:
    with pytest.raises(BadAnswer) as raised:
        decode_embeddings(content, count)
    assert str(raised.value) == f"The provider's answer was malformed: {reason}."


def test_a_malformed_answer_is_retried_like_any_transient_provider_error() -> None:
    error = BadAnswer("The provider's answer was malformed: index 0 appears twice.")
    assert isinstance(error, ProviderError) and error.transient
    policy = RetryPolicy(max_attempts=3)
    assert decide(error, 1, policy, rand=lambda: 0.0) is not None
    assert decide(error, 3, policy, rand=lambda: 0.0) is None


@pytest.mark.parametrize(
    ("vectors", "count", "reason"),
    [
        ([np.ones(4)], 2, "it holds 1 embeddings for 2 inputs"),
        ([np.ones(4), np.ones(3)], 2, "embedding 1 has 3 values where embedding 0 has 4"),
        ([np.ones((2, 2))], 1, "embedding 0 is not a flat vector"),
        ([np.float32(1.0)], 1, "embedding 0 is not a flat vector"),
        ([np.ones(0)], 1, "embedding 0 is empty"),
        ([np.array(["a", "b"])], 1, "embedding 0 holds a string, not only numbers"),
    ],
)
def test_any_providers_vectors_get_the_same_shape_checks(
    vectors: list[Any], count: int, reason: str
) -> None:
    with pytest.raises(BadAnswer, match=f"malformed: {reason}"):
        check_vectors(vectors, count)


def test_check_vectors_returns_float32_vectors() -> None:
    out = check_vectors([np.ones(3, dtype=np.float64), [1, 2, 3]], 2)
    assert [v.dtype for v in out] == [np.float32, np.float32]


@pytest.mark.parametrize(
    "answer",
    [
        [np.array([True, False]), np.array([0.5, 1.0], dtype=np.float32)],
        [np.array([0.5, 1.0]), np.array([True, False])],
        [[True, False], [0.5, 1.0]],
    ],
    ids=["bool_row_first", "bool_row_second", "bool_list"],
)
def test_a_row_of_bools_beside_rows_of_numbers_is_refused(answer: list[Any]) -> None:
    """Converted whole, a row of bools among rows of floats passed as floats (the fast
    path of check_vectors); each row is its own answer."""
    with pytest.raises(BadAnswer, match="holds a bool, not only numbers"):
        check_vectors(answer, 2)


def test_numpy_rows_of_one_size_come_back_as_float32_rows() -> None:
    out = check_vectors([np.arange(4, dtype=np.int64), np.ones(4, dtype=np.float64)], 2)
    assert [v.dtype for v in out] == [np.float32, np.float32]
    assert [v.tolist() for v in out] == [[0, 1, 2, 3], [1, 1, 1, 1]]


def test_a_models_matrix_is_checked_whole_and_kept_as_float32() -> None:
    """The local and hash models answer one 2-D array: it is checked and written whole."""
    out = check_vectors(np.arange(6, dtype=np.float64).reshape(2, 3), 2)
    assert out.dtype == np.float32 and out.shape == (2, 3)
    assert out.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert non_finite(np.array([[1.0, np.nan], [1.0, 2.0]], dtype=np.float32)) == [0]


@pytest.mark.parametrize(
    ("matrix", "count", "reason"),
    [
        (np.ones((1, 4)), 2, "it holds 1 embeddings for 2 inputs"),
        (np.ones((2, 0)), 2, "embedding 0 is empty"),
        (np.array([[True, False]]), 1, "embedding 0 holds a bool, not only numbers"),
        (np.array([["a", "b"]]), 1, "embedding 0 holds a string, not only numbers"),
    ],
)
def test_a_models_matrix_gets_the_same_shape_checks(matrix: Any, count: int, reason: str) -> None:
    with pytest.raises(BadAnswer, match=f"malformed: {reason}"):
        check_vectors(matrix, count)
