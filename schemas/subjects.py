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
ALERT_SENT = "alert.sent"
ALERT_FAILED = "alert.failed"
RESCAN_REQUESTED = "rescan.requested"
RESCAN_ACCEPTED = "rescan.accepted"
ADMISSION_DECIDED = "admission.decided"
DEAD = "dead"  # dead letters: <root>.dead.<service>
OUTBOX = "outbox"  # the notifier's per-destination outbox: <root>.outbox.<destination>

DEFAULT_ROOT = "podsweep"


def subject(root: str, name: str) -> str:
    return f"{root}.{name}"


def dead_letter_subject(root: str, service: str) -> str:
    return f"{root}.{DEAD}.{service}"


def outbox(destination: str) -> str:
    """The outbox of one alert destination, relative to the root (destination names are DNS labels: no dots)."""
    return f"{OUTBOX}.{destination}"
