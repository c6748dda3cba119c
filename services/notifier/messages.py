"""Renders an alert for each destination kind: generic JSON webhook, Slack, Microsoft Teams, DefectDojo.

Pure: Structs in, Structs or bytes out; no HTTP. Text from images and scanners is untrusted: it is escaped for
Slack's mrkdwn and kept out of Adaptive Card markdown (TextRun), and never reaches a URL or a file name.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Literal

import msgspec

from podsweep.policy import DefectDojoDestination
from schemas.alerts import AlertFinding, AlertPayload, GroupMember, GroupPayload
from schemas.events import SEVERITIES
from schemas.refs import digest_hex
from services.notifier import grouping
from services.notifier.decide import ReportUpload

_ENCODER = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """The exact bytes to POST (and, for the generic webhook, to sign)."""
    return _ENCODER.encode(message)


def webhook_body(payload: AlertPayload) -> bytes:
    return encode(payload)


def _headline(payload: AlertPayload) -> str:
    where = f"{payload.namespace}/{payload.workload.kind}/{payload.workload.name}"
    if payload.new_count:
        return f"{payload.new_count} new vulnerabilities breach policy in {where}"
    return f"Vulnerability policy breach in {where}"


def _counts(payload: AlertPayload) -> str:
    parts = [f"{getattr(payload.counts, s)} {s}" for s in SEVERITIES if getattr(payload.counts, s)]
    return ", ".join(parts) or "none"


def _more(payload: AlertPayload, shown: int) -> int:
    return len(payload.findings) - shown + payload.omitted


# ---------------------------------------------------------------------------------------------------------------
# Slack incoming webhook (Block Kit)

SLACK_MAX_FINDINGS = 15
_SLACK_SECTION_LIMIT = 2900  # Slack refuses a section text over 3000 characters
_SLACK_HEADER_LIMIT = 150


class SlackText(msgspec.Struct, frozen=True):
    type: Literal["mrkdwn", "plain_text"]
    text: str


class SlackHeader(msgspec.Struct, frozen=True, tag_field="type", tag="header"):
    text: SlackText


class SlackSection(msgspec.Struct, frozen=True, tag_field="type", tag="section"):
    text: SlackText


class SlackContext(msgspec.Struct, frozen=True, tag_field="type", tag="context"):
    elements: list[SlackText]


class SlackDivider(msgspec.Struct, frozen=True, tag_field="type", tag="divider"):
    pass


SlackBlock = SlackHeader | SlackSection | SlackContext | SlackDivider


class SlackMessage(msgspec.Struct, frozen=True):
    text: str  # the notification and fallback text
    blocks: list[SlackBlock]


def slack_escape(text: str) -> str:
    """Slack reads `&`, `<` and `>` as markup (`<!channel>` would ping everyone); these three are all it escapes."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _slack_finding(f: AlertFinding) -> str:
    name = slack_escape(f.id)
    label = f"<{f.url}|{name}>" if f.url else name
    fix = f" → {slack_escape(f.fixed_version)}" if f.fixed_version else " (no fix yet)"
    line = f"• *{f.severity}* {label} {slack_escape(f.package)} {slack_escape(f.installed_version)}{fix}"
    if f.cvss is not None:
        line += f" · CVSS {f.cvss:.1f}"
    if f.new:
        line += " · _new_"
    if f.expired_suppression is not None:
        note = f.expired_suppression
        line += f" · suppression by {slack_escape(note.owner)} expired {note.expires:%Y-%m-%d}"
    return line


def slack_message(payload: AlertPayload, max_findings: int = SLACK_MAX_FINDINGS) -> SlackMessage:
    headline = _headline(payload)
    summary = "\n".join(
        [
            f"*Workload* {slack_escape(payload.namespace)} / {slack_escape(payload.workload.kind)} "
            f"{slack_escape(payload.workload.name)}",
            f"*Cluster* {slack_escape(payload.cluster)}",
            f"*Image* {slack_escape(payload.image)}",
            f"*Counted* {_counts(payload)}",
            f"*Breach* {slack_escape('; '.join(payload.reasons))} (rule {slack_escape(payload.rule)})",
        ]
    )
    blocks: list[SlackBlock] = [
        SlackHeader(text=SlackText(type="plain_text", text=_truncate(headline, _SLACK_HEADER_LIMIT))),
        SlackSection(text=SlackText(type="mrkdwn", text=_truncate(summary, _SLACK_SECTION_LIMIT))),
        SlackDivider(),
    ]
    shown = payload.findings[:max_findings]
    chunk: list[str] = []
    for line in (_truncate(_slack_finding(f), 1200) for f in shown):
        if chunk and len("\n".join([*chunk, line])) > _SLACK_SECTION_LIMIT:
            blocks.append(SlackSection(text=SlackText(type="mrkdwn", text="\n".join(chunk))))
            chunk = []
        chunk.append(line)
    if chunk:
        blocks.append(SlackSection(text=SlackText(type="mrkdwn", text="\n".join(chunk))))
    notes = []
    if more := _more(payload, len(shown)):
        notes.append(f"…and {more} more counted findings")
    if payload.expired_suppressions:
        notes.append(f"{payload.expired_suppressions} suppressions expired and count again")
    if payload.suppressed_count:
        notes.append(f"{payload.suppressed_count} suppressed")
    notes.append(f"scan {payload.scan_id} · alert {payload.id}")
    blocks.append(SlackContext(elements=[SlackText(type="mrkdwn", text=slack_escape(" · ".join(notes)))]))
    return SlackMessage(text=slack_escape(headline), blocks=blocks)


# ---------------------------------------------------------------------------------------------------------------
# Microsoft Teams workflow webhook: an Adaptive Card in a message's attachments

TEAMS_MAX_FINDINGS = 20
ADAPTIVE_CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
ADAPTIVE_CARD_SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"

Color = Literal["Default", "Attention", "Warning", "Good", "Accent"]


class OpenUrl(msgspec.Struct, frozen=True, tag_field="type", tag="Action.OpenUrl"):
    url: str


class TextRun(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="type", tag="TextRun"):
    """Inline text that Teams never reads as markdown: the only place untrusted text goes."""

    text: str
    weight: Literal["Default", "Bolder"] = "Default"
    color: Color = "Default"
    select_action: OpenUrl | None = msgspec.field(default=None, name="selectAction")


class RichTextBlock(msgspec.Struct, frozen=True, tag_field="type", tag="RichTextBlock"):
    inlines: list[TextRun]


class TextBlock(msgspec.Struct, frozen=True, omit_defaults=True, tag_field="type", tag="TextBlock"):
    """Markdown-capable text: only podsweep's own words go here."""

    text: str
    size: Literal["Default", "Medium", "Large"] = "Default"
    weight: Literal["Default", "Bolder"] = "Default"
    color: Color = "Default"
    wrap: bool = True


CardElement = TextBlock | RichTextBlock


class AdaptiveCard(msgspec.Struct, frozen=True):
    body: list[CardElement]
    schema: str = msgspec.field(default=ADAPTIVE_CARD_SCHEMA, name="$schema")
    type: Literal["AdaptiveCard"] = "AdaptiveCard"
    version: str = "1.4"


class TeamsAttachment(msgspec.Struct, frozen=True):
    content: AdaptiveCard
    content_type: str = msgspec.field(default=ADAPTIVE_CARD_CONTENT_TYPE, name="contentType")
    content_url: None = msgspec.field(default=None, name="contentUrl")


class TeamsMessage(msgspec.Struct, frozen=True):
    attachments: list[TeamsAttachment]
    type: Literal["message"] = "message"


_SEVERITY_COLOR: dict[str, Color] = {"CRITICAL": "Attention", "HIGH": "Warning"}


def _teams_finding(f: AlertFinding) -> RichTextBlock:
    fix = f" → {f.fixed_version}" if f.fixed_version else " (no fix yet)"
    tail = f" {f.package} {f.installed_version}{fix}"
    if f.cvss is not None:
        tail += f" · CVSS {f.cvss:.1f}"
    if f.new:
        tail += " · new"
    if f.expired_suppression is not None:
        tail += f" · suppression by {f.expired_suppression.owner} expired {f.expired_suppression.expires:%Y-%m-%d}"
    return RichTextBlock(
        inlines=[
            TextRun(text=f.severity, weight="Bolder", color=_SEVERITY_COLOR.get(f.severity, "Default")),
            TextRun(text=" "),
            TextRun(text=f.id, color="Accent", select_action=OpenUrl(url=f.url)) if f.url else TextRun(text=f.id),
            TextRun(text=tail),
        ]
    )


def teams_message(payload: AlertPayload, max_findings: int = TEAMS_MAX_FINDINGS) -> TeamsMessage:
    wl = payload.workload
    body: list[CardElement] = [
        TextBlock(text="podsweep: vulnerability policy breach", size="Medium", weight="Bolder", color="Attention"),
        RichTextBlock(inlines=[TextRun(text=_headline(payload))]),
        RichTextBlock(
            inlines=[
                TextRun(text="Workload ", weight="Bolder"),
                TextRun(text=f"{payload.namespace} / {wl.kind} {wl.name}"),
            ]
        ),
        RichTextBlock(inlines=[TextRun(text="Cluster ", weight="Bolder"), TextRun(text=payload.cluster)]),
        RichTextBlock(inlines=[TextRun(text="Image ", weight="Bolder"), TextRun(text=payload.image)]),
        RichTextBlock(inlines=[TextRun(text="Counted ", weight="Bolder"), TextRun(text=_counts(payload))]),
        RichTextBlock(
            inlines=[
                TextRun(text="Breach ", weight="Bolder"),
                TextRun(text=f"{'; '.join(payload.reasons)} (rule {payload.rule})"),
            ]
        ),
    ]
    shown = payload.findings[:max_findings]
    body += [_teams_finding(f) for f in shown]
    notes = []
    if more := _more(payload, len(shown)):
        notes.append(f"…and {more} more counted findings")
    if payload.expired_suppressions:
        notes.append(f"{payload.expired_suppressions} suppressions expired and count again")
    if payload.suppressed_count:
        notes.append(f"{payload.suppressed_count} suppressed")
    notes.append(f"scan {payload.scan_id} · alert {payload.id}")
    body.append(RichTextBlock(inlines=[TextRun(text=" · ".join(notes))]))
    return TeamsMessage(attachments=[TeamsAttachment(content=AdaptiveCard(body=body))])


# ---------------------------------------------------------------------------------------------------------------
# DefectDojo API v2

DOJO_SCAN_TYPE = "Trivy Scan"


class DojoRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A multipart POST: `fields` as form fields (in order, `tags` repeated), plus the raw Trivy JSON as `file`."""

    url: str
    fields: list[tuple[str, str]]
    file_field: str = "file"
    file_name: str
    file_content_type: str = "application/json"


def defectdojo_request(dest: DefectDojoDestination, upload: ReportUpload, scan_date: date) -> DojoRequest:
    """import-scan or reimport-scan, matched by product, engagement and test title (created when missing).

    The test is named after the image without its digest, so each new build of an image updates one test.
    """
    endpoint = "reimport-scan" if dest.reimport else "import-scan"

    def flag(value: bool) -> str:
        return "true" if value else "false"

    fields = [
        ("scan_type", DOJO_SCAN_TYPE),
        ("product_name", dest.product),
        ("engagement_name", dest.engagement),
        ("test_title", upload.test_title),
        ("auto_create_context", "true"),
        ("scan_date", scan_date.isoformat()),
        ("minimum_severity", dest.minimum_severity),
        ("active", "true"),
        ("verified", "false"),
        ("close_old_findings", flag(dest.close_old_findings)),
        ("version", upload.digest_ref.rsplit("@", 1)[1]),
        ("build_id", upload.scan_id),
    ]
    if dest.product_type:
        fields.append(("product_type_name", dest.product_type))
    fields += [("tags", tag) for tag in ["podsweep", *dest.tags]]
    return DojoRequest(
        url=f"{dest.url.rstrip('/')}/api/v2/{endpoint}/",
        fields=fields,
        file_name=f"trivy-{digest_hex(upload.digest_ref)[:12]}-{upload.scan_id}.json",
    )


def defectdojo_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}", "Accept": "application/json"}


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# Grouped alerts: several workloads in one message, within each kind's limits

SLACK_MAX_BLOCKS = 50  # Slack refuses a message with more blocks
SLACK_MAX_CHARS = 40_000  # Slack's limit on a message's text; applied to all of a message's texts together
TEAMS_MAX_BYTES = 27_000  # Teams refuses a workflow message over 28 KB; room for the envelope
_SLACK_MAX_CVE_LINES = 25


def group_payload(group_id: str, cluster: str, members: Sequence[GroupMember], created_at: datetime) -> GroupPayload:
    return GroupPayload(
        id=group_id, cluster=cluster, cves=grouping.cves(members), members=list(members), created_at=created_at
    )


def group_webhook_body(group_id: str, cluster: str, members: Sequence[GroupMember], created_at: datetime) -> bytes:
    return encode(group_payload(group_id, cluster, members, created_at))


def _member_cves(m: GroupMember) -> str:
    more = f" +{m.more}" if m.more else ""
    return ", ".join(m.cves) + more


def _group_headline(members: Sequence[GroupMember], cluster: str) -> str:
    return f"{len(members)} workloads breach vulnerability policy in {cluster}"


def slack_group_message(
    group_id: str, cluster: str, members: Sequence[GroupMember], created_at: datetime
) -> SlackMessage:
    """A header, the CVEs (worst first, each with its page's key in the index), then one line per workload packed
    into sections, and the group key."""
    found = grouping.cves(members)
    cve_lines = [
        f"• *{c.severity}* {slack_escape(c.id)} · {c.workloads} workloads"
        + (f" · `{slack_escape(c.page_key)}`" if c.page_key else "")
        for c in found[:_SLACK_MAX_CVE_LINES]
    ]
    if len(found) > _SLACK_MAX_CVE_LINES:
        cve_lines.append(f"…and {len(found) - _SLACK_MAX_CVE_LINES} more CVEs (each workload line names its own)")
    headline = _group_headline(members, cluster)
    blocks: list[SlackBlock] = [
        SlackHeader(text=SlackText(type="plain_text", text=_truncate(headline, _SLACK_HEADER_LIMIT))),
        SlackSection(text=SlackText(type="mrkdwn", text=_truncate("\n".join(cve_lines), _SLACK_SECTION_LIMIT))),
        SlackDivider(),
    ]
    chunk: list[str] = []
    size = 0
    for m in members:
        line = _truncate(
            f"• {slack_escape(m.namespace)} / {slack_escape(m.workload.kind)} {slack_escape(m.workload.name)}"
            f" · {slack_escape(m.image)} · {slack_escape(_member_cves(m))}",
            1200,
        )
        if chunk and size + 1 + len(line) > _SLACK_SECTION_LIMIT:
            blocks.append(SlackSection(text=SlackText(type="mrkdwn", text="\n".join(chunk))))
            chunk, size = [], 0
        size += len(line) + (1 if chunk else 0)
        chunk.append(line)
    if chunk:
        blocks.append(SlackSection(text=SlackText(type="mrkdwn", text="\n".join(chunk))))
    blocks.append(
        SlackContext(elements=[SlackText(type="mrkdwn", text=f"group {group_id} · {created_at:%Y-%m-%d %H:%M:%SZ}")])
    )
    return SlackMessage(text=slack_escape(headline), blocks=blocks)


def slack_fits(message: SlackMessage) -> bool:
    return len(message.blocks) <= SLACK_MAX_BLOCKS and slack_chars(message) <= SLACK_MAX_CHARS


def slack_chars(message: SlackMessage) -> int:
    """Every character of text a message carries (its fallback text and each block's)."""
    total = len(message.text)
    for block in message.blocks:
        if isinstance(block, SlackHeader | SlackSection):
            total += len(block.text.text)
        elif isinstance(block, SlackContext):
            total += sum(len(e.text) for e in block.elements)
    return total


def teams_group_message(
    group_id: str, cluster: str, members: Sequence[GroupMember], created_at: datetime
) -> TeamsMessage:
    found = grouping.cves(members)
    body: list[CardElement] = [
        TextBlock(text="podsweep: vulnerability policy breach", size="Medium", weight="Bolder", color="Attention"),
        RichTextBlock(inlines=[TextRun(text=_group_headline(members, cluster))]),
    ]
    body += [
        RichTextBlock(
            inlines=[
                TextRun(text=c.severity, weight="Bolder", color=_SEVERITY_COLOR.get(c.severity, "Default")),
                TextRun(text=f" {c.id} · {c.workloads} workloads" + (f" · {c.page_key}" if c.page_key else "")),
            ]
        )
        for c in found[:_SLACK_MAX_CVE_LINES]
    ]
    body += [
        RichTextBlock(
            inlines=[
                TextRun(text=f"{m.namespace} / {m.workload.kind} {m.workload.name}", weight="Bolder"),
                TextRun(text=f" · {m.image} · {_member_cves(m)}"),
            ]
        )
        for m in members
    ]
    body.append(RichTextBlock(inlines=[TextRun(text=f"group {group_id}")]))
    return TeamsMessage(attachments=[TeamsAttachment(content=AdaptiveCard(body=body))])


def group_fits(kind: str, members: Sequence[GroupMember], cluster: str, max_body_bytes: int) -> bool:
    """Whether these members fit one message of this kind (the key and time do not change the size)."""
    placeholder, at = "0" * 32, _PLACEHOLDER_TIME
    if kind == "slack":
        return slack_fits(slack_group_message(placeholder, cluster, members, at))
    if kind == "teams":
        return len(encode(teams_group_message(placeholder, cluster, members, at))) <= TEAMS_MAX_BYTES
    return len(group_webhook_body(placeholder, cluster, members, at)) + _TIME_SLACK <= max_body_bytes


_PLACEHOLDER_TIME = datetime(2000, 1, 1, tzinfo=UTC)
_TIME_SLACK = 16  # a real `created_at` may carry fractional seconds
