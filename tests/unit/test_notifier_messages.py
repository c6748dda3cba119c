"""Rendering: the generic webhook body, Slack blocks, a Teams Adaptive Card, DefectDojo's import fields."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any

import msgspec
import pytest

from podsweep.policy import DefectDojoDestination, SecretRef
from schemas.alerts import AlertFinding, AlertPayload, SuppressionNote, Threshold
from schemas.events import SeverityCounts, Workload
from services.notifier.decide import ReportUpload
from services.notifier.messages import (
    defectdojo_request,
    encode,
    slack_escape,
    slack_message,
    teams_message,
    webhook_body,
)

HEX = "ef" * 32
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def alert_finding(vuln: str = "CVE-2026-1", **extra: Any) -> AlertFinding:
    values: dict[str, Any] = {
        "id": vuln,
        "package": "openssl",
        "installed_version": "3.0.1",
        "fixed_version": "3.0.9",
        "severity": "CRITICAL",
        "cvss": 9.8,
        "url": f"https://avd.aquasec.com/nvd/{vuln.lower()}",
        "new": True,
    } | extra
    return AlertFinding(**values)


def payload(findings: list[AlertFinding] | None = None, **extra: Any) -> AlertPayload:
    items = findings if findings is not None else [alert_finding()]
    values: dict[str, Any] = {
        "id": "0123456789abcdef0123456789abcdef",
        "cluster": "prod",
        "digest_ref": f"registry.example.com/shop/api@sha256:{HEX}",
        "image": "registry.example.com/shop/api:1.4",
        "namespace": "shop",
        "workload": Workload("Deployment", "api"),
        "rule": "defaults",
        "threshold": Threshold(max_critical=0),
        "reasons": ["1 CRITICAL (more than 0)"],
        "counts": SeverityCounts(CRITICAL=len(items)),
        "new_count": sum(f.new for f in items),
        "findings": items,
        "scan_id": "scan-0001",
        "report_key": f"reports/sha256/{HEX}/latest.json",
        "created_at": NOW,
    } | extra
    return AlertPayload(**values)


def test_webhook_body_is_the_versioned_payload_and_decodes_strictly() -> None:
    body = webhook_body(payload())
    document = json.loads(body)
    assert (document["v"], document["type"], document["workload"]) == (
        1,
        "podsweep.breach",
        {"kind": "Deployment", "name": "api"},
    )
    assert msgspec.json.decode(body, type=AlertPayload) == payload()


HOSTILE = "<!channel> & <https://evil.example|click>"


def test_slack_escapes_untrusted_text_so_it_cannot_ping_or_link() -> None:
    body = encode(slack_message(payload([alert_finding(package=HOSTILE, url="")])))
    text = json.loads(body)
    rendered = json.dumps(text)
    assert "<!channel>" not in rendered and "<https://evil" not in rendered
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in rendered


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        pytest.param("a&b", "a&amp;b", id="ampersand"),
        pytest.param("<@U123>", "&lt;@U123&gt;", id="user-mention"),
        pytest.param("&lt;", "&amp;lt;", id="already-escaped-text-stays-literal"),
        pytest.param("*bold* _it_", "*bold* _it_", id="formatting-left-alone"),
    ],
)
def test_slack_escape_handles_exactly_the_three_control_characters(raw: str, escaped: str) -> None:
    assert slack_escape(raw) == escaped


def test_slack_message_is_block_kit_within_slack_limits() -> None:
    many = [alert_finding(f"CVE-2026-{i:04d}", title="t" * 250) for i in range(60)]
    message = json.loads(encode(slack_message(payload(many, omitted=40))))
    assert message["text"].startswith("60 new vulnerabilities breach policy in shop/Deployment/api")
    assert message["blocks"][0]["type"] == "header" and len(message["blocks"][0]["text"]["text"]) <= 150
    assert len(message["blocks"]) <= 50
    sections = [b["text"]["text"] for b in message["blocks"] if b["type"] == "section"]
    assert all(len(s) <= 3000 for s in sections)
    assert "…and 85 more counted findings" in message["blocks"][-1]["elements"][0]["text"]  # 60-15 shown + 40 omitted
    assert "<https://avd.aquasec.com/nvd/cve-2026-0000|CVE-2026-0000>" in sections[1]


def test_slack_and_teams_say_that_a_suppression_expired() -> None:
    note = SuppressionNote(owner="bob@example.com", reason="ok", expires=datetime(2026, 11, 1, tzinfo=UTC))
    alert = payload([alert_finding(expired_suppression=note)], expired_suppressions=1)
    slack = encode(slack_message(alert)).decode()
    teams = encode(teams_message(alert)).decode()
    for rendered in (slack, teams):
        assert "suppression by bob@example.com expired 2026-11-01" in rendered
        assert "1 suppressions expired and count again" in rendered


def test_teams_message_is_an_adaptive_card_in_a_message_envelope() -> None:
    message = json.loads(encode(teams_message(payload())))
    assert message["type"] == "message"
    [attachment] = message["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["contentUrl"] is None
    card = attachment["content"]
    assert (card["type"], card["version"], card["$schema"]) == (
        "AdaptiveCard",
        "1.4",
        "http://adaptivecards.io/schemas/adaptive-card.json",
    )
    link = [i for b in card["body"] if b["type"] == "RichTextBlock" for i in b["inlines"] if "selectAction" in i]
    assert link[0]["selectAction"] == {"type": "Action.OpenUrl", "url": "https://avd.aquasec.com/nvd/cve-2026-1"}


def test_teams_keeps_untrusted_text_out_of_markdown() -> None:
    """TextBlock renders markdown, TextRun never does: untrusted text may only appear in TextRuns."""
    message = json.loads(encode(teams_message(payload([alert_finding(package="[click](https://evil.example)")]))))
    card = message["attachments"][0]["content"]
    text_blocks = [b["text"] for b in card["body"] if b["type"] == "TextBlock"]
    runs = [i["text"] for b in card["body"] if b["type"] == "RichTextBlock" for i in b["inlines"]]
    assert not any("evil" in t or "shop" in t for t in text_blocks)
    assert any("[click](https://evil.example)" in r for r in runs)


DOJO = DefectDojoDestination(
    name="dojo",
    url="https://dojo.example.com/",
    token=SecretRef(env="DOJO_TOKEN"),
    product="Shop",
    engagement="Runtime images",
    product_type="Web",
    tags=["cluster:prod"],
)
UPLOAD = ReportUpload(
    key="0123456789abcdef0123456789abcdef",
    destination="dojo",
    digest_ref=f"registry.example.com/shop/api@sha256:{HEX}",
    scan_id="scan-0001",
    raw_key=f"raw/sha256/{HEX}/scan-0001.json",
    test_title="registry.example.com/shop/api:1.4",
)


@pytest.mark.parametrize(
    ("reimport", "path"),
    [
        pytest.param(True, "https://dojo.example.com/api/v2/reimport-scan/", id="reimport-keeps-one-test"),
        pytest.param(False, "https://dojo.example.com/api/v2/import-scan/", id="import-adds-a-test"),
    ],
)
def test_defectdojo_request_follows_the_import_scan_contract(reimport: bool, path: str) -> None:
    request = defectdojo_request(msgspec.structs.replace(DOJO, reimport=reimport), UPLOAD, date(2026, 11, 23))
    fields = dict(request.fields)
    assert request.url == path
    assert fields["scan_type"] == "Trivy Scan"
    assert (fields["product_name"], fields["engagement_name"], fields["product_type_name"]) == (
        "Shop",
        "Runtime images",
        "Web",
    )
    assert fields["test_title"] == "registry.example.com/shop/api:1.4"
    assert (fields["auto_create_context"], fields["scan_date"], fields["version"]) == (
        "true",
        "2026-11-23",
        f"sha256:{HEX}",
    )
    assert [v for k, v in request.fields if k == "tags"] == ["podsweep", "cluster:prod"]
    assert (request.file_field, request.file_name) == ("file", f"trivy-{HEX[:12]}-scan-0001.json")
