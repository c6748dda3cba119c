"""The admission gate's audit event: one `admission.decided` for every decision that is not a plain allow.

Pure types, no I/O. Image strings come from a pod spec someone else wrote: here they are display text only (bounded,
no control characters), never a key or a spec; the digest, when podsweep knows one, is a validated DigestRef.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from schemas.alerts import SuppressionNote
from schemas.events import Event, SeverityCounts, Workload
from schemas.refs import ClusterName, DigestRef, K8sLabelName, K8sName, ShortText, Text

# What the gate concluded about one object:
#   deny       refused (enforce mode: a breach, or an unknown image in strict mode)
#   warn       admitted with warnings naming the findings (warn mode, or a breach podsweep only reports)
#   unknown    admitted with a warning: an image podsweep has no report for (a scan is requested when it can be)
#   suppressed admitted because suppressions in the policy cover what would have breached
#   bypass     admitted because a bypass (label-selected, with owner, reason and expiry) covers the object
AdmissionVerdict = Literal["deny", "warn", "unknown", "suppressed", "bypass"]
AdmissionMode = Literal["off", "warn", "enforce"]
# How an image as written was tied to a digest: it names one, through the last digest seen running that tag,
# or not at all.
Resolution = Literal["digest", "tag", "unknown"]
ImageVerdict = Literal["clean", "breach", "suppressed", "unscanned", "unknown"]
Operation = Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]


class AdmittedImage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One container image of the object and what the gate knew about it."""

    container: ShortText
    image: ShortText  # as written in the spec, display only (truncated, control characters replaced)
    digest_ref: DigestRef | None = None
    resolution: Resolution = "unknown"
    verdict: ImageVerdict
    rule: ShortText = ""
    counts: SeverityCounts | None = None
    reasons: list[ShortText] = []  # "2 CRITICAL (more than 0)"
    findings: list[ShortText] = []  # the top counted finding ids, worst first
    suppressions: list[SuppressionNote] = []  # who accepted what made the difference


# Where the requester's identity in an audit came from: the AdmissionReview's `request.userInfo`, the apiserver's
# statement of who sent the request it is admitting, read from the body the gate received. The gate cannot check
# it; it is as trustworthy as the rule that only the apiserver can reach the gate (docs/admission.md).
IdentitySource = Literal["request.userInfo"]


class Requester(msgspec.Struct, frozen=True, kw_only=True):
    """Who asked for the object, as the admission request claims (display text, bounded; never checked by podsweep)."""

    source: IdentitySource = "request.userInfo"
    username: ShortText = ""
    uid: ShortText = ""
    groups: list[ShortText] = []  # at most 32


# In an audit, uid, namespace, kind, name, operation, user and requester are the request's own words (requester.source
# says so); mode, verdict, allowed, reason, images and bypass are what podsweep decided.
class AdmissionDecided(Event, frozen=True, kw_only=True):
    """Audit of one admission decision that was not a plain allow (published off the request path)."""

    cluster: ClusterName
    uid: ShortText  # the AdmissionReview request uid
    namespace: K8sLabelName
    kind: ShortText  # Pod, Deployment, ...
    name: K8sName | None = None  # None for a pod created with generateName
    operation: Operation
    workload: Workload
    mode: AdmissionMode
    verdict: AdmissionVerdict
    allowed: bool
    reason: Text
    images: list[AdmittedImage] = msgspec.field(default_factory=list)
    bypass: SuppressionNote | None = None
    user: ShortText = ""  # requester.username, kept for readers of earlier events: a claim from the request
    requester: Requester | None = None  # None in events from before it was recorded
    decided_at: datetime
