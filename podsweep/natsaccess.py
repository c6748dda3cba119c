"""What a service does on NATS, declared once, and the NATS permissions that follow from it.

Each service declares its `NATS = NatsAccess(...)` in `services/<name>/main.py` from the names in schemas/ (subjects,
buckets); its Bus refuses anything the declaration does not list, and `podsweep deploy nats-accounts` writes
deploy/base/nats/accounts.conf from the same declarations, so the code and the allow-lists cannot drift apart.
Pure: builds names and text, never connects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from schemas import subjects

DEFAULT_CLUSTER = "default"  # schemas.state.DEFAULT_CLUSTER (natsaccess does not import schemas.state)


class Durable(msgspec.Struct, frozen=True):
    """A durable pull consumer on the events stream: its name and the subjects it reads (relative to the root).

    `per_cluster`: each cluster of a fleet has its own (a service that talks to its cluster's API server), named
    by `durable_name`."""

    name: str
    subjects: tuple[str, ...]
    per_cluster: bool = False


def durable_name(durable: Durable, cluster: str) -> str:
    """The consumer's name for `cluster`: `<name>_<cluster>` for a per-cluster durable, except in the default cluster,
    which keeps the name a single-cluster installation always had (its consumer and position survive an upgrade)."""
    if not durable.per_cluster or cluster == DEFAULT_CLUSTER:
        return durable.name
    return f"{durable.name}_{cluster}"


class Bucket(msgspec.Struct, frozen=True):
    """A KV bucket (relative to the KV prefix: schemas/state.py) the service opens; `writes` False: it only reads."""

    name: str
    writes: bool = True


class NatsAccess(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one service does on NATS.

    `publishes`: event subjects relative to the root (dead letters, `dead.<service>`, come with any consumer);
    `durables`: its durable pull consumers on the events stream; `buckets`: the KV buckets it opens;
    `replays`: subjects it follows with ordered consumers of its own (ephemeral, unacknowledged: the admission view);
    `outbox`: it owns the outbox stream (schemas/subjects.py, outbox_stream) and every consumer on it;
    `listens`: event subjects it hears with a plain (core NATS) subscription, as they are published, without a consumer
    (`podsweep rescan` waiting for rescan.accepted); `inspects`: other services' durables whose lag it reads
    (consumer info only: `podsweep status`); `creates`: it creates the events stream and its KV buckets when missing,
    as every service does when it starts (the operator commands only use what the services made).
    """

    service: str
    publishes: tuple[str, ...] = ()
    durables: tuple[Durable, ...] = ()
    buckets: tuple[Bucket, ...] = ()
    replays: tuple[str, ...] = ()
    outbox: bool = False
    listens: tuple[str, ...] = ()
    inspects: tuple[Durable, ...] = ()
    creates: bool = True

    @property
    def consumes(self) -> bool:
        return bool(self.durables) or self.outbox

    def may_publish(self, name: str) -> bool:
        """Whether this service may publish the event subject `name` (relative to the root)."""
        return name in self.publishes or (self.consumes and name == dead_letters(self.service))

    def durable(self, name: str) -> Durable | None:
        """The durable consumer named `name` (a per-cluster durable under any cluster's name)."""
        return _named(self.durables, name)

    def may_inspect(self, name: str) -> bool:
        """Whether this user may read the info (lag) of the durable named `name`: its own, or one it inspects."""
        return _named(self.durables, name) is not None or _named(self.inspects, name) is not None

    def bucket(self, name: str) -> Bucket | None:
        return next((b for b in self.buckets if b.name == name), None)


def _named(durables: Sequence[Durable], name: str) -> Durable | None:
    for d in durables:
        if d.name == name or (d.per_cluster and name.startswith(f"{d.name}_")):
            return d
    return None


class Undeclared(PermissionError):
    """The code did something on NATS its service's declaration does not list (a bug: the deployed NATS refuses it)."""


# Who declares what, when it is not a service (services/<name>/main.py): the operator commands' user.
DECLARED_IN = {"operator": "podsweep/operatoraccess.py"}


def declared_in(service: str) -> str:
    return DECLARED_IN.get(service, f"services/{service}/main.py")


def refuse(access: NatsAccess, what: str) -> Undeclared:
    return Undeclared(
        f"nats: {access.service} {what}, which its NATS declaration (NATS in {declared_in(access.service)}) "
        "does not list: add it there, then run `podsweep deploy nats-accounts` so deploy/base/nats/accounts.conf "
        "allows it"
    )


def dead_letters(service: str) -> str:
    return f"{subjects.DEAD}.{service}"


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def inbox_prefix(name: str) -> str:
    """The inbox prefix of a connection named `name`: replies and pulled messages arrive under it, and each service's
    NATS user may subscribe to its own prefix only (no service reads another's replies)."""
    return f"_INBOX_{_UNSAFE.sub('_', name)}"


class Names(msgspec.Struct, frozen=True, kw_only=True):
    """The installation's names (NatsSettings: subject root, stream, KV prefix) the permissions are written for, and
    the JetStream domain its clients name (`domain`: a leaf server's users reach the hub's JetStream through it)."""

    root: str = subjects.DEFAULT_ROOT
    stream: str = "PODSWEEP"
    kv_prefix: str = "podsweep"
    domain: str = ""
    clusters: tuple[str, ...] = (DEFAULT_CLUSTER,)  # a fleet: every cluster that reports into this NATS

    @property
    def api(self) -> str:
        """The JetStream API prefix the clients use: `$JS.API`, or `$JS.<domain>.API`."""
        return f"$JS.{self.domain}.API" if self.domain else "$JS.API"


class Permissions(msgspec.Struct, frozen=True):
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


class Section(msgspec.Struct, frozen=True):
    """Some of a user's publish permissions, with what they are for (a comment in the generated file)."""

    why: str
    subjects: tuple[str, ...]


def sections(access: NatsAccess, names: Names) -> list[Section]:
    """The subjects `access` may publish to, grouped by what they are for, and nothing else.

    Every JetStream API call is a request on a subject naming its stream (and consumer): what is not listed is
    denied, including deleting, purging or updating a stream and any consumer but the service's own.
    """
    stream = names.stream
    api = names.api
    events = [subjects.subject(names.root, n) for n in access.publishes]
    if access.consumes:
        events.append(subjects.subject(names.root, dead_letters(access.service)))
    out = [Section("the events it publishes", tuple(events))]
    if access.creates:
        out.append(
            Section(
                f"the {stream} stream: read it, create it when missing (never update it)",
                (f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.CREATE.{stream}"),
            )
        )
    for durable in access.durables:
        on = ", ".join(durable.subjects)
        named = dict.fromkeys(durable_name(durable, cluster) for cluster in names.clusters)
        out.extend(Section(f"its durable consumer {name} on {on}", _durable(stream, name, names)) for name in named)
    if access.replays:
        replay = subjects.replay_stream(stream)
        out.append(
            Section(
                f"replaying {', '.join(access.replays)}: ordered (unnamed, ephemeral) consumers on {replay}, a copy of "
                f"those events of {stream} that the server makes, no consumer on {stream}",
                (
                    f"{api}.STREAM.INFO.{replay}",
                    f"{api}.STREAM.CREATE.{replay}",
                    f"{api}.CONSUMER.CREATE.{replay}",
                    f"{api}.CONSUMER.INFO.{replay}.*",
                    f"$JS.FC.{replay}.>",
                ),
            )
        )
    if access.outbox:
        outbox = subjects.outbox_stream(stream)
        out.append(
            Section(
                f"its outbox, a stream of its own ({outbox}): a durable consumer per destination, named after it",
                (
                    f"{subjects.outbox_root(names.root)}.*",
                    f"{api}.STREAM.INFO.{outbox}",
                    f"{api}.STREAM.CREATE.{outbox}",
                    *_durable(outbox, "*", names),
                ),
            )
        )
    for durable in access.inspects:
        named = dict.fromkeys(durable_name(durable, cluster) for cluster in names.clusters)
        out.append(
            Section(
                f"the lag of {durable.name}'s durable consumer: its info, nothing else",
                tuple(f"{api}.CONSUMER.INFO.{stream}.{name}" for name in named),
            )
        )
    for bucket in access.buckets:
        kv = f"{names.kv_prefix}-{bucket.name}"
        reads = (
            f"{api}.STREAM.INFO.KV_{kv}",
            *((f"{api}.STREAM.CREATE.KV_{kv}",) if access.creates else ()),
            f"{api}.DIRECT.GET.KV_{kv}.>",
            f"{api}.STREAM.MSG.GET.KV_{kv}",  # a bucket made without direct gets
            f"{api}.CONSUMER.CREATE.KV_{kv}",  # watches: ordered consumers,
            f"{api}.CONSUMER.INFO.KV_{kv}.*",  # which nats-py's watch asks how much is pending
            f"$JS.FC.KV_{kv}.>",  # their flow control
        )
        if bucket.writes:
            # Writes from a leaf name the hub's domain (bus.kv_put_if): only that subject crosses the leaf connection.
            writes = f"{api}.$KV.{kv}.>" if names.domain else f"$KV.{kv}.>"
            out.append(Section(f"KV bucket {kv}: read and write", (*reads, writes)))
        else:
            out.append(Section(f"KV bucket {kv}: read only", reads))
    return [section for section in out if section.subjects]


def permissions(access: NatsAccess, names: Names) -> Permissions:
    """Everything `access` may publish to and subscribe to: its sections, its own inbox prefix and what it listens to."""
    publish = tuple(subject for section in sections(access, names) for subject in section.subjects)
    listens = tuple(subjects.subject(names.root, n) for n in access.listens)
    return Permissions(publish=publish, subscribe=(f"{inbox_prefix(access.service)}.>", *listens))


def _durable(stream: str, name: str, names: Names) -> tuple[str, ...]:
    acks: tuple[str, ...] = (f"$JS.ACK.{stream}.{name}.>",)
    if names.domain:  # deliveries from a domain's JetStream may carry its name and the account's hash after ACK
        acks += (f"$JS.ACK.{names.domain}.*.{stream}.{name}.>",)
    return (
        f"{names.api}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
        f"{names.api}.CONSUMER.INFO.{stream}.{name}",
        f"{names.api}.CONSUMER.MSG.NEXT.{stream}.{name}",
        *acks,
    )


def password_variable(service: str) -> str:
    """The nats-server's environment variable with this user's password (deploy/base/nats.yaml)."""
    return f"PODSWEEP_NATS_{service.upper()}_PASSWORD"


HEADER = """\
# GENERATED by `podsweep deploy nats-accounts` from the NATS declarations of the services (NATS in
# services/<name>/main.py, podsweep/natsaccess.py): do not edit; change the declaration and run it again.
# `podsweep deploy nats-accounts --check` (in scripts/test.sh) fails when this file is stale.
#
# One user per podsweep service, and `operator` for the commands people and CronJobs run (podsweep rescan, status,
# check: podsweep/operatoraccess.py), all in the PODSWEEP account (they share the events stream and the KV buckets).
# Passwords come from the environment (the nats-<user> Secrets). Anything not listed is denied: no user may delete,
# purge or update a stream, or touch a consumer but its own. A user subscribes to its own inbox prefix (and to the
# events it listens to) only.
"""


LEAF_HEADER = """\
#
# For a leaf server (deploy/nats-leaf/leaf.conf): the same users, whose JetStream API requests name the hub's domain
# {domain!r} (the services' nats.domain), answered by the hub through the leaf connection. No JetStream here.
"""


def accounts_conf(declarations: Sequence[NatsAccess], names: Names) -> str:
    """accounts.conf for these services, one user each, in the given order; with `names.domain`, a leaf server's."""
    if names.domain:
        lines = [HEADER + LEAF_HEADER.format(domain=names.domain), "accounts {", "  PODSWEEP {", "    users: ["]
    else:
        lines = [HEADER, "accounts {", "  PODSWEEP {", "    jetstream: enabled", "    users: ["]
    for access in declarations:
        allowed = permissions(access, names)
        publish: list[str] = []
        for section in sections(access, names):
            publish.append(f"              # {section.why}")
            publish += [f'              "{subject}",' for subject in section.subjects]
        publish[-1] = publish[-1].rstrip(",")
        lines += [
            "      {",
            f"        user: {access.service}",
            f"        password: ${password_variable(access.service)}",
            "        permissions: {",
            "          publish: {",
            "            allow: [",
            *publish,
            "            ]",
            "          }",
            "          subscribe: {",
            f"            allow: [{', '.join(f'{chr(34)}{s}{chr(34)}' for s in allowed.subscribe)}]",
            "          }",
            "        }",
            "      }",
        ]
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)
