"""Labels and annotations on podsweep's scan Jobs: how the watcher and the parser find digest and scan id.

Values placed under these names are derived from validated digests and scan ids, never from user text.
"""

from __future__ import annotations

from typing import Literal

import msgspec

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "podsweep"
SCAN_ID_LABEL = "podsweep.io/scan-id"

DIGEST_REF_ANNOTATION = "podsweep.io/digest-ref"
RAW_KEY_ANNOTATION = "podsweep.io/raw-key"
SBOM_KEY_ANNOTATION = "podsweep.io/sbom-key"
MODE_ANNOTATION = "podsweep.io/mode"
NODE_ANNOTATION = "podsweep.io/node"

# The W3C traceparent of the dispatcher's span that created the Job, so the watcher's scan.* events continue the
# trace of the image.seen that caused the scan. Read only in its exact form (podsweep.telemetry.from_traceparent).
TRACEPARENT_ANNOTATION = "podsweep.io/traceparent"

JOB_ANNOTATIONS = (DIGEST_REF_ANNOTATION, RAW_KEY_ANNOTATION, SBOM_KEY_ANNOTATION, MODE_ANNOTATION, NODE_ANNOTATION)
# SBOM rescan Jobs (mode "sbom") hold a batch: a JSON list of {scan_id, digest_ref, raw_key} objects.
BATCH_ANNOTATION = "podsweep.io/batch"

# An SBOM rescan Job runs every item in one container of this name (`podsweep sbom-rescan`), which logs one JSON line
# per item it starts and per item that fails; a failed run's termination message is its log's tail, whose last such
# line names the failed item (services/watcher/jobstatus.py).
RESCAN_CONTAINER = "rescan"
RESCAN_ITEM_EVENT = "sbom rescan item"


class RescanItemLine(msgspec.Struct, frozen=True):
    """One line of that log (other fields ignored)."""

    event: Literal["sbom rescan item"]
    item: int
    state: Literal["running", "failed", "done"]


_item_line = msgspec.json.Decoder(RescanItemLine)


def failed_rescan_item(log_tail: str, batch_size: int) -> int | None:
    """The item a failed `sbom-rescan` run was on: from the last item line of its log tail (running or failed).
    A line that does not decode, or names an item outside the batch, is not believed; "done" names none."""
    for text in reversed(log_tail.splitlines()[-64:]):
        try:
            line = _item_line.decode(text)
        except msgspec.DecodeError:
            continue
        if line.state == "done" or not 0 <= line.item < batch_size:
            return None
        return line.item
    return None
