"""What a JetStream stream holds on one subject, read up to its last message at the time of the call.

The end of the read is that message's stream sequence, looked up first: a positive signal, never a pause in
delivery taken to mean there is nothing more."""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from podsweep import bus as busmod
from podsweep.config import NatsSettings
from schemas import subjects
from schemas.events import ReportStored


async def stored_messages(js: JetStreamContext, stream: str, subject: str, timeout_s: float = 30.0) -> list[Msg]:
    """Every message stored on `subject` (no wildcards) in `stream`, in stream order, up to the last one now."""
    try:
        last = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return []
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    out: list[Msg] = []
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout_s)
            out.append(msg)
            if msg.metadata.sequence.stream >= (last.seq or 0):
                return out
    finally:
        await sub.unsubscribe()


async def read_stored(settings: NatsSettings) -> list[ReportStored]:
    """Every report.stored on the events stream, up to the last one stored when called."""
    bus = await busmod.connect(settings, "harness-streams")
    try:
        messages = await stored_messages(bus.js, settings.stream, bus.subject(subjects.REPORT_STORED))
    finally:
        await bus.close()
    return [msgspec.json.decode(msg.data, type=ReportStored) for msg in messages]
