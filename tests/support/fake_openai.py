"""A real local HTTP server that speaks the OpenAI embeddings API, for tests.

Vectors are ``hash_vector(text, dims)`` so a test can compute what every row must hold.
It records every request (key, inputs) for per-key accounting and injects faults: a
queue of one-shot faults (429 with Retry-After, 500, slow answers past the client
timeout, dropped connections), keys that answer 401, and a marker that makes any batch
containing it answer 400, as OpenAI does for an invalid input. With ``rpm``/``tpm`` it
enforces per-key limits as a provider does: a bucket that refills continuously, holding
``burst_s`` seconds' worth, and 429 with Retry-After when a request does not fit; then
every answer, 200 and 429, carries OpenAI's ``x-ratelimit-{limit,remaining,reset}-
{requests,tokens}`` headers (remaining: the bucket's level, reset: time until it is full).

Answers can be wrong in the ways real providers and proxies get them wrong: a
``mangle`` (one-shot in a Fault, or on every answer) rewrites the JSON payload (see the
functions at the end: string indices, a duplicated index, a missing or null embedding,
bad base64, ...); an input containing ``NAN_MARKER``/``INF_MARKER`` gets a vector with a
NaN/infinite value; ``dims_override`` answers another size; a ``trickle`` fault sends
the headers at once and then the body a few bytes at a time; a ``raw`` fault answers
a body as is (HTML from a proxy, gzip, junk) and ``headers`` adds any header (a
Retry-After no server should send). ``reject_models`` and
``supported_dimensions`` make every request for that model (or an unsupported
``dimensions``) answer 400, as a provider does for a configuration mistake. ``hang``
makes every request wait, unanswered, until the client hangs up or the server stops (a
provider that never answers: only the client can end the request); ``hanging`` counts
those waiting now. ``noise``
adds random noise of that scale to every vector (renormalised), as a remote model's
answers are close to, but not bit-exact with, the vector stored for the same text.
"""

from __future__ import annotations

import base64
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from embedfill.providers.hashing import hash_vectors

NAN_MARKER = "\u2622NaN"
INF_MARKER = "\u2622Inf"
HUGE_MARKER = "\u2622Huge"  # a value of 100,000: finite, beyond half precision
Mangle = Callable[[dict[str, Any]], None]


@dataclass
class Fault:
    status: int = 500
    retry_after: float | None = None
    delay: float = 0.0  # sleep before answering (a timeout when > the client's timeout)
    drop: bool = False  # close the connection without an answer
    mangle: Mangle | None = None  # a 200 answer, rewritten by this function
    trickle: float = 0.0  # a 200 answer whose body comes 4 bytes every `trickle` seconds
    raw: bytes | None = None  # answer `status` with this body as is (HTML, gzip, junk, ...)
    headers: dict[str, str] = field(default_factory=dict)  # sent with the answer as is


@dataclass
class Request:
    key: str
    inputs: list[str]
    status: int
    tokens: int = 0
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeOpenAI:
    dims: int = 8
    bad_keys: set[str] = field(default_factory=set)
    bad_marker: str = "\u2620POISON"
    latency: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    on_inputs: Callable[[list[str]], None] | None = None
    rpm: int = 0
    tpm: int = 0
    burst_s: float = 5.0
    count_tokens: Callable[[str], int] | None = None
    mangle: Mangle | None = None  # applied to every 200 answer
    dims_override: int | None = None  # answer this size whatever was asked
    reject_models: set[str] = field(default_factory=set)
    supported_dimensions: set[int] | None = None  # None: any `dimensions` is fine
    noise: float = 0.0  # > 0: gaussian noise of this scale on every vector, renormalised
    max_in_flight: int = 0  # > 0: a request beyond this many at once gets a 429
    max_inputs: int = 0  # > 0: a request with more inputs than this gets a 400
    hang: bool = False  # every request waits, unanswered, until the client hangs up
    hanging: int = 0  # requests waiting now because of ``hang``
    in_flight: int = 0
    peak_in_flight: int = 0
    requests: list[Request] = field(default_factory=list)
    _buckets: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def ok_requests(self) -> list[Request]:
        return [r for r in self.requests if r.status == 200]

    def texts_by_key(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for r in self.ok_requests():
            out.setdefault(r.key, []).extend(r.inputs)
        return out

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                with fake._lock:
                    fake.in_flight += 1
                    fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                    over = 0 < fake.max_in_flight < fake.in_flight
                try:
                    if over:  # an overloaded provider: too many requests at once
                        self.arrived = time.monotonic()
                        self.rfile.read(int(self.headers.get("content-length", 0)))
                        fake._record("", [], 429)
                        return self._error(429, "Too many concurrent requests.")
                    self._handle()
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _handle(self) -> None:
                self.arrived = time.monotonic()
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                key = self.headers.get("authorization", "").removeprefix("Bearer ")
                inputs = body.get("input", [])
                inputs = [inputs] if isinstance(inputs, str) else list(inputs)
                if fake.hang:
                    fake._record(key, inputs, 0)
                    return self._hang()
                with fake._lock:
                    fault = fake.faults.pop(0) if fake.faults else None
                if fault is not None and fault.raw is not None:
                    fake._record(key, inputs, fault.status)
                    return self._send_raw(fault.status, fault.raw, fault.headers)
                answer_fault = fault if fault and (fault.mangle or fault.trickle) else None
                if fault is not None and answer_fault is None:
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.drop:
                        fake._record(key, inputs, 0)
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if not fault.delay or fault.status != 200:
                        headers = {}
                        if fault.retry_after is not None:
                            headers["retry-after"] = str(fault.retry_after)
                        headers |= fault.headers
                        fake._record(key, inputs, fault.status)
                        return self._error(fault.status, "injected fault", headers)
                if not self.path.endswith("/embeddings"):
                    return self._error(404, "not found")
                if key in fake.bad_keys or not key:
                    fake._record(key, inputs, 401)
                    # as some providers and proxies do, echo the key that was rejected
                    return self._error(401, f"Incorrect API key provided: {key}.")
                model = body.get("model")
                if model in fake.reject_models:
                    fake._record(key, inputs, 400)
                    return self._error(
                        400, f"The model `{model}` does not exist or you do not have access to it."
                    )
                asked = body.get("dimensions")
                supported = fake.supported_dimensions
                if asked is not None and supported is not None and asked not in supported:
                    fake._record(key, inputs, 400)
                    return self._error(400, f"This model does not support dimensions={asked}.")
                if 0 < fake.max_inputs < len(inputs):
                    fake._record(key, inputs, 400)
                    return self._error(400, f"Too many inputs: at most {fake.max_inputs}.")
                if any(fake.bad_marker in t or not t for t in inputs):
                    fake._record(key, inputs, 400)
                    return self._error(400, "'$.input' is invalid.")
                tokens = sum(map(fake.count_tokens, inputs)) if fake.count_tokens else 0
                wait, limit_headers = fake._admit(key, tokens)
                if wait > 0:
                    fake._record(key, inputs, 429, tokens)
                    limit_headers["retry-after"] = f"{wait:.3f}"
                    return self._error(429, "Rate limit reached.", limit_headers)
                if fake.on_inputs:
                    fake.on_inputs(inputs)
                dims = fake.dims_override or body.get("dimensions") or fake.dims
                b64 = body.get("encoding_format") == "base64"
                data = []
                vectors = hash_vectors(inputs, dims)
                if fake.noise:
                    rng = np.random.default_rng()
                    vectors = vectors + rng.normal(0, fake.noise, vectors.shape).astype(np.float32)
                    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                for i, (text, v) in enumerate(zip(inputs, vectors, strict=True)):
                    if NAN_MARKER in text:
                        v[0] = np.nan
                    if INF_MARKER in text:
                        v[-1] = -np.inf
                    if HUGE_MARKER in text:
                        v[1] = 1e5
                    emb: Any = base64.b64encode(v.tobytes()).decode() if b64 else v.tolist()
                    data.append({"object": "embedding", "index": i, "embedding": emb})
                payload = {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": 0, "total_tokens": 0},
                }
                mangle = answer_fault.mangle if answer_fault else fake.mangle
                if mangle is not None:
                    mangle(payload)
                fake._record(key, inputs, 200, tokens)
                trickle = answer_fault.trickle if answer_fault else 0.0
                self._send(200, payload, limit_headers, trickle=trickle)

            def _hang(self) -> None:
                """Answer nothing until the client closes the connection (or the server
                stops)."""
                with fake._lock:
                    fake.hanging += 1
                try:
                    while not fake._stopped.wait(0.02):
                        readable, _, _ = select.select([self.connection], [], [], 0)
                        if readable:
                            try:
                                if not self.connection.recv(1, socket.MSG_PEEK):
                                    break  # the client hung up
                            except OSError:
                                break
                finally:
                    with fake._lock:
                        fake.hanging -= 1
                self.close_connection = True

            def _error(
                self, status: int, message: str, headers: dict[str, str] | None = None
            ) -> None:
                self._send(status, {"error": {"message": message, "type": "test"}}, headers)

            def _send_raw(self, status: int, raw: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                if "content-type" not in headers:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(raw)

            def _send(
                self,
                status: int,
                payload: Any,
                headers: dict[str, str] | None = None,
                trickle: float = 0.0,
            ) -> None:
                raw = json.dumps(payload).encode()
                # answer `latency` seconds after the request arrived, work included
                time.sleep(max(0.0, fake.latency - (time.monotonic() - self.arrived)))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    if not trickle:
                        self.wfile.write(raw)
                        return
                    self.wfile.flush()
                    for at in range(0, len(raw), 4):
                        time.sleep(trickle)
                        self.wfile.write(raw[at : at + 4])
                        self.wfile.flush()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _record(self, key: str, inputs: list[str], status: int, tokens: int = 0) -> None:
        with self._lock:
            self.requests.append(Request(key, inputs, status, tokens))

    def _admit(self, key: str, tokens: int) -> tuple[float, dict[str, str]]:
        """(0 when the request fits the key's rpm and tpm, else seconds until it would;
        the ``x-ratelimit-*`` headers OpenAI sends with the answer). A header's limit is
        what the bucket holds, remaining its level after this request, reset the time
        until it is full again."""
        now = time.monotonic()
        with self._lock:
            needs = []
            for kind, per_minute, amount in (("rpm", self.rpm, 1), ("tpm", self.tpm, tokens)):
                if per_minute <= 0:
                    continue
                rate, capacity = per_minute / 60, max(per_minute / 60 * self.burst_s, amount)
                level, updated = self._buckets.get((key, kind), [capacity, now])
                level = min(capacity, level + (now - updated) * rate)
                self._buckets[(key, kind)] = [level, now]
                needs.append((kind, level, amount, rate, capacity))
            waits = [(amt - level) / rate for _, level, amt, rate, _ in needs if level < amt]
            headers: dict[str, str] = {}
            for kind, level, amount, rate, capacity in needs:
                if not waits:
                    level -= amount
                    self._buckets[(key, kind)][0] = level
                noun = "requests" if kind == "rpm" else "tokens"
                headers[f"x-ratelimit-limit-{noun}"] = str(int(capacity))
                headers[f"x-ratelimit-remaining-{noun}"] = str(max(0, int(level)))
                headers[f"x-ratelimit-reset-{noun}"] = go_duration((capacity - level) / rate)
            return (max(waits) if waits else 0.0), headers

    def stop(self) -> None:
        self._stopped.set()  # the requests left hanging end
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes it: ``20ms`` under a second, else ``6m0s``, ``1h2m3.5s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = f"{int(hours)}h" if hours else ""
    out += f"{int(minutes)}m" if hours or minutes else ""
    return out + f"{round(secs, 3):g}s"


# ---------------------------------------------------------------- malformed answers
# Each rewrites a 200 answer's payload the way a broken provider or proxy might.


def string_indices(payload: dict[str, Any]) -> None:
    for item in payload["data"]:
        item["index"] = str(item["index"])


def duplicated_index(payload: dict[str, Any]) -> None:
    payload["data"][-1]["index"] = 0


def missing_embedding(payload: dict[str, Any]) -> None:
    del payload["data"][0]["embedding"]


def null_embedding(payload: dict[str, Any]) -> None:
    payload["data"][0]["embedding"] = None


def bad_base64(payload: dict[str, Any]) -> None:
    payload["data"][0]["embedding"] = "not*base64!"


def odd_byte_count(payload: dict[str, Any]) -> None:
    """Base64 of 30 bytes: not a whole number of float32 values."""
    payload["data"][0]["embedding"] = base64.b64encode(bytes(30)).decode()


def strings_in_vector(payload: dict[str, Any]) -> None:
    payload["data"][0]["embedding"] = ["0.5"] * 8


def short_vector(payload: dict[str, Any]) -> None:
    """One vector a value short of the others."""
    raw = base64.b64decode(payload["data"][0]["embedding"])
    payload["data"][0]["embedding"] = base64.b64encode(raw[:-4]).decode()


def data_not_a_list(payload: dict[str, Any]) -> None:
    payload["data"] = {"0": payload["data"][0]}


def one_vector_missing(payload: dict[str, Any]) -> None:
    payload["data"].pop()
