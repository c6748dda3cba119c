"""NATS permissions from the services' declarations (podsweep/natsaccess.py): pure, no server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client as NatsClient

from podsweep import bus as busmod
from podsweep import natsaccess
from podsweep.config import NatsSettings
from podsweep.natsaccess import Bucket, Durable, Names, NatsAccess
from podsweep.operatoraccess import OPERATOR
from podsweep_cli import services
from schemas import subjects
from schemas.state import NOTIFY_BUCKET

NAMES = Names(root="t.root", stream="S1", kv_prefix="k")
SERVICES = services.SERVICES


def test_a_durable_consumer_gets_its_own_consumer_calls_and_dead_letters() -> None:
    access = NatsAccess(service="svc", publishes=("a.b",), durables=(Durable("svc", ("x.y", "x.z")),))
    assert natsaccess.permissions(access, NAMES).publish == (
        "t.root.a.b",
        "t.root.dead.svc",
        "$JS.API.STREAM.INFO.S1",
        "$JS.API.STREAM.CREATE.S1",
        "$JS.API.CONSUMER.DURABLE.CREATE.S1.svc",
        "$JS.API.CONSUMER.INFO.S1.svc",
        "$JS.API.CONSUMER.MSG.NEXT.S1.svc",
        "$JS.ACK.S1.svc.>",
    )


def test_a_publisher_alone_gets_its_subjects_and_the_stream_declaration() -> None:
    access = NatsAccess(service="pub", publishes=("a.b",))
    assert natsaccess.permissions(access, NAMES) == natsaccess.Permissions(
        publish=("t.root.a.b", "$JS.API.STREAM.INFO.S1", "$JS.API.STREAM.CREATE.S1"),
        subscribe=("_INBOX_pub.>",),
    )


@pytest.mark.parametrize(
    ("bucket", "writes_allowed"),
    [pytest.param(Bucket("b"), True, id="read-write"), pytest.param(Bucket("b", writes=False), False, id="read-only")],
)
def test_a_bucket_is_read_and_watched_and_written_only_when_declared_so(bucket: Bucket, writes_allowed: bool) -> None:
    publish = natsaccess.permissions(NatsAccess(service="s", buckets=(bucket,)), NAMES).publish
    assert "$JS.API.DIRECT.GET.KV_k-b.>" in publish
    assert "$JS.API.CONSUMER.CREATE.KV_k-b" in publish
    assert "$JS.FC.KV_k-b.>" in publish
    assert ("$KV.k-b.>" in publish) is writes_allowed


def test_the_outbox_owner_may_use_any_consumer_of_the_outbox_stream_and_no_other() -> None:
    publish = natsaccess.permissions(NatsAccess(service="n", outbox=True), NAMES).publish
    outbox = subjects.outbox_stream("S1")
    assert f"{subjects.outbox_root('t.root')}.*" in publish
    assert f"$JS.API.CONSUMER.MSG.NEXT.{outbox}.*" in publish
    assert not [p for p in publish if p.startswith("$JS.API.CONSUMER.") and ".S1." in p]


@pytest.mark.parametrize("service", SERVICES)
def test_no_declared_service_may_delete_purge_or_update_or_read_every_inbox(service: str) -> None:
    allowed = natsaccess.permissions(services.nats_access(service), Names())
    for subject in allowed.publish:
        for verb in ("DELETE", "PURGE", "UPDATE", "$JS.API.>", "$JS.API.INFO", "SNAPSHOT", "RESTORE"):
            assert verb not in subject, subject
        assert subject.count(">") <= 1 and not subject.startswith(">"), subject
    assert allowed.subscribe == (f"_INBOX_{service}.>",)


@pytest.mark.parametrize("service", SERVICES)
def test_a_declared_consumer_reads_only_events_of_the_stream(service: str) -> None:
    access = services.nats_access(service)
    events = {
        value
        for name, value in vars(subjects).items()
        if name.isupper() and isinstance(value, str) and "." in value and name != "DEFAULT_ROOT"
    }
    for durable in access.durables:
        assert set(durable.subjects) <= events, durable
    assert set(access.replays) <= events
    assert set(access.publishes) <= events


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        pytest.param("report.stored", True, id="declared"),
        pytest.param("dead.parser", True, id="own-dead-letters-with-a-consumer"),
        pytest.param("dead.notifier", False, id="anothers-dead-letters"),
        pytest.param("scan.completed", False, id="undeclared"),
    ],
)
def test_may_publish(name: str, allowed: bool) -> None:
    parser = NatsAccess(service="parser", publishes=("report.stored",), durables=(Durable("parser", ("x.y",)),))
    assert parser.may_publish(name) is allowed


def test_a_service_without_a_consumer_has_no_dead_letters() -> None:
    assert not NatsAccess(service="watcher", publishes=("image.seen",)).may_publish("dead.watcher")


@pytest.mark.parametrize(
    ("name", "prefix"),
    [("watcher", "_INBOX_watcher"), ("a.b c>*", "_INBOX_a_b_c__"), ("notifier-2", "_INBOX_notifier-2")],
)
def test_inbox_prefix_is_one_token_of_safe_characters(name: str, prefix: str) -> None:
    assert natsaccess.inbox_prefix(name) == prefix


def test_accounts_conf_has_one_user_per_service_with_its_password_variable_and_its_subjects() -> None:
    declarations = [services.nats_access(s) for s in SERVICES]
    text = natsaccess.accounts_conf(declarations, Names())
    assert text.count("        user: ") == len(SERVICES)
    for access in declarations:
        assert (
            f"        user: {access.service}\n        password: $PODSWEEP_NATS_{access.service.upper()}_PASSWORD"
            in text
        )
        block = text.split(f"        user: {access.service}\n", 1)[1].split("        user: ", 1)[0]
        for subject in natsaccess.permissions(access, Names()).publish:
            assert f'"{subject}"' in block
    assert ",\n            ]" not in text  # no trailing comma before a list's end


def test_a_replaying_service_gets_consumers_on_the_replay_stream_only() -> None:
    """An unnamed-consumer create may name any consumer in its body: allowed on the events stream, it would let the
    replaying service redefine the other services' durables."""
    publish = natsaccess.permissions(NatsAccess(service="a", replays=("image.seen",)), NAMES).publish
    replay = subjects.replay_stream("S1")
    assert f"$JS.API.CONSUMER.CREATE.{replay}" in publish
    assert not [p for p in publish if p.startswith("$JS.API.CONSUMER.") and (p.endswith(".S1") or ".S1." in p)]


LEAF = Names(root="t.root", stream="S1", kv_prefix="k", domain="hub")


def test_a_leafs_user_names_the_hubs_domain_in_every_api_call_and_bucket_write() -> None:
    access = NatsAccess(service="svc", publishes=("a.b",), durables=(Durable("svc", ("x.y",)),), buckets=(Bucket("b"),))
    publish = natsaccess.permissions(access, LEAF).publish
    assert [s for s in publish if s.startswith("$JS.API")] == []
    assert "$JS.hub.API.CONSUMER.MSG.NEXT.S1.svc" in publish
    assert "$JS.hub.API.DIRECT.GET.KV_k-b.>" in publish
    # writes cross the leaf connection only under the domain's subject; acks come in either form
    assert ("$JS.hub.API.$KV.k-b.>" in publish, "$KV.k-b.>" in publish) == (True, False)
    assert {"$JS.ACK.S1.svc.>", "$JS.ACK.hub.*.S1.svc.>"} <= set(publish)


def test_a_leafs_accounts_conf_enables_no_jetstream_of_its_own() -> None:
    declarations = [services.nats_access(name) for name in SERVICES]
    assert "jetstream: enabled" in natsaccess.accounts_conf(declarations, NAMES)
    leaf = natsaccess.accounts_conf(declarations, LEAF)
    assert "jetstream: enabled" not in leaf
    assert '"$JS.hub.API.STREAM.INFO.S1"' in leaf


def test_a_listener_may_subscribe_to_what_it_listens_to_beside_its_inbox_and_publishes_nothing_for_it() -> None:
    access = NatsAccess(service="op", listens=("a.b",))
    allowed = natsaccess.permissions(access, NAMES)
    assert allowed.subscribe == ("_INBOX_op.>", "t.root.a.b")
    assert not any("a.b" in subject for subject in allowed.publish)


def test_an_inspected_durable_gets_its_info_in_every_cluster_and_nothing_else() -> None:
    access = NatsAccess(service="op", inspects=(Durable("d", (), per_cluster=True), Durable("p", ())))
    fleet = Names(root="t.root", stream="S1", kv_prefix="k", clusters=("default", "east"))
    assert natsaccess.permissions(access, fleet).publish == (
        "$JS.API.STREAM.INFO.S1",
        "$JS.API.STREAM.CREATE.S1",
        "$JS.API.CONSUMER.INFO.S1.d",
        "$JS.API.CONSUMER.INFO.S1.d_east",
        "$JS.API.CONSUMER.INFO.S1.p",
    )
    assert [access.may_inspect(n) for n in ("d", "d_east", "p", "p_east", "x")] == [True, True, True, False, False]


@pytest.mark.parametrize(
    ("call", "named"),
    [
        pytest.param(lambda bus: bus.listen(subjects.IMAGE_SEEN, _ignore), "listens to image.seen", id="listen"),
        pytest.param(lambda bus: bus.consumer_info("watcher"), "durable watcher", id="consumer-info"),
        pytest.param(lambda bus: bus.kv(NOTIFY_BUCKET), f"bucket {NOTIFY_BUCKET}", id="kv"),
        pytest.param(
            lambda bus: bus.publish(subjects.IMAGE_SEEN, Bucket("x"), msg_id="x"), "publishes image.seen", id="publish"
        ),
        pytest.param(lambda bus: busmod.ensure_stream(bus), "declares the events stream", id="stream"),
    ],
)
async def test_the_operator_bus_refuses_what_its_declaration_does_not_list(
    call: Callable[[busmod.Bus], Awaitable[object]], named: str
) -> None:
    """Refused before anything is sent: the client is never connected."""
    bus = busmod.Bus(NatsClient(), NatsSettings(), OPERATOR)
    with pytest.raises(natsaccess.Undeclared, match=f"{named}.*podsweep/operatoraccess.py"):
        await call(bus)


def test_the_operator_inspects_the_durables_the_services_declare() -> None:
    declared = {(d.name, d.per_cluster) for s in SERVICES for d in services.nats_access(s).durables}
    assert {(d.name, d.per_cluster) for d in OPERATOR.inspects} == declared


def test_the_operator_publishes_and_listens_to_what_the_dispatcher_consumes_and_answers() -> None:
    dispatcher = services.nats_access("dispatcher")
    consumed = {name for d in dispatcher.durables for name in d.subjects}
    assert set(OPERATOR.publishes) <= consumed
    assert set(OPERATOR.listens) <= set(dispatcher.publishes)
    assert all(not b.writes for b in OPERATOR.buckets), "the operator writes no state"
    assert not OPERATOR.durables and not OPERATOR.replays and not OPERATOR.outbox


def test_a_user_that_creates_nothing_may_not_create_the_stream_or_a_bucket() -> None:
    access = NatsAccess(service="op", publishes=("a.b",), creates=False)
    assert natsaccess.permissions(access, NAMES).publish == ("t.root.a.b",)
    reader = NatsAccess(service="op", buckets=(Bucket("scans", writes=False),), creates=False)
    allowed = natsaccess.permissions(reader, NAMES).publish
    assert any("DIRECT.GET.KV_" in s for s in allowed) and not any("STREAM.CREATE" in s for s in allowed)
    assert not any("STREAM.CREATE" in s for s in natsaccess.permissions(OPERATOR, NAMES).publish)


def test_accounts_conf_has_the_operator_user() -> None:
    text = natsaccess.accounts_conf([OPERATOR], NAMES)
    assert "user: operator\n        password: $PODSWEEP_NATS_OPERATOR_PASSWORD" in text
    assert 'allow: ["_INBOX_operator.>", "t.root.rescan.accepted"]' in text


async def _ignore(msg: object) -> None:
    return None
