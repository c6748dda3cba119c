"""Decides one AdmissionReview request from the in-memory view and the shared policy (podsweep/policy.py).

Pure: no awaits, no clients, no clock it was not given. Hostile text (images, names, labels, annotations) is
validated against schemas/refs.py before it is used, and is shown to people only truncated and without control
characters. Never raises on odd input: the worst case is an allow with a logged reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import msgspec

from podsweep.config import AdmissionBypass, Settings
from podsweep.policy import Policy, PolicyRule, Verdict, evaluate_findings, glob_matches, rule_for
from schemas.admission import (
    AdmissionDecided,
    AdmissionMode,
    AdmissionVerdict,
    AdmittedImage,
    ImageVerdict,
    Requester,
)
from schemas.alerts import SuppressionNote
from schemas.events import SEVERITIES, SeverityCounts, Workload
from schemas.refs import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, IMAGE_RE, MAX_DIGEST_REF
from schemas.report import Finding
from services.admission.review import AdmissionRequest, AdmissionResponse, Container, KubeObject, PodSpec, Status
from services.admission.view import DigestEntry, Lookup, View

# Kinds whose pod spec (or template) the gate reads; anything else is allowed with a logged reason.
POD = "Pod"
# The one subresource judged: `kubectl debug` adds containers to a running pod through it (an UPDATE of the Pod).
EPHEMERAL = "ephemeralcontainers"
TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"})
# The opt-in self-service bypass (honoured only in annotation_bypass_namespaces): a label selects it, annotations
# say who, why and until when.
BYPASS_LABEL = "podsweep.io/admission-bypass"
BYPASS_OWNER = "podsweep.io/bypass-owner"
BYPASS_REASON = "podsweep.io/bypass-reason"
BYPASS_EXPIRES = "podsweep.io/bypass-expires"
NOTIFY_ANNOTATION = "podsweep.io/notify"
MAX_WARNINGS = 8  # the apiserver keeps 4 KiB of warnings; each one here is at most WARNING_CHARS
WARNING_CHARS = 240
MESSAGE_CHARS = 2000
TOP_FINDINGS = 3
MAX_GROUPS = 32  # of the requester's groups kept in an audit

_LABEL_RE = re.compile(DNS_LABEL_PATTERN)
_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
_KIND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,62}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class GateRules:
    """What the gate applies besides the policy, from AdmissionSettings (validated there, naming the key)."""

    cluster: str
    default_mode: AdmissionMode = "warn"
    modes: tuple[tuple[str, AdmissionMode], ...] = ()
    unknown_images: str = "warn"
    exempt: tuple[str, ...] = ("kube-system", "podsweep")
    check_templates: bool = True
    bypasses: tuple[AdmissionBypass, ...] = ()
    annotation_bypass_namespaces: tuple[str, ...] = ()
    max_bypass: timedelta = timedelta(days=30)

    def mode_for(self, namespace: str) -> AdmissionMode:
        for glob, mode in self.modes:
            if glob_matches(glob, namespace):
                return mode
        return self.default_mode

    def exempted(self, namespace: str) -> bool:
        return any(glob_matches(glob, namespace) for glob in self.exempt)


def rules_from(settings: Settings) -> GateRules:
    a = settings.admission
    modes: list[tuple[str, AdmissionMode]] = []
    for entry in a.namespace_modes:
        glob, _, mode = entry.partition("=")
        modes.append((glob, _mode(mode)))
    return GateRules(
        cluster=settings.cluster,
        default_mode=a.default_mode,
        modes=tuple(modes),
        unknown_images=a.unknown_images,
        exempt=tuple(dict.fromkeys([*a.exempt_namespaces, settings.namespace])),
        check_templates=a.check_templates,
        bypasses=tuple(a.bypasses),
        annotation_bypass_namespaces=tuple(a.annotation_bypass_namespaces),
        max_bypass=timedelta(days=a.max_bypass_days),
    )


def _mode(text: str) -> AdmissionMode:
    if text == "off":
        return "off"
    return "enforce" if text == "enforce" else "warn"


@dataclass(frozen=True)
class Decision:
    """The response, the audit event (None for a plain allow), digests to ask scans for, and what to log/count."""

    response: AdmissionResponse
    outcome: str  # the metric label: allow, exempt, off, skipped, or an AdmissionVerdict
    namespace: str
    audit: AdmissionDecided | None = None
    rescans: tuple[str, ...] = ()
    log_reason: str = ""


@dataclass(frozen=True)
class _Judged:
    image: AdmittedImage
    detail: str  # one sentence for people: the image, how it resolved, what breached and the top findings
    rescan: str | None = None


@dataclass
class _Subject:
    kind: str
    namespace: str
    name: str | None
    workload: Workload
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    containers: list[Container] = field(default_factory=list)


def shown(text: str, limit: int = 200) -> str:
    """Someone else's text, safe to show: control characters replaced, bounded."""
    text = _CONTROL_RE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def allow(uid: str, namespace: str, outcome: str, log_reason: str = "") -> Decision:
    return Decision(AdmissionResponse(uid=uid, allowed=True), outcome, namespace, log_reason=log_reason)


def decide(
    request: AdmissionRequest,
    view: View,
    policy: Policy,
    rules: GateRules,
    now: datetime,
    cache: VerdictCache | None = None,
) -> Decision:
    """Judge every container image the request brings (new ones only, on UPDATE) and answer for the object."""
    uid = request.uid
    namespace = request.namespace
    kind = request.kind.kind
    if not _LABEL_RE.match(namespace) or len(namespace) > 63:
        return allow(uid, "", "skipped", f"namespace {shown(namespace, 80)!r} is not a namespace name")
    if request.operation not in ("CREATE", "UPDATE"):
        return allow(uid, namespace, "skipped", f"operation {shown(request.operation, 20)!r} is not judged")
    if kind != POD and (kind not in TEMPLATE_KINDS or not rules.check_templates):
        return allow(uid, namespace, "skipped", f"kind {shown(kind, 60)!r} is not judged")
    if request.sub_resource and not (kind == POD and request.sub_resource == EPHEMERAL):
        return allow(uid, namespace, "skipped", f"subresource {shown(request.sub_resource, 40)!r} is not judged")
    if rules.exempted(namespace):
        return allow(uid, namespace, "exempt")
    mode = rules.mode_for(namespace)
    if mode == "off":
        return allow(uid, namespace, "off")
    if request.object is None:
        return allow(uid, namespace, "skipped", "the request carries no object")
    subject = _subject(kind, namespace, request.name, request.object)
    if request.operation == "UPDATE" and request.old_object is not None:
        before = {c.image for c in _subject(kind, namespace, request.name, request.old_object).containers}
        subject.containers = [c for c in subject.containers if c.image not in before]
    if not subject.containers:
        return allow(uid, namespace, "allow")

    route = subject.annotations.get(NOTIFY_ANNOTATION)
    rule = rule_for(policy, namespace, subject.workload, route if route and _LABEL_RE.match(route) else None)
    judged = [_judge(c, view, rule, policy, namespace, now, cache) for c in _unique(subject.containers)]
    breaches = [j for j in judged if j.image.verdict == "breach"]
    unknowns = [j for j in judged if j.image.verdict in ("unknown", "unscanned")]
    suppressed = [j for j in judged if j.image.verdict == "suppressed"]
    rescans = tuple(dict.fromkeys(j.rescan for j in judged if j.rescan))
    if not breaches and not unknowns and not suppressed:
        return allow(uid, namespace, "allow")

    what = f"{kind} {subject.name or subject.workload.name} in namespace {namespace}"
    notes: list[str] = []
    if breaches or unknowns:
        bypass, bypass_note = _bypass(subject, rules, now)
        if bypass_note:
            notes.append(bypass_note)
        if bypass is not None:
            reason = (
                f"podsweep admitted {what} under a bypass by {bypass.owner} until {bypass.expires.date()}: "
                f"{shown(bypass.reason, 300)}"
            )
            warnings = [reason, *(j.detail for j in breaches + unknowns)]
            return _answer(
                request, subject, mode, "bypass", True, reason, judged, warnings, rules, now, rescans, bypass
            )

    if breaches:
        details = " ".join(j.detail for j in breaches)
        if mode == "enforce":
            reason = (
                f"podsweep denied {what}: {details} To admit it: rebuild the image with the fixes, or add a "
                "suppression (id, owner, reason, expires) to the podsweep policy, or ask for a bypass "
                "(docs/admission.md)."
            )
            return _answer(request, subject, mode, "deny", False, reason, judged, notes, rules, now, rescans)
        reason = f"podsweep would deny {what} in enforce mode: {details}"
        warnings = [*(j.detail for j in breaches), *(j.detail for j in unknowns), *notes]
        return _answer(request, subject, mode, "warn", True, reason, judged, warnings, rules, now, rescans)
    if unknowns:
        details = " ".join(j.detail for j in unknowns)
        if mode == "enforce" and rules.unknown_images == "deny":
            reason = (
                f"podsweep denied {what}: {details} Strict mode admits only images podsweep has scanned: run it "
                "once where the policy allows, or pin a digest podsweep knows."
            )
            return _answer(request, subject, mode, "deny", False, reason, judged, notes, rules, now, rescans)
        reason = f"podsweep has no report for every image of {what}: {details}"
        warnings = [*(j.detail for j in unknowns), *notes]
        return _answer(request, subject, mode, "unknown", True, reason, judged, warnings, rules, now, rescans)
    details = " ".join(j.detail for j in suppressed)
    reason = f"podsweep admitted {what} because suppressions cover its breach: {details}"
    warnings = [j.detail for j in suppressed]
    return _answer(request, subject, mode, "suppressed", True, reason, judged, warnings, rules, now, rescans)


def _answer(
    request: AdmissionRequest,
    subject: _Subject,
    mode: AdmissionMode,
    verdict: AdmissionVerdict,
    allowed: bool,
    reason: str,
    judged: Sequence[_Judged],
    warnings: Sequence[str],
    rules: GateRules,
    now: datetime,
    rescans: tuple[str, ...],
    bypass: SuppressionNote | None = None,
) -> Decision:
    message = shown(reason, MESSAGE_CHARS)
    status = None if allowed else Status(code=403, message=message)
    response = AdmissionResponse(
        uid=request.uid,
        allowed=allowed,
        status=status,
        warnings=[shown(w, WARNING_CHARS) for w in warnings[:MAX_WARNINGS]],
    )
    audit = AdmissionDecided(
        cluster=rules.cluster,
        uid=shown(request.uid, 128),
        namespace=subject.namespace,
        kind=subject.kind,
        name=subject.name,
        operation="CREATE" if request.operation == "CREATE" else "UPDATE",
        workload=subject.workload,
        mode=mode,
        verdict=verdict,
        allowed=allowed,
        reason=shown(reason, 4000),
        images=[j.image for j in judged],
        bypass=bypass,
        user=shown(request.user_info.username, 200),
        requester=Requester(
            username=shown(request.user_info.username, 200),
            uid=shown(request.user_info.uid, 200),
            groups=[shown(g, 200) for g in request.user_info.groups[:MAX_GROUPS]],
        ),
        decided_at=now,
    )
    return Decision(response, verdict, subject.namespace, audit, () if request.dry_run else rescans)


# ---------------------------------------------------------------------------------------------------------------
# The object


def _subject(kind: str, namespace: str, request_name: str, obj: KubeObject) -> _Subject:
    meta = obj.metadata
    name = meta.name or request_name
    valid_name = name if name and _SUBDOMAIN_RE.match(name) and len(name) <= 253 else None
    labels = dict(meta.labels)
    annotations = dict(meta.annotations)
    spec: PodSpec
    if kind == POD:
        spec = PodSpec(obj.spec.containers, obj.spec.init_containers, obj.spec.ephemeral_containers)
        workload = _pod_workload(obj, valid_name)
    else:
        template = obj.spec.template
        if kind == "CronJob":
            template = obj.spec.job_template.spec.template if obj.spec.job_template is not None else None
        spec = template.spec if template is not None else PodSpec()
        if template is not None:
            # The pods will carry the template's labels: a bypass or a rule on them applies to the workload too.
            labels = {**template.metadata.labels, **labels}
            annotations = {**template.metadata.annotations, **annotations}
        workload = Workload(kind=kind, name=valid_name or "unnamed")
    containers = [*spec.init_containers, *spec.containers, *spec.ephemeral_containers]
    return _Subject(kind, namespace, valid_name, workload, labels, annotations, containers)


def _pod_workload(obj: KubeObject, name: str | None) -> Workload:
    """The controller that owns the pod, one level up (a ReplicaSet's Deployment by its pod-template-hash)."""
    for owner in obj.metadata.owner_references:
        if not owner.controller or not _KIND_RE.match(owner.kind) or not _SUBDOMAIN_RE.match(owner.name):
            continue
        hash_ = obj.metadata.labels.get("pod-template-hash", "")
        if owner.kind == "ReplicaSet" and hash_ and owner.name.endswith(f"-{hash_}"):
            return Workload(kind="Deployment", name=owner.name[: -len(hash_) - 1])
        return Workload(kind=owner.kind, name=owner.name)
    if name:
        return Workload(kind=POD, name=name)
    base = obj.metadata.generate_name.rstrip("-.")
    return Workload(kind=POD, name=base if base and _SUBDOMAIN_RE.match(base) else "unnamed")


def _unique(containers: Sequence[Container]) -> list[Container]:
    """One judgement per image (sidecars often repeat one)."""
    seen: dict[str, Container] = {}
    for container in containers:
        seen.setdefault(container.image, container)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------------------------
# One image


class VerdictCache:
    """Memo of `evaluate_findings` per (digest entry, namespace, rule) under one policy object: the same images are
    admitted over and over, and their verdict changes only with a new report, a new policy or an expiring
    suppression. Deterministic: a hit returns what evaluating again would."""

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self.policy: Policy | None = None
        self.entries: dict[tuple[str, str, str], tuple[DigestEntry, Verdict, Verdict | None, datetime | None]] = {}

    def get(
        self, policy: Policy, key: tuple[str, str, str], entry: DigestEntry, now: datetime
    ) -> tuple[Verdict, Verdict | None] | None:
        if policy is not self.policy:
            self.policy = policy
            self.entries.clear()
            return None
        hit = self.entries.get(key)
        if hit is None or hit[0] is not entry or (hit[3] is not None and now >= hit[3]):
            return None
        return hit[1], hit[2]

    def put(self, key: tuple[str, str, str], entry: DigestEntry, result: Verdict, without: Verdict | None) -> None:
        if len(self.entries) >= self.size:
            self.entries.clear()  # rare and cheap to refill; an LRU would cost every hit
        expiries = [s.suppression.expires for s in result.suppressed]
        self.entries[key] = (entry, result, without, min(expiries) if expiries else None)


def _evaluated(
    cache: VerdictCache | None, rule: PolicyRule, policy: Policy, entry: DigestEntry, namespace: str, now: datetime
) -> tuple[Verdict, Verdict | None]:
    """The verdict with the policy's suppressions and, when any applied, the verdict without them."""
    key = (entry.digest_ref, namespace, rule.name)
    if cache is not None:
        hit = cache.get(policy, key, entry, now)
        if hit is not None:
            return hit
    findings = entry.findings or ()
    result = evaluate_findings(rule, policy.suppressions, findings, namespace, entry.digest_ref, now)
    without = None
    if result.suppressed and not result.breach:
        without = evaluate_findings(rule, (), findings, namespace, entry.digest_ref, now)
    if cache is not None:
        cache.put(key, entry, result, without)
    return result, without


def _judge(
    container: Container,
    view: View,
    rule: PolicyRule,
    policy: Policy,
    namespace: str,
    now: datetime,
    cache: VerdictCache | None,
) -> _Judged:
    image = container.image
    label = f"image {shown(image, 160)}"
    if len(image) > MAX_DIGEST_REF + 129 or not IMAGE_RE.match(image):
        return _Judged(
            _admitted(container, "unknown"),
            f"{label} is not an image reference podsweep can look up (repo[:tag][@sha256:…]).",
        )
    found = view.lookup(image)
    via = _via(found)
    entry = found.entry
    if entry is None:
        return _Judged(
            _admitted(container, "unknown", found),
            f"{label}{via} has never been seen running in this cluster, so podsweep has no report for it.",
        )
    if entry.report is None:
        return _Judged(
            _admitted(container, "unscanned", found),
            f"{label}{via} runs in this cluster but has no report yet; a scan was requested.",
            rescan=entry.digest_ref,
        )
    if entry.findings is None:
        reasons = _count_reasons(rule, entry.report.counts, entry.report.fixable)
        verdict: ImageVerdict = "breach" if reasons else "clean"
        admitted = _admitted(container, verdict, found, rule.name, entry.report.counts, reasons)
        detail = f"{label}{via} breaches rule {rule.name!r}: {'; '.join(reasons)} (counts only: findings loading)."
        return _Judged(admitted, detail if reasons else "")
    result, without = _evaluated(cache, rule, policy, entry, namespace, now)
    top = [f.id for f in result.counted[:TOP_FINDINGS]]
    if result.breach:
        admitted = _admitted(container, "breach", found, rule.name, result.counts, result.reasons, top)
        return _Judged(
            admitted,
            f"{label}{via} breaches rule {rule.name!r}: {'; '.join(result.reasons)}; top: {_top(result.counted)}.",
        )
    if without is not None and without.breach:
        notes = _notes(result)
        admitted = _admitted(container, "suppressed", found, rule.name, result.counts, without.reasons, top, notes)
        owners = ", ".join(sorted({f"{n.owner} until {n.expires.date()}" for n in notes}))
        ids = ", ".join(sorted({s.finding.id for s in result.suppressed}))[:120]
        return _Judged(
            admitted,
            f"{label}{via} would breach ({'; '.join(without.reasons)}) but {ids} are suppressed by {owners}.",
        )
    return _Judged(_admitted(container, "clean", found, rule.name, result.counts), "")


def _admitted(
    container: Container,
    verdict: ImageVerdict,
    found: Lookup | None = None,
    rule: str = "",
    counts: SeverityCounts | None = None,
    reasons: Sequence[str] = (),
    findings: Sequence[str] = (),
    suppressions: Sequence[SuppressionNote] = (),
) -> AdmittedImage:
    return AdmittedImage(
        container=shown(container.name, 200),
        image=shown(container.image, 256),
        digest_ref=found.digest_ref if found is not None else None,
        resolution=found.resolution if found is not None else "unknown",
        verdict=verdict,
        rule=rule,
        counts=counts,
        reasons=list(reasons),
        findings=[shown(f, 200) for f in findings],
        suppressions=list(suppressions),
    )


def _via(found: Lookup) -> str:
    if found.resolution != "tag" or found.digest_ref is None:
        return ""
    short = found.digest_ref.rsplit("@", 1)[1][:19]
    when = f" at {found.seen_at.strftime('%Y-%m-%dT%H:%MZ')}" if found.seen_at is not None else ""
    return f" (tag → {short}…, the digest last seen running it{when}; tags move, pin a digest to be sure)"


def _top(findings: Sequence[Finding]) -> str:
    parts = []
    for f in findings[:TOP_FINDINGS]:
        fix = f" fixed in {f.fixed_version}" if f.fixed_version else " no fix"
        parts.append(f"{f.id} ({f.severity} {f.package} {f.installed_version},{fix})")
    return shown(", ".join(parts), 600)


def _notes(verdict: Verdict) -> list[SuppressionNote]:
    seen: dict[tuple[str, str, datetime], SuppressionNote] = {}
    for s in verdict.suppressed:
        seen.setdefault((s.suppression.owner, s.suppression.reason, s.suppression.expires), s.suppression)
    return list(seen.values())


def _count_reasons(rule: PolicyRule, counts: SeverityCounts, fixable: SeverityCounts) -> list[str]:
    """The threshold over counts alone (fixable counts when only fixable findings count): an upper bound on what
    the findings would count, used until they are loaded."""
    use = fixable if (rule.fixable_only or rule.ignore_unfixed) else counts
    reasons = []
    for severity in SEVERITIES:
        limit = rule.threshold.limit(severity)
        n = getattr(use, severity)
        if limit is not None and n > limit:
            reasons.append(f"{n} {severity} (more than {limit})")
    return reasons


# ---------------------------------------------------------------------------------------------------------------
# Bypass


def _bypass(subject: _Subject, rules: GateRules, now: datetime) -> tuple[SuppressionNote | None, str]:
    """A configured bypass whose selector the labels match, else a valid annotation bypass where those are
    honoured. The second value explains an annotation bypass that was ignored (shown as a warning)."""
    for bypass in rules.bypasses:
        if bypass.namespaces and not any(glob_matches(g, subject.namespace) for g in bypass.namespaces):
            continue
        if any(subject.labels.get(k) != v for k, v in bypass.selector.items()):
            continue
        if now >= bypass.expires:
            continue
        return SuppressionNote(
            owner=shown(bypass.owner, 128), reason=shown(bypass.reason, 1024), expires=bypass.expires
        ), ""
    if subject.labels.get(BYPASS_LABEL) != "true":
        return None, ""
    if not any(glob_matches(g, subject.namespace) for g in rules.annotation_bypass_namespaces):
        return (
            None,
            f"label {BYPASS_LABEL} ignored: bypass annotations are not honoured in namespace {subject.namespace}.",
        )
    owner = subject.annotations.get(BYPASS_OWNER, "").strip()
    reason = subject.annotations.get(BYPASS_REASON, "").strip()
    expires_text = subject.annotations.get(BYPASS_EXPIRES, "").strip()
    problem = ""
    expires: datetime | None = None
    if not 0 < len(owner) <= 128 or _CONTROL_RE.search(owner):
        problem = f"{BYPASS_OWNER} must be 1-128 printable characters"
    elif not 0 < len(reason) <= 1024 or _CONTROL_RE.search(reason):
        problem = f"{BYPASS_REASON} must be 1-1024 printable characters"
    else:
        expires = _parse_expiry(expires_text)
        if expires is None:
            problem = f"{BYPASS_EXPIRES} must be a date or an RFC 3339 time with a zone (e.g. 2026-12-31)"
        elif expires <= now:
            problem = f"the bypass expired at {expires.isoformat()}"
        elif expires > now + rules.max_bypass:
            problem = f"{BYPASS_EXPIRES} is more than {rules.max_bypass.days} days away"
    if problem or expires is None:
        return None, f"bypass ignored: {problem}."
    return SuppressionNote(owner=owner, reason=reason, expires=expires), ""


_expiry_decoder = msgspec.json.Decoder(datetime)


def _parse_expiry(text: str) -> datetime | None:
    if len(text) > 40:
        return None
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        text += "T00:00:00Z"
    try:
        value = _expiry_decoder.decode(msgspec.json.encode(text))
    except msgspec.DecodeError:
        return None
    return value if value.tzinfo is not None else None
