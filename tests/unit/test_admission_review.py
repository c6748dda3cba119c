"""AdmissionReview decoding at the edge: what is refused (a 400) and what the response looks like."""

from __future__ import annotations

import json

import msgspec
import pytest

from services.admission import review
from tests.harness.admission import pod
from tests.harness.admission import review as review_body

GOOD = review_body(pod("web", {"app": "nginx:1"}), "team-a", uid="0f1e2d3c-0000-4000-8000-000000000001")


def _with(**request: object) -> bytes:
    body = json.loads(json.dumps(GOOD))
    body["request"].update(request)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"", "not an AdmissionReview"),
        (b"{", "not an AdmissionReview"),
        (b"[]", "not an AdmissionReview"),
        (b'"AdmissionReview"', "not an AdmissionReview"),
        (json.dumps({**GOOD, "apiVersion": "admission.k8s.io/v1beta1"}).encode(), "admissionReviewVersions"),
        (json.dumps({**GOOD, "kind": "Pod"}).encode(), "expected apiVersion"),
        (json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(), "no request"),
        (_with(uid=""), "no request"),
        (_with(uid=7), "not an AdmissionReview"),
        (_with(uid="u" * 129), "1-128 of"),
        (_with(uid="abc\r\nNats-Msg-Id: x"), "1-128 of"),
        (_with(uid="abc\n"), "1-128 of"),
        (_with(object={"spec": {"containers": "nginx"}}), "not an AdmissionReview"),
        (_with(object={"metadata": {"labels": {"a": 1}}}), "not an AdmissionReview"),
        (b"\xff\xfe\x00garbage", "not an AdmissionReview"),
    ],
    ids=[
        "empty",
        "truncated",
        "array",
        "string",
        "v1beta1",
        "wrong-kind",
        "no-request",
        "empty-uid",
        "uid-not-a-string",
        "uid-too-long",
        "uid-header-injection",
        "uid-trailing-newline",
        "containers-not-a-list",
        "label-not-a-string",
        "binary",
    ],
)
def test_a_malformed_review_is_refused_with_a_reason(body: bytes, says: str) -> None:
    with pytest.raises(review.InvalidReview, match=says):
        review.decode(body)


def test_a_real_review_decodes_to_the_fields_used() -> None:
    request = review.decode(json.dumps(GOOD).encode())
    assert request.uid == "0f1e2d3c-0000-4000-8000-000000000001"
    assert (request.kind.kind, request.namespace, request.operation) == ("Pod", "team-a", "CREATE")
    assert request.object is not None and [c.image for c in request.object.spec.containers] == ["nginx:1"]
    assert request.user_info.username == "alice@example.com"


def test_the_response_is_an_admission_v1_review_with_warnings_and_status() -> None:
    denied = review.AdmissionResponse(
        uid="u1", allowed=False, status=review.Status(code=403, message="no"), warnings=["w"]
    )
    doc = msgspec.json.decode(review.encode(denied))
    assert doc == {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": "u1",
            "allowed": False,
            "status": {"code": 403, "message": "no", "reason": "Forbidden", "status": "Failure"},
            "warnings": ["w"],
        },
    }
    assert msgspec.json.decode(review.encode(review.AdmissionResponse(uid="u2", allowed=True)))["response"] == {
        "uid": "u2",
        "allowed": True,
    }


def _nested(depth: int) -> bytes:
    """A review whose object carries `depth` levels of arrays in a field the gate never reads."""
    head = json.dumps(GOOD)[:-3]  # up to the end of request.options' last value, inside request
    assert head.endswith('"CreateOptions"')
    return (head + '}, "extra": ' + "[" * depth + "]" * depth + "}}").encode()


def test_nesting_a_pod_never_reaches_is_decoded() -> None:
    assert review.decode(_nested(200)).uid == GOOD["request"]["uid"]


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_deep_nesting_is_refused_with_a_reason_not_a_crash(depth: int) -> None:
    with pytest.raises(review.InvalidReview, match="nested too deeply"):
        review.decode(_nested(depth))
