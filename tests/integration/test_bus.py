"""The NATS plumbing against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
import pytest
from nats.js import api as jsapi

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import ConsumerSettings, NatsSettings
from podsweep.natsaccess import Bucket, NatsAccess, Undeclared
from schemas import subjects
from schemas.events import DeadLetter, ImageGone
from schemas.state import LimiterState, Slot
from tests.harness.streams import stored_messages

FAST = ConsumerSettings(max_deliver=3, backoff_s=[0.05, 0.1], ack_wait_s=5, batch=16, concurrency=4)
DIGEST = "registry.example.com/team/app@sha256:" + "ab" * 32


def gone(node: str = "node-1") -> ImageGone:
    return ImageGone(cluster="c1", digest_ref=DIGEST, node=node, observed_at=datetime(2026, 11, 23, tzinfo=UTC))


@pytest.fixture
async def bus(nats_settings: NatsSettings) -> AsyncIterator[busmod.Bus]:
    b = await busmod.connect(nats_settings, "test")
    await busmod.ensure_stream(b)
    yield b
    await b.close()


async def run_until(bus: busmod.Bus, routes: dict[str, busmod.Route[ImageGone]], done: asyncio.Event, durable: str):
    stop = asyncio.Event()
    task = asyncio.create_task(
        busmod.consume(bus, service="test", durable=durable, routes=routes, settings=FAST, stop=stop)
    )
    await asyncio.wait_for(done.wait(), 15)
    stop.set()
    await asyncio.wait_for(task, 10)


async def dead_letters(bus: busmod.Bus, service: str) -> list[DeadLetter]:
    subject = subjects.dead_letter_subject(bus.settings.subject_root, service)
    return [
        msgspec.json.decode(msg.data, type=DeadLetter)
        for msg in await stored_messages(bus.js, bus.settings.stream, subject)
    ]


async def test_same_msg_id_published_twice_is_consumed_once(bus: busmod.Bus) -> None:
    assert await bus.publish(subjects.IMAGE_GONE, gone(), msg_id="gone:1") is True
    assert await bus.publish(subjects.IMAGE_GONE, gone(), msg_id="gone:1") is False
    assert await bus.publish(subjects.IMAGE_GONE, gone("node-2"), msg_id="gone:2") is True
    seen: list[str] = []
    done = asyncio.Event()

    async def handle(event: ImageGone, delivery: busmod.Delivery) -> None:
        seen.append(event.node)
        if len(seen) == 2:
            done.set()

    await run_until(bus, {subjects.IMAGE_GONE: busmod.Route(ImageGone, handle)}, done, "dedup")
    # The stream stored two; the consumer has acked both and has nothing left to deliver.
    assert len(await stored_messages(bus.js, bus.settings.stream, bus.subject(subjects.IMAGE_GONE))) == 2
    consumer = await bus.js.consumer_info(bus.settings.stream, "dedup")
    assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)
    assert sorted(seen) == ["node-1", "node-2"]


async def test_message_that_always_fails_is_dead_lettered_with_its_error(bus: busmod.Bus) -> None:
    await bus.publish(subjects.IMAGE_GONE, gone(), msg_id="fail:1")
    attempts: list[int] = []
    done = asyncio.Event()

    async def handle(event: ImageGone, delivery: busmod.Delivery) -> None:
        attempts.append(delivery.deliveries)
        if delivery.deliveries == FAST.max_deliver:
            asyncio.get_running_loop().call_later(0.3, done.set)
        raise RuntimeError("S3 is on fire")

    await run_until(bus, {subjects.IMAGE_GONE: busmod.Route(ImageGone, handle)}, done, "failing")
    assert attempts == [1, 2, 3]
    letters = await dead_letters(bus, "test")
    assert len(letters) == 1
    assert "S3 is on fire" in letters[0].error and "3 times" in letters[0].error
    assert msgspec.json.decode(letters[0].payload, type=ImageGone) == gone()


async def test_transient_failure_is_retried_and_then_succeeds(bus: busmod.Bus) -> None:
    await bus.publish(subjects.IMAGE_GONE, gone(), msg_id="flaky:1")
    attempts: list[int] = []
    done = asyncio.Event()

    async def handle(event: ImageGone, delivery: busmod.Delivery) -> None:
        attempts.append(delivery.deliveries)
        if delivery.deliveries < 2:
            raise busmod.Retry("not yet", delay=0.05)
        done.set()

    await run_until(bus, {subjects.IMAGE_GONE: busmod.Route(ImageGone, handle)}, done, "flaky")
    assert attempts == [1, 2]
    assert await dead_letters(bus, "test") == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"{not json", "invalid image.gone event", id="not-json"),
        pytest.param(
            msgspec.json.encode(
                {"cluster": "c1", "digest_ref": "app:latest", "node": "n", "observed_at": "2026-01-01T00:00:00Z"}
            ),
            "invalid image.gone event",
            id="tag-instead-of-digest",
        ),
        pytest.param(
            msgspec.json.encode(
                {"cluster": "c1", "digest_ref": DIGEST, "node": "n; rm -rf /", "observed_at": "2026-01-01T00:00:00Z"}
            ),
            "node",
            id="hostile-node-name",
        ),
    ],
)
async def test_malformed_event_is_dead_lettered_at_once_with_the_reason(
    bus: busmod.Bus, payload: bytes, reason: str
) -> None:
    await bus.js.publish(bus.subject(subjects.IMAGE_GONE), payload, stream=bus.settings.stream)
    handled: list[ImageGone] = []

    async def handle(event: ImageGone, delivery: busmod.Delivery) -> None:
        handled.append(event)

    stop = asyncio.Event()
    task = asyncio.create_task(
        busmod.consume(
            bus,
            service="test",
            durable="malformed",
            routes={subjects.IMAGE_GONE: busmod.Route(ImageGone, handle)},
            settings=FAST,
            stop=stop,
        )
    )
    letters: list[DeadLetter] = []
    for _ in range(50):
        letters = await dead_letters(bus, "test")
        if letters:
            break
    stop.set()
    await task
    assert handled == []
    assert len(letters) == 1 and letters[0].deliveries == 1
    assert reason in letters[0].error
    assert letters[0].payload == payload


async def test_stop_drains_the_event_in_flight_before_returning(bus: busmod.Bus) -> None:
    await bus.publish(subjects.IMAGE_GONE, gone(), msg_id="slow:1")
    started = asyncio.Event()
    finished: list[bool] = []

    async def handle(event: ImageGone, delivery: busmod.Delivery) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(True)

    stop = asyncio.Event()
    routes = {subjects.IMAGE_GONE: busmod.Route(ImageGone, handle)}
    task = asyncio.create_task(
        busmod.consume(bus, service="test", durable="slow", routes=routes, settings=FAST, stop=stop)
    )
    await asyncio.wait_for(started.wait(), 10)
    stop.set()  # what SIGTERM does
    await asyncio.wait_for(task, 10)
    assert finished == [True]
    for _ in range(20):  # the server applies the ack asynchronously
        info = await bus.js.consumer_info(bus.settings.stream, "slow")
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.05)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_ensure_stream_and_kv_are_idempotent(bus: busmod.Bus) -> None:
    await busmod.ensure_stream(bus)
    kv1 = await bus.kv("scans")
    kv2 = await bus.kv("scans")
    rev = await kv1.create("k", b"1")
    assert (await kv2.get("k")).revision == rev


async def test_a_declared_service_leaves_a_differing_stream_as_it_is_and_an_undeclared_client_updates_it(
    nats_settings: NatsSettings,
) -> None:
    """Deployed users may not update a stream (an update can purge it): a service under its declaration keeps the
    stream's retention; `podsweep up`'s own preparation, under no declaration, applies the settings."""
    longer = msgspec.structs.replace(nats_settings, max_age_days=nats_settings.max_age_days * 2)
    declared = await busmod.connect(longer, "svc", NatsAccess(service="svc", publishes=(subjects.IMAGE_SEEN,)))
    plain = await busmod.connect(longer, "up")
    try:
        await busmod.ensure_stream(plain)  # made or brought to `longer`
        before = (await plain.js.stream_info(nats_settings.stream)).config.max_age
        shorter = msgspec.structs.replace(longer, max_age_days=1.0)
        declared = busmod.Bus(declared.nc, shorter, declared.access)
        await busmod.ensure_stream(declared)
        assert (await plain.js.stream_info(nats_settings.stream)).config.max_age == before
        await busmod.ensure_stream(busmod.Bus(plain.nc, shorter))
        assert (await plain.js.stream_info(nats_settings.stream)).config.max_age == 86400
    finally:
        await declared.close()
        await plain.close()


async def test_a_declared_service_bus_refuses_an_undeclared_bucket_before_the_server(
    nats_settings: NatsSettings,
) -> None:
    declared = await busmod.connect(nats_settings, "svc", NatsAccess(service="svc", buckets=(Bucket("mine"),)))
    try:
        await declared.kv("mine")
        with pytest.raises(Undeclared, match=r"opens KV bucket theirs.*services/svc/main.py"):
            await declared.kv("theirs")
    finally:
        await declared.close()


async def test_replay_stream_holds_a_copy_of_the_replayed_subjects_only_once_it_returns(bus: busmod.Bus) -> None:
    for n in range(300):
        await bus.publish(subjects.IMAGE_GONE, gone(f"node-{n}"), msg_id=f"gone-{n}")
    await bus.publish(subjects.SCAN_FAILED, gone(), msg_id="failed")
    replay = await busmod.ensure_replay_stream(bus, [subjects.IMAGE_GONE])
    info = await bus.js.stream_info(replay.name, subjects_filter=f"{bus.settings.subject_root}.>")
    assert info.state.subjects == {bus.subject(subjects.IMAGE_GONE): 300}
    assert await busmod.ensure_replay_stream(bus, [subjects.IMAGE_GONE]) == replay  # idempotent


async def test_a_declared_replayer_refuses_a_replay_stream_that_copies_other_subjects(
    nats_settings: NatsSettings,
) -> None:
    plain = await busmod.connect(nats_settings, "up")
    access = NatsAccess(service="gate", replays=(subjects.IMAGE_SEEN, subjects.REPORT_STORED))
    declared = await busmod.connect(nats_settings, "gate", access)
    try:
        await busmod.ensure_stream(plain)
        await busmod.ensure_replay_stream(plain, [subjects.IMAGE_SEEN])  # an older version's copy
        with pytest.raises(RuntimeError, match=r"nats stream rm T\d+_REPLAY"):
            await busmod.ensure_replay_stream(declared, list(access.replays))
    finally:
        await plain.close()
        await declared.close()


class Counter(msgspec.Struct, frozen=True):
    n: int = 0


class Padded(msgspec.Struct, frozen=True):
    n: int
    padding: str


async def test_compare_and_set_never_loses_an_update_between_racing_writers(bus: busmod.Bus) -> None:
    kv = await bus.kv("race")

    async def writer() -> None:
        for _ in range(25):
            await busmod.kv_update(kv, "count", Counter, lambda c: Counter((c or Counter()).n + 1), attempts=100)

    await asyncio.gather(writer(), writer(), writer())
    value, revision = await busmod.kv_read(kv, "count", Counter)
    assert value == Counter(75)
    assert revision == 75


async def test_compare_and_set_without_a_change_writes_nothing(bus: busmod.Bus) -> None:
    kv = await bus.kv("nochange")
    stored, wrote = await busmod.kv_update(kv, "k", Counter, lambda c: None)
    assert (stored, wrote) == (None, False)
    assert await busmod.kv_read(kv, "k", Counter) == (None, 0)


async def test_buckets_allow_direct_gets(bus: busmod.Bus) -> None:
    kv = await bus.kv("direct")
    info = await bus.js.stream_info(f"KV_{bus.kv_bucket('direct')}")
    assert info.config.allow_direct is True
    await kv.put("k", b"1")
    assert (await kv.get("k")).value == b"1"


async def test_one_pass_over_a_bucket_returns_every_latest_document_and_ends_on_a_delete(bus: busmod.Bus) -> None:
    kv = await bus.kv("listed")
    assert await busmod.kv_documents(kv, Counter) == ([], [])  # an empty bucket ends at once
    for n in range(5):
        await kv.put(f"k{n}", msgspec.json.encode(Counter(n)))
    await kv.put("k0", msgspec.json.encode(Counter(10)))
    await kv.put("broken", b"{not json")
    await kv.delete("k1")  # the bucket's last revision is a delete: the pass must still end
    documents, unreadable = await busmod.kv_documents(kv, Counter)
    assert sorted(d.n for d in documents) == [2, 3, 4, 10]
    assert unreadable == ["broken"]


async def test_passes_over_a_bucket_under_writes_always_see_every_key(bus: busmod.Bus) -> None:
    """`podsweep status` once counted no digests on a loaded machine: nats-py's "initial values done" marker can come
    before the values. Every pass here, while another task keeps rewriting keys, must see all of them."""
    kv = await bus.kv("listed-busy")
    keys = 1500
    await asyncio.gather(*(kv.put(f"k{n}", msgspec.json.encode(Counter(n))) for n in range(keys)))
    stop = asyncio.Event()

    async def rewrite() -> None:
        n = 0
        while not stop.is_set():
            await kv.put(f"k{n % keys}", msgspec.json.encode(Counter(n % keys)))
            n += 1

    writer = asyncio.create_task(rewrite())
    try:
        for _ in range(10):
            documents, unreadable = await busmod.kv_documents(kv, Counter)
            assert unreadable == []
            assert sorted(d.n for d in documents) == list(range(keys))
    finally:
        stop.set()
        await writer


async def _until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the mirror did not get there in time")


async def test_mirror_follows_creates_updates_deletes_and_unreadable_documents(bus: busmod.Bus) -> None:
    kv = await bus.kv("mirrored")
    await kv.put("before", msgspec.json.encode(Counter(1)))
    mirror = busmod.KvMirror(kv, Counter)
    assert mirror.known("before") is None  # not ready: the caller reads
    stop = asyncio.Event()
    task = asyncio.create_task(mirror.follow(stop))
    try:
        await _until(lambda: mirror.ready)
        assert mirror.known("before") == (Counter(1), 1)
        assert mirror.known("never") == (None, 0)
        revision = await kv.put("later", msgspec.json.encode(Counter(2)))
        await _until(lambda: mirror.known("later") == (Counter(2), revision))
        await kv.delete("before")
        await _until(lambda: mirror.known("before") == (None, 3))
        broken = await kv.put("broken", b"{not json")
        await _until(lambda: mirror.revision("broken") == broken)  # arrived; decoded when first asked for
        assert mirror.known("broken") is None  # cannot say: the caller reads (and sees the error itself)
        assert "broken" in mirror._unreadable
        assert list(mirror.documents()) == [("later", Counter(2))]
        unreadable = await kv.put("later", b"{not json either")
        await _until(lambda: mirror.revision("later") == unreadable)
        assert mirror.known("later") is None
        assert mirror.last("later") == (Counter(2), revision)  # the last readable one, to start a CAS from
        assert list(mirror.documents()) == []
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert not mirror.ready


async def test_a_mirror_keeping_few_decoded_still_answers_for_every_key_and_keeps_none_decoded_for_a_sweep(
    bus: busmod.Bus,
) -> None:
    kv = await bus.kv("fewdecoded")
    revisions = [await kv.put(f"k{i}", msgspec.json.encode(Counter(i))) for i in range(20)]
    mirror = busmod.KvMirror(kv, Counter, decoded=3)
    stop = asyncio.Event()
    task = asyncio.create_task(mirror.follow(stop))
    try:
        await _until(lambda: mirror.ready)
        assert sorted(mirror.documents(), key=lambda kd: kd[1].n) == [(f"k{i}", Counter(i)) for i in range(20)]
        assert len(mirror._decoded) == 0  # the sweep's pass decoded them one at a time
        assert [mirror.known(f"k{i}") for i in range(20)] == [(Counter(i), r) for i, r in enumerate(revisions)]
        assert list(mirror._decoded) == ["k17", "k18", "k19"]  # the most recently asked for
        mirror.saw("k0", Counter(100), revisions[-1] + 1)  # this replica's own write
        assert mirror.known("k0") == (Counter(100), revisions[-1] + 1) and len(mirror._decoded) == 3
        later = await kv.put("k1", msgspec.json.encode(Counter(101)))
        await _until(lambda: mirror.revision("k1") == later)
        assert mirror.known("k1") == (Counter(101), later)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_mirror_keeps_up_through_flow_control_and_sees_every_latest_value(
    bus: busmod.Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Megabytes of changes: the server asks for flow control many times, and the watch must answer each request
    or stall. Each key ends at its latest value and revision."""
    kv = await bus.kv("flowcontrolled")
    answered: list[str] = []
    publish = bus.nc.publish

    async def counting(subject: str, *args: Any, **kwargs: Any) -> None:
        if subject.startswith("$JS.FC."):
            answered.append(subject)
        await publish(subject, *args, **kwargs)

    monkeypatch.setattr(bus.nc, "publish", counting)
    padding = "x" * 20_000
    mirror = busmod.KvMirror(kv, Padded)
    stop = asyncio.Event()
    task = asyncio.create_task(mirror.follow(stop))
    try:
        await _until(lambda: mirror.ready)  # an empty bucket is ready at once
        latest: dict[str, int] = {}
        for round_ in range(3):
            revisions = await asyncio.gather(
                *(kv.put(f"k{i}", msgspec.json.encode(Padded(round_, padding))) for i in range(300))
            )
            latest.update({f"k{i}": revision for i, revision in enumerate(revisions)})
        await _until(lambda: all(mirror.revision(k) == r for k, r in latest.items()), timeout_s=30)
        assert all(mirror.known(k) == (Padded(2, padding), r) for k, r in latest.items())
        assert len(list(mirror.documents())) == 300
        assert answered  # the server did ask for flow control, and the watch answered
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_compare_and_set_from_a_mirror_skips_the_read_and_survives_a_stale_entry(bus: busmod.Bus) -> None:
    kv = await bus.kv("fromknown")
    first = await kv.create("k", msgspec.json.encode(Counter(1)))
    # Fresh and unchanged: "no change" is concluded from the known document, nothing is read or written.
    assert await busmod.kv_change(kv, "k", Counter, lambda c: None, known=(Counter(1), first), fresh=True) == (
        Counter(1),
        first,
        False,
    )
    await kv.update("k", msgspec.json.encode(Counter(5)), last=first)  # another writer: the known entry is stale
    bump = lambda c: Counter((c or Counter()).n + 1)  # noqa: E731
    stored, revision, wrote = await busmod.kv_change(kv, "k", Counter, bump, known=(Counter(1), first), fresh=True)
    assert (stored, wrote) == (Counter(6), True)  # the failed write led to a read, and the change was re-applied
    assert await busmod.kv_read(kv, "k", Counter) == (Counter(6), revision)


async def test_a_conditional_write_refuses_a_stale_revision_recreates_a_deleted_key_and_raises_other_errors(
    bus: busmod.Bus,
) -> None:
    kv = await bus.kv("putif")
    first = await busmod.kv_put_if(kv, "k", Counter(1), 0)
    assert first is not None
    assert await busmod.kv_put_if(kv, "k", Counter(9), 0) is None  # exists: a create loses
    second = await busmod.kv_put_if(kv, "k", Counter(2), first)
    assert second is not None and second > first
    assert await busmod.kv_put_if(kv, "k", Counter(3), first) is None  # stale revision: another writer came first
    assert await busmod.kv_read(kv, "k", Counter) == (Counter(2), second)
    await kv.delete("k")  # by hand (nats kv del): a create still works
    assert await busmod.kv_read(kv, "k", Counter) == (None, 0)
    assert await busmod.kv_put_if(kv, "k", Counter(4), 0) is not None
    small = await bus.js.create_key_value(
        jsapi.KeyValueConfig(bucket=bus.kv_bucket("putif-small"), max_value_size=100, history=1)
    )
    revision = await busmod.kv_put_if(small, "k", Counter(1), 0)
    assert revision is not None
    # Any other refusal is an error, never a lost race that kv_change would retry twenty times.
    with pytest.raises(nats.js.errors.APIError, match="maximum"):
        await busmod.kv_put_if(small, "k", Padded(1, "x" * 200), revision)


async def _stored(bus: busmod.Bus, name: str) -> list[tuple[str, str | None, ImageGone]]:
    """(Nats-Msg-Id, traceparent, event) of every message stored on a subject, in stream order."""
    out = []
    for msg in await stored_messages(bus.js, bus.settings.stream, bus.subject(name)):
        headers = msg.headers or {}
        out.append((headers["Nats-Msg-Id"], headers.get("traceparent"), msgspec.json.decode(msg.data, type=ImageGone)))
    return out


def _batch(count: int, prefix: str = "gone") -> list[busmod.Outgoing]:
    return [busmod.Outgoing(subjects.IMAGE_GONE, gone(f"node-{i}"), f"{prefix}:{i}") for i in range(count)]


@pytest.mark.parametrize("window", [1, 7, 512], ids=["one-ack-at-a-time", "window-smaller-than-batch", "whole-batch"])
async def test_batch_publish_stores_every_event_once_with_its_own_msg_id(bus: busmod.Bus, window: int) -> None:
    batch = _batch(40)
    assert await bus.publish_many(batch, window=window) == 40
    assert await bus.publish_many(batch, window=window) == 0  # all duplicates: nothing stored twice
    stored = await _stored(bus, subjects.IMAGE_GONE)
    assert sorted(msg_id for msg_id, _, _ in stored) == sorted(out.msg_id for out in batch)
    assert {msg_id: event.node for msg_id, _, event in stored} == {f"gone:{i}": f"node-{i}" for i in range(40)}


async def test_batch_publish_carries_the_current_trace_to_every_message(bus: busmod.Bus) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("relist") as span:
        await bus.publish_many(_batch(5))
    trace_id = f"{span.get_span_context().trace_id:032x}"
    parents = [traceparent for _, traceparent, _ in await _stored(bus, subjects.IMAGE_GONE)]
    assert len(parents) == 5
    assert all(p is not None and p.split("-")[1] == trace_id for p in parents), parents


async def test_batch_to_a_stream_that_appears_late_is_sent_again_and_stored_once(
    nats_settings: NatsSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    bus = await busmod.connect(nats_settings, "test")
    try:
        batch = _batch(10, "late")
        publishing = asyncio.create_task(bus.publish_many(batch, attempts=4))
        said = ""
        for _ in range(200):  # the first round finds no stream: nothing acknowledged, and the bus says so
            said += "".join(capsys.readouterr())
            if "events unacknowledged, sending again" in said:
                break
            await asyncio.sleep(0.05)
        assert "events unacknowledged, sending again" in said
        assert not publishing.done()  # between rounds, not given up
        await busmod.ensure_stream(bus)
        assert await asyncio.wait_for(publishing, 15) == 10
        assert sorted(msg_id for msg_id, _, _ in await _stored(bus, subjects.IMAGE_GONE)) == sorted(
            out.msg_id for out in batch
        )
    finally:
        await bus.close()


async def test_batch_that_is_never_acknowledged_fails_with_what_is_left_to_send(nats_settings: NatsSettings) -> None:
    bus = await busmod.connect(nats_settings, "test")  # no stream: nothing can ever be stored
    try:
        batch = _batch(6, "never")
        with pytest.raises(
            busmod.PublishFailed, match=r"6 of 6 events to T\d+ unacknowledged after 2 attempts"
        ) as info:
            await bus.publish_many(batch, attempts=2, ack_timeout_s=1.0)
        assert sorted(out.msg_id for out in info.value.unsent) == sorted(out.msg_id for out in batch)
    finally:
        await bus.close()


# Compare-and-set from a revision the caller already holds (the dispatcher's limiter and claims).

DEADLINE = datetime(2030, 1, 1, tzinfo=UTC)


def _add(scan_id: str) -> Callable[[LimiterState | None], LimiterState | None]:
    def change(old: LimiterState | None) -> LimiterState | None:
        current = old or LimiterState()
        if any(s.scan_id == scan_id for s in current.slots):
            return None
        slot = Slot(scan_id=scan_id, node=None, deadline=DEADLINE)
        return msgspec.structs.replace(current, slots=[*current.slots, slot])

    return change


@pytest.mark.parametrize("stale", [False, True], ids=["known_is_current", "known_is_stale"])
async def test_a_write_from_a_known_revision_never_loses_another_writers_update(bus: busmod.Bus, stale: bool) -> None:
    kv = await bus.kv(f"kvchange-{int(stale)}")
    mine, revision, wrote = await busmod.kv_change(kv, "active", LimiterState, _add("psw-mine-1"))
    assert wrote and mine is not None
    if stale:  # another replica writes after this one's last write
        await busmod.kv_change(kv, "active", LimiterState, _add("psw-other-1"))
    stored, new_revision, wrote = await busmod.kv_change(
        kv, "active", LimiterState, _add("psw-mine-2"), known=(mine, revision)
    )
    assert wrote and stored is not None and new_revision > revision
    expected = ["psw-mine-1", "psw-other-1", "psw-mine-2"] if stale else ["psw-mine-1", "psw-mine-2"]
    assert [s.scan_id for s in stored.slots] == expected
    read, read_revision = await busmod.kv_read(kv, "active", LimiterState)
    assert read == stored and read_revision == new_revision


async def test_no_change_is_only_concluded_from_a_fresh_read(bus: busmod.Bus) -> None:
    """A stale copy that already holds the slot must not hide that the stored document lost it."""
    kv = await bus.kv("kvchange-nochange")
    held, revision, _ = await busmod.kv_change(kv, "active", LimiterState, _add("psw-x"))
    await kv.put("active", msgspec.json.encode(LimiterState()))  # the slot was released meanwhile
    stored, _, wrote = await busmod.kv_change(kv, "active", LimiterState, _add("psw-x"), known=(held, revision))
    assert wrote and stored is not None and [s.scan_id for s in stored.slots] == ["psw-x"]


async def test_consumer_and_mirror_carry_on_after_the_server_restarts(tmp_path: Path) -> None:
    """The server restarts with its store: the pull requests and the mirror's watch it held are gone. Both are
    noticed (a pull unanswered past its expiry, a watch without heartbeats) and asked again; nothing is lost."""
    port = embedded.free_port()
    server = embedded.start_nats(tmp_path, port)
    settings = NatsSettings(
        url=server.url,
        user=server.user,
        password=server.password,
        subject_root="rs.podsweep",
        stream="RS",
        kv_prefix="rs",
    )
    bus = await busmod.connect(settings, "restart")
    stop = asyncio.Event()
    try:
        await busmod.ensure_stream(bus)
        kv = await bus.kv("mirrored")
        mirror = busmod.KvMirror(kv, Counter)
        seen: list[str] = []

        async def handle(event: ImageGone, delivery: busmod.Delivery) -> None:
            seen.append(event.node)

        routes = {subjects.IMAGE_GONE: busmod.Route(ImageGone, handle)}
        tasks = [
            asyncio.create_task(
                busmod.consume(
                    bus, service="test", durable="restart", routes=routes, settings=FAST, stop=stop, pull_expires_s=1
                )
            ),
            asyncio.create_task(mirror.follow(stop)),
        ]
        await bus.publish(subjects.IMAGE_GONE, gone("before"), msg_id="before")
        await _until(lambda: seen == ["before"] and mirror.ready)

        server.stop()
        server = embedded.start_nats(tmp_path, port)
        await _until(lambda: bus.nc.stats["reconnects"] >= 1 and bus.nc.is_connected, timeout_s=20)
        for _ in range(20):  # JetStream answers a moment after the server accepts connections
            try:
                await bus.publish(subjects.IMAGE_GONE, gone("after"), msg_id="after")
                break
            except Exception:
                await asyncio.sleep(0.5)
        revision = await kv.put("k", msgspec.json.encode(Counter(7)))
        await _until(lambda: seen == ["before", "after"], timeout_s=20)
        await _until(lambda: mirror.known("k") == (Counter(7), revision), timeout_s=30)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        stop.set()
        await bus.close()
        server.stop()


def _suspended_in(task: asyncio.Task[Any]) -> list[str]:
    """The coroutines a task is suspended in, outermost first (its `cr_await` chain, as a debugger shows it)."""
    names: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and getattr(awaited, "cr_frame", None) is not None:
        names.append(awaited.cr_frame.f_code.co_qualname)
        awaited = awaited.cr_await
    return names


async def test_an_event_handed_over_is_acked_when_its_future_resolves_and_redelivered_when_it_fails(
    bus: busmod.Bus,
) -> None:
    for i in range(3):
        await bus.publish(subjects.IMAGE_GONE, gone(f"node-{i}"), msg_id=f"later:{i}")
    held: list[tuple[str, int, asyncio.Future[None]]] = []
    arrived = asyncio.Event()

    async def handle(event: ImageGone, delivery: busmod.Delivery) -> busmod.Settled:
        later: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        held.append((event.node, delivery.deliveries, later))
        arrived.set()
        return later

    stop = asyncio.Event()
    routes = {subjects.IMAGE_GONE: busmod.Route(ImageGone, handle)}
    task = asyncio.create_task(
        busmod.consume(bus, service="test", durable="later", routes=routes, settings=FAST, stop=stop)
    )

    async def pending() -> tuple[int, int]:
        info = await bus.js.consumer_info(bus.settings.stream, "later")
        return info.num_ack_pending, info.num_pending

    for _ in range(100):  # all three are handed out although none is settled: their handler slots are free
        if len(held) == 3:
            break
        await asyncio.sleep(0.05)
    assert sorted((node, n) for node, n, _ in held) == [("node-0", 1), ("node-1", 1), ("node-2", 1)]
    assert await pending() == (3, 0)
    by_node = {node: later for node, _, later in held}
    by_node["node-0"].set_result(None)
    by_node["node-1"].set_exception(RuntimeError("the write failed"))
    for _ in range(100):  # node-1 comes back after the first backoff step
        if any(node == "node-1" and n == 2 for node, n, _ in held):
            break
        await asyncio.sleep(0.05)
    again = next(later for node, n, later in held if node == "node-1" and n == 2)
    again.set_result(None)
    for _ in range(100):
        if await pending() == (1, 0):
            break
        await asyncio.sleep(0.05)
    assert await pending() == (1, 0)  # node-2 is still held
    stop.set()  # the consumer waits for what it handed over before returning

    def draining() -> bool:  # stopped pulling, and awaiting the events handed over (asyncio.wait right in run())
        chain = _suspended_in(task)
        return "_PullConsumer.run" in chain and chain[chain.index("_PullConsumer.run") + 1 :][:1] == ["wait"]

    for _ in range(200):
        if draining():
            break
        await asyncio.sleep(0.05)
    assert draining(), _suspended_in(task)
    assert not task.done()
    by_node["node-2"].set_result(None)
    await asyncio.wait_for(task, 10)
    for _ in range(20):
        if await pending() == (0, 0):
            break
        await asyncio.sleep(0.05)
    assert await pending() == (0, 0)
    assert await dead_letters(bus, "test") == []


async def test_a_consumer_made_by_an_older_release_gets_the_new_ack_pending_limit(bus: busmod.Bus) -> None:
    """Upgrading changes max_ack_pending of a durable consumer that exists: the create is a create-or-update."""
    names = [subjects.IMAGE_GONE]
    await busmod.ensure_consumer(bus, "upgraded", names, msgspec.structs.replace(FAST, max_ack_pending=256))
    before = await bus.js.consumer_info(bus.settings.stream, "upgraded")
    await busmod.ensure_consumer(bus, "upgraded", names, msgspec.structs.replace(FAST, max_ack_pending=20_000))
    after = await bus.js.consumer_info(bus.settings.stream, "upgraded")
    assert (before.config.max_ack_pending, after.config.max_ack_pending) == (256, 20_000)
