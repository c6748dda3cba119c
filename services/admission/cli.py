"""`podsweep report admissions`: the admission gate's recent decisions, read back from the stream.

Reads `admission.decided` through a short-lived ordered consumer (nothing is created that outlives the command, and
nothing is written). Exit 2 means unusable configuration or an unreachable NATS.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.console import Console
from rich.table import Table

from podsweep import bus as busmod
from podsweep import discovery
from podsweep.config import ConfigError, NatsSettings
from schemas import subjects
from schemas.admission import AdmissionDecided
from services.admission.decide import shown

BAD_INPUT = 2
_DURATION_RE = re.compile(r"^(\d{1,6})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_decoder = msgspec.json.Decoder(AdmissionDecided)
_encoder = msgspec.json.Encoder()


def parse_duration(text: str) -> timedelta:
    match = _DURATION_RE.match(text.strip())
    if match is None:
        raise ValueError(f"--since {text[:40]!r} is not a duration (e.g. 30m, 24h, 7d)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


async def recent(
    settings: NatsSettings, since: datetime, limit: int, namespace: str | None = None, verdict: str | None = None
) -> list[AdmissionDecided]:
    """The last `limit` decisions since `since` (oldest first), optionally of one namespace or verdict."""
    bus = await busmod.connect(settings, "report")
    found: list[AdmissionDecided] = []
    try:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
        sub = await bus.js.subscribe(
            bus.subject(subjects.ADMISSION_DECIDED), ordered_consumer=True, config=config, stream=settings.stream
        )
        try:
            while True:
                try:  # a push consumer: what is pending was sent already, so silence means the end
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    break
                try:
                    event = _decoder.decode(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if (namespace is None or event.namespace == namespace) and (
                    verdict is None or event.verdict == verdict
                ):
                    found.append(event)
                    del found[:-limit]
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
    finally:
        await bus.close()
    return found


def admissions_command(
    since: Annotated[str, typer.Option("--since", help="How far back: 30m, 24h, 7d.")] = "24h",
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000, help="At most this many, newest kept.")] = 50,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Only this namespace.")] = None,
    verdict: Annotated[
        str | None, typer.Option("--verdict", help="Only deny, warn, unknown, suppressed or bypass.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per decision, one per line.")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A TOML or YAML settings file (also PODSWEEP_CONFIG).")
    ] = None,
) -> None:
    """Recent admission decisions that were not a plain allow: who was denied or warned, and why."""
    try:
        settings = discovery.load_for_cli(config)
        window = parse_duration(since)
    except (ConfigError, ValueError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(BAD_INPUT) from None
    if verdict is not None and verdict not in ("deny", "warn", "unknown", "suppressed", "bypass"):
        typer.echo(f"--verdict {verdict[:40]!r}: choose deny, warn, unknown, suppressed or bypass", err=True)
        raise typer.Exit(BAD_INPUT)
    if not settings.nats.url:
        typer.echo(
            "config: nats.url (PODSWEEP_NATS_URL) is required to read admission decisions, "
            "or run this in the directory of a running `podsweep up`",
            err=True,
        )
        raise typer.Exit(BAD_INPUT)
    try:
        decided = asyncio.run(recent(settings.nats, datetime.now(UTC) - window, limit, namespace, verdict))
    except ConnectionError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(BAD_INPUT) from None
    if as_json:
        for event in decided:
            typer.echo(_encoder.encode(event).decode())
        return
    if not decided:
        typer.echo(f"no admission decisions in the last {since}")
        return
    table = Table(title=f"{len(decided)} admission decisions (last {since})", title_justify="left")
    # "requested by" is the request's own claim (request.userInfo as the apiserver sent it), not checked here.
    for column in ("time", "namespace", "object", "requested by (per request)", "verdict", "images", "why"):
        table.add_column(column, overflow="fold")
    for event in decided:
        images = ", ".join(f"{i.image} ({i.verdict})" for i in event.images if i.verdict != "clean")
        who = f" — bypass by {event.bypass.owner}" if event.bypass is not None else ""
        table.add_row(
            event.decided_at.strftime("%Y-%m-%d %H:%M:%S"),
            event.namespace,
            shown(f"{event.kind}/{event.name or event.workload.name}", 120),
            shown(event.requester.username if event.requester is not None else event.user, 80),
            event.verdict + ("" if event.allowed else " (refused)"),
            shown(images, 300),
            shown(event.reason, 300) + who,
        )
    Console(soft_wrap=True).print(table)
