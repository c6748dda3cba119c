"""admission.k8s.io/v1 AdmissionReview: only the fields the gate reads, decoded once at the edge, and the response.

Pure: no I/O. Everything in a request is someone else's text; nothing here is trusted beyond its type, and the
decision code validates image references and names before using them (schemas/refs.py).
"""

from __future__ import annotations

import re
import sys

import msgspec

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"


class GroupVersionKind(msgspec.Struct, frozen=True):
    group: str = ""
    version: str = ""
    kind: str = ""


class OwnerReference(msgspec.Struct, frozen=True):
    kind: str = ""
    name: str = ""
    controller: bool = False


class ObjectMeta(msgspec.Struct, frozen=True, rename="camel"):
    name: str = ""
    generate_name: str = ""
    namespace: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    owner_references: list[OwnerReference] = []


class Container(msgspec.Struct, frozen=True):
    name: str = ""
    image: str = ""


class PodSpec(msgspec.Struct, frozen=True, rename="camel"):
    containers: list[Container] = []
    init_containers: list[Container] = []
    ephemeral_containers: list[Container] = []


class PodTemplate(msgspec.Struct, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: PodSpec = PodSpec()


class JobSpec(msgspec.Struct, frozen=True):
    template: PodTemplate = PodTemplate()


class JobTemplate(msgspec.Struct, frozen=True):
    metadata: ObjectMeta = ObjectMeta()
    spec: JobSpec = JobSpec()


class ObjectSpec(msgspec.Struct, frozen=True, rename="camel"):
    """The union of what a Pod (containers…), a workload (template) and a CronJob (jobTemplate) carry."""

    containers: list[Container] = []
    init_containers: list[Container] = []
    ephemeral_containers: list[Container] = []
    template: PodTemplate | None = None
    job_template: JobTemplate | None = None


class KubeObject(msgspec.Struct, frozen=True):
    kind: str = ""
    metadata: ObjectMeta = ObjectMeta()
    spec: ObjectSpec = ObjectSpec()


class UserInfo(msgspec.Struct, frozen=True):
    """Who asked, as the apiserver states it in the request: claims podsweep cannot check itself."""

    username: str = ""
    uid: str = ""
    groups: list[str] = []


class AdmissionRequest(msgspec.Struct, frozen=True, rename="camel"):
    uid: str
    kind: GroupVersionKind = GroupVersionKind()
    sub_resource: str = ""
    namespace: str = ""
    name: str = ""
    operation: str = ""
    user_info: UserInfo = UserInfo()
    object: KubeObject | None = None
    old_object: KubeObject | None = None
    dry_run: bool = False


class AdmissionReview(msgspec.Struct, frozen=True, rename="camel"):
    api_version: str = ""
    kind: str = ""
    request: AdmissionRequest | None = None


class Status(msgspec.Struct, frozen=True):
    code: int
    message: str
    reason: str = "Forbidden"
    status: str = "Failure"


class AdmissionResponse(msgspec.Struct, frozen=True, omit_defaults=True):
    uid: str
    allowed: bool
    status: Status | None = None
    warnings: list[str] = []


class AdmissionReviewResponse(msgspec.Struct, frozen=True, rename="camel"):
    response: AdmissionResponse
    api_version: str = API_VERSION
    kind: str = KIND


class InvalidReview(ValueError):
    """A body that is not an admission/v1 AdmissionReview request; the message says what is wrong (for a 400)."""


_decoder = msgspec.json.Decoder(AdmissionReview)
# The uid becomes the audit's Nats-Msg-Id header: no spaces or line breaks, whoever posted the review.
_UID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}(?!\n)$")
_encoder = msgspec.json.Encoder()


def decode(body: bytes) -> AdmissionRequest:
    """The request inside an AdmissionReview body, or InvalidReview naming the problem."""
    try:
        review = _decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise InvalidReview(f"not an AdmissionReview: {str(exc)[:200]}") from None
    except RecursionError:  # msgspec bounds nesting by the interpreter's recursion limit (1,000 levels by default)
        raise InvalidReview(
            f"not an AdmissionReview: JSON nested too deeply (the decoder stops near {sys.getrecursionlimit()} "
            "levels; a Pod or a workload is a few dozen levels deep)"
        ) from None
    if review.api_version != API_VERSION or review.kind != KIND:
        raise InvalidReview(
            f"expected apiVersion {API_VERSION} kind {KIND}, got {review.api_version[:60]!r} {review.kind[:60]!r} "
            "(set admissionReviewVersions: [v1] in the webhook configuration)"
        )
    if review.request is None or not review.request.uid:
        raise InvalidReview("the AdmissionReview has no request (or no request.uid)")
    if not _UID_RE.match(review.request.uid):
        raise InvalidReview("request.uid must be 1-128 of [A-Za-z0-9._:-] (the apiserver sends a UUID)")
    return review.request


def encode(response: AdmissionResponse) -> bytes:
    return _encoder.encode(AdmissionReviewResponse(response=response))
