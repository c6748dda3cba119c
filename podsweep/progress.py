"""What `podsweep up` prints while it runs: the first sweep's progress, then changes, from the same reading as
`podsweep status`. `line` is pure; `follow` polls and prints. Never decides anything for the services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec

from podsweep import aio, logs
from podsweep import bus as busmod
from podsweep.config import Settings
from podsweep.status import StatusReport, collect

log = logs.get("podsweep.progress")

UNFINISHED = ("pending", "running")


class Sweep(msgspec.Struct, frozen=True):
    """What was last printed, and whether the first sweep (every digest seen so far scanned or given up) ended."""

    text: str = ""
    first_done: bool = False


def line(report: StatusReport, last: Sweep, elapsed_s: float, browse: str) -> tuple[str | None, Sweep]:
    """The line to print for this reading (None when nothing changed) and what to remember."""
    states = report.by_state
    unfinished = sum(states.get(s, 0) for s in UNFINISHED)
    failed = states.get("failed", 0) + states.get("not_scanned", 0)
    lag = sum(c.pending + c.in_flight for c in report.consumers)
    text = (
        f"{report.digests} digests: {states.get('done', 0)} scanned, {states.get('running', 0)} scanning, "
        f"{states.get('pending', 0)} waiting, {failed} failed{_reasons(report)}; {lag} events queued"
    )
    if not last.first_done and report.digests and unfinished == 0 and lag == 0:
        return f"first sweep done in {elapsed_s:.0f}s — {text}. Browse: {browse}", Sweep(text, first_done=True)
    if text == last.text:
        return None, last
    prefix = "sweep" if last.first_done else "first sweep"
    return f"{prefix}: {text}", Sweep(text, last.first_done)


def _reasons(report: StatusReport) -> str:
    """ " (PodCreateRejected 3, ReportMissing 1)": why the failed digests failed, as `podsweep status` counts them."""
    if not report.failed_by_reason:
        return ""
    return " (" + ", ".join(f"{reason} {n}" for reason, n in report.failed_by_reason.items()) + ")"


async def follow(settings: Settings, stop: asyncio.Event, say: Callable[[str], object], every_s: float = 2.0) -> None:
    """Print progress until `stop`; a reading that fails is logged and retried, never fatal to `up`."""
    started = time.monotonic()
    browse = (
        f"`podsweep report ls`, `podsweep report show <image>`; index at s3://{settings.s3.bucket}/index/index.html"
    )
    last = Sweep()
    bus: busmod.Bus | None = None
    try:
        while not stop.is_set():
            try:
                bus = bus or await busmod.connect(settings.nats, "progress")
                text, last = line(await collect(bus), last, time.monotonic() - started, browse)
                if text is not None:
                    say(text)
            except Exception as exc:  # the services report their own errors; progress only waits for them
                log.debug("progress reading failed", error=str(exc)[:200])
            await aio.sleep_unless(stop, every_s)
    finally:
        if bus is not None:
            await bus.close()
