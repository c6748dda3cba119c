"""Contract tests for podsweep/natsprivate.py against a real nats-server: each of nats-py's private attributes that
podsweep reads still holds what podsweep expects. When one fails after a nats-py upgrade, the test's name says which
private thing moved; keep nats-py's upper bound in pyproject.toml below that version until natsprivate.py is fixed.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig
from nats.js.kv import KeyValue

from podsweep import bus as busmod
from podsweep import natsprivate
from podsweep.config import NatsSettings


@pytest.fixture
async def bus(nats_settings: NatsSettings) -> AsyncIterator[busmod.Bus]:
    b = await busmod.connect(nats_settings, "contract")
    yield b
    await b.close()


NAME = f"contract-{secrets.token_hex(4)}"


@pytest.fixture
async def kv(bus: busmod.Bus) -> KeyValue:
    return await bus.kv(NAME)


def test_api_prefix_is_the_jetstream_api_subject(bus: busmod.Bus) -> None:
    assert natsprivate.api_prefix(bus.js) == "$JS.API"


async def test_kv_bucket_stream_and_key_prefix_name_the_bucket_podsweep_opened(bus: busmod.Bus, kv: KeyValue) -> None:
    bucket = natsprivate.kv_bucket(kv)
    assert bucket == bus.kv_bucket(NAME)
    assert natsprivate.kv_stream(kv) == f"KV_{bucket}"
    assert natsprivate.kv_key_prefix(kv) == f"$KV.{bucket}."
    stream = await bus.js.stream_info(natsprivate.kv_stream(kv))  # the stream really is the bucket's
    assert stream.config.subjects == [f"$KV.{bucket}.>"]
    revision = await kv.put("k", b"v")  # a key's subject is the prefix and the key
    message = await bus.js.get_msg(natsprivate.kv_stream(kv), revision)
    assert message.subject == natsprivate.kv_key_prefix(kv) + "k"


async def test_kv_connection_and_jetstream_are_the_ones_the_bucket_was_opened_on(bus: busmod.Bus, kv: KeyValue) -> None:
    assert natsprivate.kv_connection(kv) is bus.nc
    info = await natsprivate.kv_jetstream(kv).stream_info(natsprivate.kv_stream(kv))
    assert info.config.name == natsprivate.kv_stream(kv)


async def test_kv_allows_direct_follows_the_bucket_configuration(bus: busmod.Bus, kv: KeyValue) -> None:
    assert natsprivate.kv_allows_direct(kv) is True  # podsweep creates its buckets with direct gets
    name = f"contract-nodirect-{secrets.token_hex(4)}"
    await bus.js.create_key_value(KeyValueConfig(bucket=name, direct=False))
    assert natsprivate.kv_allows_direct(await bus.js.key_value(name)) is False


async def test_delivery_sequences_agree_with_nats_py_metadata_on_a_real_delivery(bus: busmod.Bus, kv: KeyValue) -> None:
    for n in range(3):
        await kv.put(f"k{n}", b"x")
    stream = natsprivate.kv_stream(kv)
    inbox = bus.nc.new_inbox()
    got: asyncio.Queue[object] = asyncio.Queue()
    sub = await bus.nc.subscribe(inbox, cb=got.put)
    try:
        await bus.js.add_consumer(
            stream,
            ConsumerConfig(deliver_subject=inbox, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE),
        )
        for _ in range(3):
            msg = await asyncio.wait_for(got.get(), 10)
            meta = msg.metadata  # type: ignore[attr-defined]
            assert natsprivate.delivery_sequences(msg.reply) == (  # type: ignore[attr-defined]
                meta.num_delivered,
                meta.sequence.stream,
                meta.sequence.consumer,
                meta.num_pending,
            )
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.KV_b.watch1.2.42.7.1700000000000000000.3", (2, 42, 7, 3)),
        ("$JS.ACK.hub.ACCHASH.KV_b.watch1.1.42.7.1700000000000000000.0.rnd", (1, 42, 7, 0)),  # with a domain
    ],
)
def test_sequences_come_from_either_form_of_reply_subject(reply: str, expected: tuple[int, int, int, int]) -> None:
    assert natsprivate.delivery_sequences(reply) == expected


@pytest.mark.parametrize("reply", [None, "_INBOX.abc", "$JS.ACK.a.b.c.d.e.f.g.h.i.j.k"])
def test_a_reply_subject_that_is_not_a_delivery_is_refused(reply: str | None) -> None:
    with pytest.raises(ValueError, match=r"not a JetStream delivery|invalid literal"):
        natsprivate.delivery_sequences(reply)
