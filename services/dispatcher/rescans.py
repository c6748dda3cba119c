"""Forced rescans (`podsweep rescan`): which digests a request names, and the request itself. Pure: no I/O, no clock.

A request only moves due times; the dispatcher still claims, batches and limits every scan it causes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import datetime

import msgspec

from schemas.events import RescanAccepted, RescanRequested
from schemas.refs import digest_hex
from schemas.state import DigestWorkloads


class BadRescanRequest(ValueError):
    """A rescan request that names nothing, or more than one kind of selection; the message says what to pass."""


def keys_in_namespace(docs: Iterable[DigestWorkloads], namespace: str) -> list[str]:
    """The digest keys (hex) that some workload in `namespace` has run, sorted."""
    return sorted({digest_hex(d.digest_ref) for d in docs if any(r.namespace == namespace for r in d.runs)})


def new_request_id() -> str:
    """A request id: a DNS label like scan ids (the reply's message id derives from it)."""
    return "rq-" + secrets.token_hex(12)


def rescan_request(
    *,
    cluster: str,
    request_id: str,
    digests: list[str],
    namespace: str | None,
    everything: bool,
    requested_by: str,
    reason: str,
    now: datetime,
) -> RescanRequested:
    """A validated RescanRequested: exactly one of digests, a namespace, or everything; refs checked by their types."""
    chosen = sum((bool(digests), namespace is not None, everything))
    if chosen != 1:
        raise BadRescanRequest("rescan: name digests (repo@sha256:<hex>), or --namespace NAME, or --all (exactly one)")
    fields = {
        "cluster": cluster,
        "request_id": request_id,
        "digests": digests,
        "namespace": namespace,
        "all": everything,
        "requested_by": requested_by,
        "reason": reason,
        "requested_at": now,
    }
    try:
        return msgspec.convert(fields, RescanRequested)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = text.rpartition(" - at ")[2] if " - at " in text else ""
        raise BadRescanRequest(f"rescan: {where or 'request'} is not valid: {text.split(' - at ')[0][:200]}") from None


def describe(answer: RescanAccepted) -> str:
    """One line for people: how many digests were made due, and the ones the dispatcher has never seen."""
    text = f"rescan {answer.request_id}: {answer.due} digest(s) due now"
    if answer.unknown:
        text += f"; never seen: {', '.join(answer.unknown)}"
    return text
