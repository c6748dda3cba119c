"""Loading the policy file: a good file becomes Structs, a bad one is refused with `<source>:<line> <key>: why`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from podsweep.policy import (
    EXAMPLE_POLICY,
    DefectDojoDestination,
    PolicyError,
    SecretRef,
    SlackDestination,
    TeamsDestination,
    WebhookDestination,
    load_policy,
)

GOOD = """\
version: 1
defaults:
  threshold: {max_critical: 0, max_high: 5}
  destinations: [security]
destinations:
  - name: security
    kind: webhook
    url: https://hooks.example.com/podsweep
    hmac_key: {env: PODSWEEP_HOOK_KEY}
  - name: payments-slack
    kind: slack
    url: {file: /var/run/secrets/podsweep/slack-url}
  - name: payments-teams
    kind: teams
    url: {env: TEAMS_URL}
  - name: dojo
    kind: defectdojo
    url: https://dojo.example.com
    token: {file: /var/run/secrets/podsweep/dojo-token}
    product: Payments
    engagement: Runtime images
rules:
  - name: payments
    match:
      namespaces: ["payments-*"]
      workloads: ["Deployment/api-*", "worker"]
    threshold:
      max_high: 0
    fixable_only: true
    destinations: [payments-slack, payments-teams, dojo]
  - name: noisy-route
    match: {routes: [batch]}
    min_cvss: 7.5
suppressions:
  - id: CVE-2024-0001
    package: openssl
    image: registry.example.com/payments/*
    namespace: payments-prod
    owner: alice@example.com
    reason: Not reachable, TLS terminates at the mesh.
    expires: 2026-12-31
"""


def test_a_complete_policy_loads_into_structs() -> None:
    policy = load_policy(GOOD, "policy.yaml")
    assert [type(d) for d in policy.destinations] == [
        WebhookDestination,
        SlackDestination,
        TeamsDestination,
        DefectDojoDestination,
    ]
    assert policy.destinations[1].url == SecretRef(file="/var/run/secrets/podsweep/slack-url")
    assert policy.rules[0].match.workloads == ["Deployment/api-*", "worker"]
    assert policy.suppressions[0].expires == datetime(2026, 12, 31, tzinfo=UTC)
    assert policy.destination("dojo").name == "dojo"


@pytest.mark.parametrize(
    ("text", "expires"),
    [
        pytest.param("2026-12-31", datetime(2026, 12, 31, tzinfo=UTC), id="date-is-midnight-utc"),
        pytest.param("2026-12-31 08:30:00", datetime(2026, 12, 31, 8, 30, tzinfo=UTC), id="naive-timestamp-is-utc"),
        pytest.param(
            "'2026-12-31T10:00:00+02:00'",
            datetime(2026, 12, 31, 10, tzinfo=timezone(timedelta(hours=2))),
            id="quoted-rfc3339-with-offset",
        ),
    ],
)
def test_suppression_expiry_is_always_a_timezone_aware_instant(text: str, expires: datetime) -> None:
    policy = load_policy(GOOD.replace("expires: 2026-12-31", f"expires: {text}"))
    assert policy.suppressions[0].expires == expires
    assert policy.suppressions[0].expires.utcoffset() is not None


@pytest.mark.parametrize(
    "text",
    [pytest.param("", id="empty-file"), pytest.param("# nothing yet\n", id="only-a-comment")],
)
def test_an_empty_policy_is_the_builtin_defaults(text: str) -> None:
    policy = load_policy(text)
    assert policy.rules == [] and policy.destinations == [] and policy.suppressions == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "      max_high: 0\n",
            "      max_high: five\n",
            'policy.yaml:28 rules[0].threshold.max_high: expected int or null, got "five"',
            id="word-for-a-number",
        ),
        pytest.param(
            "      max_high: 0\n",
            "      max_high: -1\n",
            "policy.yaml:28 rules[0].threshold.max_high: expected int >= 0, got -1",
            id="negative-limit",
        ),
        pytest.param(
            "      max_high: 0\n",
            "      max_hihg: 0\n",
            "policy.yaml:28 rules[0].threshold.max_hihg: unknown key (check its spelling and indentation)",
            id="misspelt-key",
        ),
        pytest.param(
            "    owner: alice@example.com\n",
            "",
            "policy.yaml:35 suppressions[0].owner: required key is missing",
            id="suppression-without-owner",
        ),
        pytest.param(
            "    expires: 2026-12-31\n",
            "",
            "policy.yaml:35 suppressions[0].expires: required key is missing",
            id="suppression-without-expiry",
        ),
        pytest.param(
            "    expires: 2026-12-31\n",
            "    expires: soon\n",
            "policy.yaml:41 suppressions[0].expires: invalid RFC3339 encoded datetime",
            id="expiry-not-a-date",
        ),
        pytest.param(
            "    reason: Not reachable, TLS terminates at the mesh.\n",
            '    reason: "  "\n',
            "policy.yaml:40 suppressions[0].reason: expected str matching regex",
            id="blank-reason",
        ),
        pytest.param(
            "    min_cvss: 7.5",
            "    min_cvss: 11",
            "policy.yaml:33 rules[1].min_cvss: expected float <= 10.0, got 11",
            id="cvss-over-ten",
        ),
        pytest.param(
            "    destinations: [payments-slack, payments-teams, dojo]",
            "    destinations: [payments-slack, pager]",
            "policy.yaml:30 rules[0].destinations[1]: destination 'pager' is not defined under `destinations`",
            id="unknown-destination",
        ),
        pytest.param(
            "    kind: teams\n",
            "    kind: email\n",
            'policy.yaml:14 destinations[2].kind: unknown destination kind "email" (expected one of: webhook, slack',
            id="unknown-destination-kind",
        ),
        pytest.param(
            "    url: {env: TEAMS_URL}\n",
            "    url: https://outlook.office.com/webhook/secret\n",
            "policy.yaml:15 destinations[2].url: expected object",
            id="teams-url-written-in-the-file",
        ),
        pytest.param(
            "    hmac_key: {env: PODSWEEP_HOOK_KEY}\n",
            "    hmac_key: {env: PODSWEEP_HOOK_KEY, file: /etc/key}\n",
            "policy.yaml:9 destinations[0].hmac_key: give exactly one of `env` or `file`",
            id="secret-from-two-places",
        ),
        pytest.param(
            "  - name: payments-teams\n",
            "  - name: payments-slack\n",
            "policy.yaml:13 destinations[2].name: destination 'payments-slack' is defined twice",
            id="destination-defined-twice",
        ),
        pytest.param(
            "  - name: noisy-route\n",
            "  - name: payments\n",
            "policy.yaml:31 rules[1].name: rule 'payments' is defined twice",
            id="rule-defined-twice",
        ),
        pytest.param(
            '      namespaces: ["payments-*"]\n',
            '      namespaces: ["payments-*"]\n      namespaces: ["other"]\n',
            "policy.yaml:26 rules[0].match.namespaces: key given twice",
            id="duplicate-key-would-hide-a-rule",
        ),
        pytest.param(
            '      namespaces: ["payments-*"]\n',
            '      namespaces: ["Payments $(id)"]\n',
            "policy.yaml:25 rules[0].match.namespaces[0]: expected str matching regex",
            id="namespace-glob-with-shell-text",
        ),
        pytest.param(
            "version: 1\n",
            "version: 2\n",
            "policy.yaml:1 version: invalid enum value 2",
            id="unknown-version",
        ),
        pytest.param(
            "    match: {routes: [batch]}\n",
            "    match: [batch]\n",
            "policy.yaml:32 rules[1].match: expected object, got a list",
            id="match-not-a-mapping",
        ),
        pytest.param(
            "defaults:\n",
            "defaults: [\n",
            "policy.yaml:4 not valid YAML:",
            id="broken-yaml",
        ),
    ],
)
def test_bad_policies_name_the_line_and_the_key(old: str, new: str, expected: str) -> None:
    assert old in GOOD
    with pytest.raises(PolicyError) as info:
        load_policy(GOOD.replace(old, new, 1), "policy.yaml")
    assert str(info.value).startswith(expected), str(info.value)


@pytest.mark.parametrize(
    "text",
    [pytest.param("- a\n- b\n", id="a-list"), pytest.param("just words\n", id="a-scalar")],
)
def test_a_document_that_is_not_a_mapping_is_refused(text: str) -> None:
    with pytest.raises(PolicyError, match=r"^team\.yaml:1 \(top level\): expected a mapping"):
        load_policy(text, "team.yaml")


def test_the_source_name_is_the_one_the_shell_gave() -> None:
    with pytest.raises(PolicyError, match=r"^/etc/podsweep/policy\.yaml:1 version"):
        load_policy("version: 3\n", "/etc/podsweep/policy.yaml")


def test_the_example_policy_up_shows_is_valid_and_sends_somewhere() -> None:
    policy = load_policy(EXAMPLE_POLICY, "example")
    assert policy.destinations and policy.defaults.destinations == [policy.destinations[0].name]
