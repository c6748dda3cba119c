"""The alerting policy shared by the notifier and the admission gate: thresholds, rules, destinations, suppressions.

Pure: `load_policy(text, source)` parses and validates a YAML document (errors name the line and key), the rest
decides over Structs. Never reads files, environment variables or the clock; secrets are only *referenced* here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from functools import lru_cache
from typing import Annotated, Any, Literal

import msgspec
import yaml

from schemas.alerts import FindingHash, NotifyFingerprint, SuppressionNote, Threshold
from schemas.events import SEVERITIES, Severity, SeverityCounts, Workload
from schemas.refs import DIGEST_REF_RE, K8sLabelName, ShortText
from schemas.report import Finding, Report

# Globs: fnmatch syntax (`*`, `?`, `[...]`), case-sensitive; `*` also matches `/`.
NamespaceGlob = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9*?\[\]!-]{1,63}$")]
WorkloadGlob = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9*?\[\]!./-]{1,317}$")]
ImageGlob = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9*?\[\]!._/:@-]{1,400}$")]
PackageGlob = Annotated[str, msgspec.Meta(pattern=r"^[^\s\x00-\x1f\x7f]{1,256}$")]
# CVE-…, GHSA-…, RUSTSEC-…, ALAS-…, DLA-…: compared case-insensitively.
VulnerabilityId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
RuleName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
FilePath = Annotated[str, msgspec.Meta(pattern=r"^/[^\x00-\x1f\x7f]{1,1023}$")]
HttpUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/?#]+(/[^\s]*)?$", max_length=2048)]
Limit = Annotated[int, msgspec.Meta(ge=0)]
Cvss = Annotated[float, msgspec.Meta(ge=0.0, le=10.0)]
NonEmptyShortText = Annotated[str, msgspec.Meta(pattern=r"^[^\x00-\x1f\x7f]*\S[^\x00-\x1f\x7f]*$", max_length=256)]
NonEmptyText = Annotated[
    str, msgspec.Meta(pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*\S[^\x00-\x08\x0b-\x1f\x7f]*$", max_length=4096)
]

_RANK: dict[str, int] = {s: len(SEVERITIES) - i for i, s in enumerate(SEVERITIES)}  # CRITICAL 5 … UNKNOWN 1


class PolicyError(ValueError):
    """A policy file that cannot be used; the message is `<source>:<line> <key>: <what is wrong>`."""


# ---------------------------------------------------------------------------------------------------------------
# The file


class _Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class SecretRef(_Spec, frozen=True, kw_only=True):
    """Where the shell reads a secret: one environment variable or one mounted file. Never the secret itself."""

    env: EnvName | None = None
    file: FilePath | None = None

    def __post_init__(self) -> None:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of `env` or `file` (a secret is never written in the policy)")


class WebhookDestination(_Spec, frozen=True, kw_only=True, tag_field="kind", tag="webhook"):
    """Generic JSON webhook, signed with HMAC-SHA256 (docs/webhooks.md)."""

    name: K8sLabelName
    url: HttpUrl | SecretRef
    hmac_key: SecretRef
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    # Messages per second (and how many may leave back to back), then alerts wait (docs/webhooks.md, "Storms").
    rate_per_s: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 50.0
    burst: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50
    # Waiting alerts leave as one `podsweep.breach.group` body: opt in once the receiver reads that type.
    group_alerts: bool = False
    max_body_bytes: Annotated[int, msgspec.Meta(ge=16384, le=786432)] = 262144  # a grouped body is split to fit


class SlackDestination(_Spec, frozen=True, kw_only=True, tag_field="kind", tag="slack"):
    """Slack incoming webhook; its URL is a credential."""

    name: K8sLabelName
    url: SecretRef
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    rate_per_s: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0  # about what incoming webhooks accept
    burst: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    group_alerts: bool = True  # waiting alerts leave as one message (people read it)


class TeamsDestination(_Spec, frozen=True, kw_only=True, tag_field="kind", tag="teams"):
    """Microsoft Teams workflow webhook (Adaptive Card); its URL is a credential."""

    name: K8sLabelName
    url: SecretRef
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0
    rate_per_s: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0  # about what incoming webhooks accept
    burst: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    group_alerts: bool = True  # waiting alerts leave as one message (people read it)


DojoSeverity = Literal["Info", "Low", "Medium", "High", "Critical"]


class DefectDojoDestination(_Spec, frozen=True, kw_only=True, tag_field="kind", tag="defectdojo"):
    """DefectDojo API v2: every report of a routed digest is (re)imported as a "Trivy Scan"."""

    name: K8sLabelName
    url: HttpUrl  # the DefectDojo base URL, e.g. https://dojo.example.com
    token: SecretRef
    product: NonEmptyShortText
    engagement: NonEmptyShortText
    product_type: ShortText = ""
    reimport: bool = True  # reimport-scan keeps one test per image; import-scan adds a test per report
    minimum_severity: DojoSeverity = "Info"
    close_old_findings: bool = True
    tags: list[Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/=-]{0,99}$")]] = []
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 60.0


Destination = WebhookDestination | SlackDestination | TeamsDestination | DefectDojoDestination
_DESTINATION_KINDS = (WebhookDestination, SlackDestination, TeamsDestination, DefectDojoDestination)


class ThresholdSpec(_Spec, frozen=True, kw_only=True):
    """A threshold as written: a missing severity inherits, `null` means no limit."""

    max_critical: Limit | msgspec.UnsetType | None = msgspec.UNSET
    max_high: Limit | msgspec.UnsetType | None = msgspec.UNSET
    max_medium: Limit | msgspec.UnsetType | None = msgspec.UNSET
    max_low: Limit | msgspec.UnsetType | None = msgspec.UNSET
    max_unknown: Limit | msgspec.UnsetType | None = msgspec.UNSET


class RuleSettings(_Spec, frozen=True, kw_only=True):
    """What a rule decides; anything left out comes from `defaults`, then from the built-in defaults."""

    threshold: ThresholdSpec | msgspec.UnsetType = msgspec.UNSET
    fixable_only: bool | msgspec.UnsetType = msgspec.UNSET
    ignore_unfixed: bool | msgspec.UnsetType = msgspec.UNSET
    min_cvss: Cvss | msgspec.UnsetType | None = msgspec.UNSET
    destinations: list[K8sLabelName] | msgspec.UnsetType = msgspec.UNSET


class Match(_Spec, frozen=True, kw_only=True):
    """Every list given must match (any of its globs); an empty `match` matches every workload."""

    namespaces: list[NamespaceGlob] = []
    workloads: list[WorkloadGlob] = []  # `name` globs, or `Kind/name` when the glob has a slash
    routes: list[NamespaceGlob] = []  # the podsweep.io/notify annotation


class Rule(RuleSettings, frozen=True, kw_only=True):
    name: RuleName | None = None
    match: Match = Match()


class Suppression(_Spec, frozen=True, kw_only=True):
    """An accepted finding. `package`, `image` (repository glob, or digest-ref glob with `@`) and `namespace`
    narrow it; `expires` is required. A date means 00:00 UTC of that day."""

    id: VulnerabilityId
    package: PackageGlob | None = None
    image: ImageGlob | None = None
    namespace: NamespaceGlob | None = None
    owner: NonEmptyShortText
    reason: NonEmptyText
    expires: datetime


class Policy(_Spec, frozen=True, kw_only=True):
    version: Literal[1] = 1
    defaults: RuleSettings = RuleSettings()
    rules: list[Rule] = []
    destinations: list[Destination] = []
    suppressions: list[Suppression] = []

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"policy: destination {name!r} is not defined (add it under `destinations`)")


class PolicyRule(msgspec.Struct, frozen=True, kw_only=True):
    """A rule with every setting resolved: what `evaluate` applies to one workload."""

    name: ShortText = "defaults"
    threshold: Threshold = Threshold()
    fixable_only: bool = False
    ignore_unfixed: bool = False
    min_cvss: float | None = None
    destinations: list[K8sLabelName] = []


BUILTIN = PolicyRule()
EMPTY_POLICY = Policy()

# What `podsweep up` shows when no policy file is configured; a unit test loads it, so it stays valid.
EXAMPLE_POLICY = """\
version: 1
defaults:
  threshold: {max_critical: 0, max_high: 10}  # breach: any CRITICAL or over 10 HIGH
  fixable_only: true                           # count findings that have a fix
  destinations: [team-webhook]
destinations:
  - kind: webhook                              # or slack, teams, defectdojo
    name: team-webhook
    url: https://alerts.example.com/podsweep
    hmac_key: {env: PODSWEEP_WEBHOOK_KEY}      # signing key, from this variable
"""


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_policy(text: str, source: str = "policy.yaml") -> Policy:
    """Parse and validate a policy document, or raise PolicyError naming `source:line key`.

    The shell calls this again whenever the file changes and keeps the old policy if it raises.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return EMPTY_POLICY
        _refuse_duplicate_keys(root, source)
        data = _plain(loader.construct_document(root))
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise PolicyError(f"{source}:{line} not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise PolicyError(f"{source}:{root.start_mark.line + 1} (top level): expected a mapping of keys")
    try:
        policy = msgspec.convert(data, Policy, strict=True)
    except msgspec.ValidationError as exc:
        raise PolicyError(_explain(str(exc), root, source)) from None
    _check_references(policy, root, source)
    return policy


def _plain(value: Any) -> Any:
    """YAML values as msgspec expects them: dates become 00:00 UTC, naive timestamps are UTC."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(0), tzinfo=UTC)
    return value


def _refuse_duplicate_keys(node: yaml.Node, source: str, path: str = "") -> None:
    """PyYAML keeps the last of two equal keys silently; a policy must not hide a rule that way."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                raise PolicyError(f"{source}:{key.start_mark.line + 1} {_join(path, name)}: key given twice")
            seen.add(name)
            _refuse_duplicate_keys(value, source, _join(path, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, source, f"{path}[{index}]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_AT_RE = re.compile(r" - at `\$([^`]*)`$")
_PART_RE = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_EXPECTED_RE = re.compile(r"^Expected `([^`]*)`(.*?)(?:, got `([^`]*)`)?$")
_FIELD_RE = re.compile(r"^Object (contains unknown|missing required) field `([^`]*)`$")


def _explain(message: str, root: yaml.Node, source: str) -> str:
    """Turn msgspec's `Expected `int`, got `str` - at `$.rules[2].threshold.max_high`` into
    `policy.yaml:12 rules[2].threshold.max_high: expected int, got "five"`."""
    match = _AT_RE.search(message)
    parts: list[str | int] = []
    if match:
        for name, index in _PART_RE.findall(match.group(1)):
            parts.append(int(index) if index else name)
    detail = _AT_RE.sub("", message)
    node = _node_at(root, parts)
    field = _FIELD_RE.match(detail)
    if field:
        kind, name = field.groups()
        parts.append(name)
        if kind == "contains unknown":
            node = _key_node(node, name) or node
            detail = "unknown key (check its spelling and indentation)"
        else:
            detail = "required key is missing"
    else:
        expected = _EXPECTED_RE.match(detail)
        if expected:
            wanted, constraint, _ = expected.groups()
            detail = f"expected {wanted.replace(' | null', ' or null').replace(' | ', ' or ')}{constraint}"
            detail += f", got {_shown(node)}"
        elif parts[-1:] == ["kind"] and detail.startswith("Invalid value"):
            kinds = ", ".join(str(d.__struct_config__.tag) for d in _DESTINATION_KINDS)
            detail = f"unknown destination kind {_shown(node)} (expected one of: {kinds})"
        else:
            detail = detail[:1].lower() + detail[1:]
    return f"{source}:{node.start_mark.line + 1} {_path(parts) or '(top level)'}: {detail}"


def _path(parts: Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, part)
    return out


def _node_at(root: yaml.Node, parts: Sequence[str | int]) -> yaml.Node:
    """The deepest node along `parts` (the closest line we can name when a key is missing)."""
    node = root
    for part in parts:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in node.value:
                if key.value == part:
                    child = value
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node = child
    return node


def _key_node(node: yaml.Node, name: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            if key.value == name:
                return key  # type: ignore[no-any-return]
    return None


def _shown(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = str(node.value)[:80]
    if node.tag == "tag:yaml.org,2002:str":
        return json.dumps(value)
    return value


def _check_references(policy: Policy, root: yaml.Node, source: str) -> None:
    """What the types cannot say: names are unique, and every destination a rule names exists."""

    def fail(parts: list[str | int], detail: str) -> PolicyError:
        return PolicyError(f"{source}:{_node_at(root, parts).start_mark.line + 1} {_path(parts)}: {detail}")

    defined: dict[str, int] = {}
    for index, dest in enumerate(policy.destinations):
        if dest.name in defined:
            raise fail(["destinations", index, "name"], f"destination {dest.name!r} is defined twice")
        defined[dest.name] = index
    names: set[str] = set()
    for index, rule in enumerate(policy.rules):
        if rule.name is not None:
            if rule.name in names:
                raise fail(["rules", index, "name"], f"rule {rule.name!r} is defined twice")
            names.add(rule.name)
    settings: list[tuple[list[str | int], RuleSettings]] = [(["defaults"], policy.defaults)]
    settings += [(["rules", i], rule) for i, rule in enumerate(policy.rules)]
    for parts, spec in settings:
        if isinstance(spec.destinations, msgspec.UnsetType):
            continue
        for index, name in enumerate(spec.destinations):
            if name not in defined:
                known = ", ".join(sorted(defined)) or "none"
                raise fail(
                    [*parts, "destinations", index],
                    f"destination {name!r} is not defined under `destinations` (defined: {known})",
                )


# ---------------------------------------------------------------------------------------------------------------
# Which rule


def resolve(defaults: RuleSettings, rule: RuleSettings | None = None, name: str = "defaults") -> PolicyRule:
    """Built-in defaults, then `defaults`, then the rule, setting by setting (thresholds severity by severity)."""
    resolved = BUILTIN
    for layer in (defaults, rule):
        if layer is None:
            continue
        changes: dict[str, Any] = {}
        for field in ("fixable_only", "ignore_unfixed", "min_cvss", "destinations"):
            value = getattr(layer, field)
            if value is not msgspec.UNSET:
                changes[field] = value
        if not isinstance(layer.threshold, msgspec.UnsetType):
            limits = {
                f: getattr(layer.threshold, f)
                for f in ThresholdSpec.__struct_fields__
                if getattr(layer.threshold, f) is not msgspec.UNSET
            }
            changes["threshold"] = msgspec.structs.replace(resolved.threshold, **limits)
        resolved = msgspec.structs.replace(resolved, **changes)
    return msgspec.structs.replace(resolved, name=name)


def rule_for(policy: Policy, namespace: str | None, workload: Workload | None, route: str | None) -> PolicyRule:
    """The first rule, in file order, whose match accepts this workload; `defaults` when none does."""
    for index, rule in enumerate(policy.rules):
        if _matches(rule.match, namespace, workload, route):
            return resolve(policy.defaults, rule, rule.name or f"rules[{index}]")
    return resolve(policy.defaults)


def _matches(match: Match, namespace: str | None, workload: Workload | None, route: str | None) -> bool:
    if match.namespaces and (namespace is None or not _any_glob(match.namespaces, namespace)):
        return False
    if match.workloads:
        if workload is None:
            return False
        if not any(
            _glob(g, f"{workload.kind}/{workload.name}" if "/" in g else workload.name) for g in match.workloads
        ):
            return False
    return not (match.routes and (route is None or not _any_glob(match.routes, route)))


@lru_cache(maxsize=4096)
def _compiled(glob: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(glob))


def _glob(glob: str, value: str) -> bool:
    return _compiled(glob).match(value) is not None


def glob_matches(glob: str, value: str) -> bool:
    """The policy's glob semantics (fnmatch, case-sensitive, compiled once), for the admission gate's settings."""
    return _glob(glob, value)


def _any_glob(globs: Sequence[str], value: str) -> bool:
    return any(_glob(g, value) for g in globs)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


class SuppressedFinding(msgspec.Struct, frozen=True, kw_only=True):
    """A finding with the suppression that silenced it (or, in `Verdict.expired`, used to)."""

    finding: Finding
    suppression: SuppressionNote


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """What a rule concluded about one report for one namespace and image.

    `counted` decide the breach; `uncounted` are shown but do not count (unfixed under `fixable_only`, CVSS under
    `min_cvss`); `expired` are counted findings whose suppression has run out; `ignored_unfixed` were dropped by
    `ignore_unfixed` and are not listed at all.
    """

    rule: ShortText
    breach: bool
    reasons: list[ShortText]
    counts: SeverityCounts
    counted: list[Finding]
    uncounted: list[Finding] = []
    suppressed: list[SuppressedFinding] = []
    expired: list[SuppressedFinding] = []
    ignored_unfixed: int = 0


def evaluate(
    rule: PolicyRule,
    suppressions: Sequence[Suppression],
    report: Report,
    namespace: str | None,
    image: str,
    now: datetime,
) -> Verdict:
    """Apply one resolved rule and the suppressions to a report as run by `image` in `namespace`. A finding whose CVSS is unknown is never filtered by `min_cvss`: unknown is not low."""
    return evaluate_findings(rule, suppressions, report.findings, namespace, image, now)


def evaluate_findings(
    rule: PolicyRule,
    suppressions: Sequence[Suppression],
    findings: Sequence[Finding],
    namespace: str | None,
    image: str,
    now: datetime,
) -> Verdict:
    """`evaluate` over findings alone: the admission gate keeps a compact copy of each digest's findings in memory
    instead of whole reports."""
    repository, digest_ref = _image_names(image)
    counted: list[Finding] = []
    uncounted: list[Finding] = []
    suppressed: list[SuppressedFinding] = []
    expired: list[SuppressedFinding] = []
    ignored_unfixed = 0
    by_id = _by_id(suppressions)
    for finding in findings:
        if rule.ignore_unfixed and not finding.fixable:
            ignored_unfixed += 1
            continue
        candidates = by_id.get(finding.id.casefold())
        active, lapsed = (
            _suppression_for(candidates, finding, namespace, repository, digest_ref, now)
            if candidates
            else (None, None)
        )
        if active is not None:
            suppressed.append(SuppressedFinding(finding=finding, suppression=_note(active)))
            continue
        if (rule.fixable_only and not finding.fixable) or (
            rule.min_cvss is not None and finding.cvss is not None and finding.cvss < rule.min_cvss
        ):
            uncounted.append(finding)
            continue
        counted.append(finding)
        if lapsed is not None:
            expired.append(SuppressedFinding(finding=finding, suppression=_note(lapsed)))
    tally = dict.fromkeys(SEVERITIES, 0)
    for finding in counted:
        tally[finding.severity] += 1
    reasons = []
    for severity in SEVERITIES:
        limit = rule.threshold.limit(severity)
        if limit is not None and tally[severity] > limit:
            reasons.append(f"{tally[severity]} {severity} (more than {limit})")
    return Verdict(
        rule=rule.name,
        breach=bool(reasons),
        reasons=reasons,
        counts=SeverityCounts(**tally),
        counted=sorted(counted, key=worst_first),
        uncounted=sorted(uncounted, key=worst_first),
        suppressed=sorted(suppressed, key=lambda s: worst_first(s.finding)),
        expired=sorted(expired, key=lambda s: worst_first(s.finding)),
        ignored_unfixed=ignored_unfixed,
    )


def worst_first(finding: Finding) -> tuple[int, float, str, str, str, str]:
    """Sort key: severity, then CVSS (unknown last), then identity, so lists are stable across runs."""
    return (
        -_RANK[finding.severity],
        -(finding.cvss if finding.cvss is not None else -1.0),
        finding.id,
        finding.package,
        finding.installed_version,
        finding.pkg_path or finding.target,
    )


def severity_at_least(severity: Severity, floor: Severity) -> bool:
    return _RANK[severity] >= _RANK[floor]


def _image_names(image: str) -> tuple[str, str]:
    """(repository, digest ref or "") of an image given as repo@sha256:…, repo:tag or repo."""
    match = DIGEST_REF_RE.match(image)
    if match:
        return match["repo"], image
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return (name[:colon] if colon > slash else name), ""


def _by_id(suppressions: Sequence[Suppression]) -> dict[str, list[Suppression]]:
    index: dict[str, list[Suppression]] = {}
    for suppression in suppressions:
        index.setdefault(suppression.id.casefold(), []).append(suppression)
    return index


def _suppression_for(
    candidates: Sequence[Suppression],
    finding: Finding,
    namespace: str | None,
    repository: str,
    digest_ref: str,
    now: datetime,
) -> tuple[Suppression | None, Suppression | None]:
    """(an active suppression, else the most recently expired one) among those for this finding's id that match."""
    lapsed: Suppression | None = None
    for suppression in candidates:
        if suppression.package is not None and not _glob(suppression.package, finding.package):
            continue
        if suppression.namespace is not None and (namespace is None or not _glob(suppression.namespace, namespace)):
            continue
        if suppression.image is not None:
            subject = digest_ref if "@" in suppression.image else repository
            if not subject or not _glob(suppression.image, subject):
                continue
        if now < suppression.expires:
            return suppression, None
        if lapsed is None or suppression.expires > lapsed.expires:
            lapsed = suppression
    return None, lapsed


def _note(suppression: Suppression) -> SuppressionNote:
    return SuppressionNote(owner=suppression.owner, reason=suppression.reason, expires=suppression.expires)


# ---------------------------------------------------------------------------------------------------------------
# Dedup


def finding_hash(finding: Finding) -> FindingHash:
    """64 bits of SHA-256 over a finding's identity across scans (`Finding.key`)."""
    return _identity_hash(finding.key)


@lru_cache(maxsize=65536)
def _identity_hash(key: tuple[str, str, str, str]) -> str:
    return hashlib.sha256("\x1f".join(key).encode()).hexdigest()[:16]


def fingerprint(verdict: Verdict, scan_id: str | None = None) -> NotifyFingerprint:
    """What to remember about a verdict so the next report alerts only on what is new. Independent of the order
    of findings in the report, of their display fields, and of the scan that found them (`scan_id` is a note)."""
    return NotifyFingerprint(
        breach=verdict.breach,
        findings=sorted({finding_hash(f) for f in verdict.counted}),
        scan_id=scan_id,
    )
