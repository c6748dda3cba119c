"""What to POST to each destination kind for one outbox entry: URL, headers, body or multipart form.

Pure: secrets, the raw Trivy file and the time are arguments; never does HTTP or reads files. The request it
builds holds secrets (URLs, tokens), so it is never logged; `describe` names a destination safely.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from podsweep.policy import (
    DefectDojoDestination,
    Destination,
    SlackDestination,
    TeamsDestination,
    WebhookDestination,
)
from schemas.alerts import GroupMember
from services.notifier import messages
from services.notifier.outbox import OutboxEntry
from services.notifier.signing import EVENT_HEADER, IDEMPOTENCY_HEADER, signed_headers


class HttpRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A POST: either `body` (JSON) or `fields` + `file` (multipart). Holds secrets: never log it."""

    url: str
    headers: dict[str, str]
    timeout_s: float
    body: bytes = b""
    fields: dict[str, list[str]] = {}
    file_field: str = ""
    file_name: str = ""
    file_content_type: str = ""
    file: bytes = b""


class EntryMismatch(ValueError):
    """An outbox entry that this destination's kind cannot send (the policy changed the destination's kind)."""


def describe(dest: Destination) -> str:
    """`<name> (<kind>)`: safe to log, unlike URLs, which are often credentials."""
    return f"{dest.name} ({dest.__struct_config__.tag})"


def http_request(
    entry: OutboxEntry,
    dest: Destination,
    *,
    url: str,
    hmac_keys: Sequence[bytes] = (),
    token: str = "",
    raw_report: bytes = b"",
    now_s: int,
    timeout_cap_s: float,
) -> HttpRequest:
    """The request for `entry` to `dest`. `url`, `hmac_keys` and `token` are the destination's resolved secrets."""
    timeout = min(dest.timeout_s, timeout_cap_s)
    if isinstance(dest, DefectDojoDestination):
        if entry.upload is None:
            raise EntryMismatch(f"destination {describe(dest)} takes report uploads, and this entry is an alert")
        dojo = messages.defectdojo_request(dest, entry.upload, entry.scan_date or entry.reported_at.date())
        fields: dict[str, list[str]] = {}
        for name, value in dojo.fields:
            fields.setdefault(name, []).append(value)
        return HttpRequest(
            url=dojo.url,
            headers={**messages.defectdojo_headers(token), IDEMPOTENCY_HEADER: entry.key},
            timeout_s=timeout,
            fields=fields,
            file_field=dojo.file_field,
            file_name=dojo.file_name,
            file_content_type=dojo.file_content_type,
            file=raw_report,
        )
    if entry.alert is None:
        raise EntryMismatch(f"destination {describe(dest)} takes alerts, and this entry is a report upload")
    if isinstance(dest, WebhookDestination):
        body = messages.webhook_body(entry.alert)
        headers = signed_headers(hmac_keys, body, entry.key, now_s)
    elif isinstance(dest, SlackDestination):
        body = messages.encode(messages.slack_message(entry.alert))
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: entry.key}
    elif isinstance(dest, TeamsDestination):
        body = messages.encode(messages.teams_message(entry.alert))
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: entry.key}
    else:  # pragma: no cover - the Destination union is exhaustive
        raise EntryMismatch(f"destination kind {type(dest).__name__} is not supported")
    return HttpRequest(url=url, headers=headers, timeout_s=timeout, body=body)


def group_request(
    dest: Destination,
    group_id: str,
    cluster: str,
    members: Sequence[GroupMember],
    created_at: datetime,
    *,
    url: str,
    hmac_keys: Sequence[bytes] = (),
    now_s: int,
    timeout_cap_s: float,
) -> HttpRequest:
    """The request for a group of several alerts to `dest`: the body names every member and carries the group's
    idempotency key; a generic webhook's body is signed like a single alert's."""
    timeout = min(dest.timeout_s, timeout_cap_s)
    if isinstance(dest, WebhookDestination):
        body = messages.group_webhook_body(group_id, cluster, members, created_at)
        headers = signed_headers(hmac_keys, body, group_id, now_s)
        headers[EVENT_HEADER] = "alert-group"
    elif isinstance(dest, SlackDestination):
        body = messages.encode(messages.slack_group_message(group_id, cluster, members, created_at))
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: group_id}
    elif isinstance(dest, TeamsDestination):
        body = messages.encode(messages.teams_group_message(group_id, cluster, members, created_at))
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: group_id}
    else:
        raise EntryMismatch(f"destination {describe(dest)} takes report uploads, not grouped alerts")
    return HttpRequest(url=url, headers=headers, timeout_s=timeout, body=body)
