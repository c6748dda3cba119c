"""NATS subject names, relative to a configurable root (default "podsweep").

The root lets two installations, or two tests, share one NATS server without seeing each other's events.
"""

from __future__ import annotations

IMAGE_SEEN = "image.seen"
IMAGE_GONE = "image.gone"
SCAN_STARTED = "scan.started"
SCAN_COMPLETED = "scan.completed"
SCAN_FAILED = "scan.failed"
REPORT_STORED = "report.stored"
REPORT_QUARANTINED = "report.quarantined"
REPORT_REACHED = "report.reached"
ALERT_SENT = "alert.sent"
ALERT_FAILED = "alert.failed"
RESCAN_REQUESTED = "rescan.requested"
RESCAN_ACCEPTED = "rescan.accepted"
DB_UPDATED = "db.updated"  # the vulnerability DB the scans use changed (the dispatcher polls the Trivy server)
ADMISSION_DECIDED = "admission.decided"
DEAD = "dead"  # dead letters: <root>.dead.<service>
OUTBOX = "outbox"  # the notifier's per-destination outbox: <root>-outbox.<destination>, see outbox_root

DEFAULT_ROOT = "podsweep"


def subject(root: str, name: str) -> str:
    return f"{root}.{name}"


def dead_letter_subject(root: str, service: str) -> str:
    return f"{root}.{DEAD}.{service}"


def outbox_root(root: str) -> str:
    """The root of the notifier's outbox subjects, `<root>-outbox.<destination>` (destination names are DNS labels:
    no dots). Outside `<root>.>` on purpose: the outbox is a stream of its own (`outbox_stream`) whose consumers,
    one per destination, only the notifier may create or read, which a NATS allow-list can say with a wildcard
    for the consumer name on that stream alone."""
    return f"{root}-{OUTBOX}"


def replay_stream(stream: str) -> str:
    """The admission gate's copy of the events it replays (`PODSWEEP` -> `PODSWEEP_REPLAY`), sourced by the server
    from the events stream: its consumers are the gate's alone, and it holds no other event."""
    return f"{stream}_REPLAY"


def outbox_stream(stream: str) -> str:
    """The outbox stream's name, beside the events stream's (`PODSWEEP` -> `PODSWEEP_OUTBOX`)."""
    return f"{stream}_{OUTBOX.upper()}"
