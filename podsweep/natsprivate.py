"""The one place that reads nats-py's private attributes or parses what nats-py parses for us, each use with its why.

nats-py is bounded in pyproject.toml to the versions that tests/integration/test_natsprivate.py passed on: it checks
every function here against a real nats-server and fails by name the day an upgrade moves one. Nothing else in
podsweep touches a private attribute of nats-py.
"""

from __future__ import annotations

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue


def api_prefix(js: JetStreamContext) -> str:
    """`$JS.API` (or a domain's): the consume loop sends its own pull requests instead of nats-py's `fetch`, which
    paid a timer and a task per message."""
    prefix: str = js._prefix
    return prefix


def kv_allows_direct(kv: KeyValue) -> bool:
    """Whether reads of this bucket are direct gets; nats-py decides it when it opens the bucket and keeps it."""
    direct: bool = kv._direct
    return direct


def kv_bucket(kv: KeyValue) -> str:
    """The bucket's name, for log lines."""
    name: str = kv._name
    return name


def kv_stream(kv: KeyValue) -> str:
    """The stream behind the bucket (`KV_<bucket>`): KvMirror runs its own ordered push consumer on it, because
    nats-py's KV watch polls for flow control four times a second per watch."""
    stream: str = kv._stream
    return stream


def kv_key_prefix(kv: KeyValue) -> str:
    """`$KV.<bucket>.`: what a key's subject starts with, to filter that consumer and read keys back from subjects."""
    prefix: str = kv._pre
    return prefix


def kv_jetstream(kv: KeyValue) -> JetStreamContext:
    """The JetStream context the bucket was opened with, to add and delete KvMirror's consumer."""
    js: JetStreamContext = kv._js
    return js


def kv_connection(kv: KeyValue) -> NatsClient:
    """The connection the bucket was opened on, for KvMirror's inbox subscription."""
    nc: NatsClient = kv._js._nc
    return nc


def delivery_sequences(reply: str | None) -> tuple[int, int, int, int]:
    """(deliveries, stream sequence, consumer sequence, pending) from a JetStream delivery's reply subject:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`, or the longer form with a domain and
    account hash after `ACK` (and a random token at the end). nats-py's `Msg.metadata` parses the same subject but
    builds objects for all of it on every call."""
    tokens = (reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[4]), int(tokens[5]), int(tokens[6]), int(tokens[8])
    if len(tokens) >= 11 and tokens[:2] == ["$JS", "ACK"]:
        return int(tokens[6]), int(tokens[7]), int(tokens[8]), int(tokens[10])
    raise ValueError(f"not a JetStream delivery: reply subject {reply!r}")
