"""Scan Job manifests: golden files per option combination, and no event text reaches a spec unvalidated.

Regenerate the golden files with PODSWEEP_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import jobs, storage
from schemas.events import ImageSeen
from schemas.refs import DIGEST_REF_RE
from services.dispatcher import jobspec, plan
from services.dispatcher.jobspec import JobOptions, NodeScan, Resources, build_node_scan_job, validated_node_scan
from services.dispatcher.limits import Limits

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PODSWEEP_UPDATE_GOLDEN") == "1"
HEX = "c0ffee" + "0" * 58
REF = f"registry.example.com/team/app@sha256:{HEX}"
SCAN_ID = plan.scan_id_for(REF, 1)
RAW_URL = "https://s3.example.com/podsweep/raw/x.json?X-Amz-Signature=raw-secret"
SBOM_URL = "https://s3.example.com/podsweep/sbom/x.cdx.json?X-Amz-Signature=sbom-secret"


def _scan(**overrides: Any) -> NodeScan:
    fields: dict[str, Any] = {
        "scan_id": SCAN_ID,
        "digest_ref": REF,
        "node": "worker-1.example.internal",
        "raw_put_url": RAW_URL,
        "sbom_put_url": SBOM_URL,
    }
    return validated_node_scan(**{**fields, **overrides})


CASES = {
    "client-server-with-sbom": (_scan(), JobOptions()),
    "standalone-db-claim-severities-ignore-unfixed-no-sbom": (
        _scan(sbom_put_url=None),
        JobOptions(
            trivy_server=None,
            db_claim="trivy-db",
            severities=["CRITICAL", "HIGH"],
            ignore_unfixed=True,
            sbom=False,
            offline_scan=False,
        ),
    ),
    "affinity-dac-override-workload-ignore-unfixed": (
        _scan(ignore_unfixed=True),
        JobOptions(
            namespace="scans",
            pinning="affinity",
            read_capability="DAC_OVERRIDE",
            honor_workload_ignore_unfixed=True,
            priority_class="podsweep-low",
            active_deadline_seconds=1200,
            ttl_seconds_after_finished=60,
            scan_resources=Resources(requests_cpu="250m", requests_memory="512Mi", limits_cpu="2", limits_memory="2Gi"),
            trivy_image=f"registry.example.com/aquasec/trivy@sha256:{'a' * 64}",
            uploader_image="registry.example.com/podsweep:0.1.0",
        ),
    ),
}


def _yaml(manifest: dict[str, Any]) -> str:
    return yaml.safe_dump(manifest, sort_keys=False, width=1000)


@pytest.mark.parametrize("name", list(CASES))
def test_job_matches_its_golden_file(name: str) -> None:
    scan, options = CASES[name]
    text = _yaml(build_node_scan_job(scan, options))
    path = GOLDEN / f"jobspec-{name}.yaml"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PODSWEEP_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _containers(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = _pod(manifest)
    return {c["name"]: c for c in [*pod["initContainers"], *pod["containers"]]}


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_target_container_runs_as_root_and_every_other_is_locked_down(name: str) -> None:
    scan, options = CASES[name]
    manifest = build_node_scan_job(scan, options)
    pod = _pod(manifest)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert manifest["spec"]["backoffLimit"] == 0
    for container in _containers(manifest).values():
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        if container["name"] == "scan":
            assert (sc["runAsUser"], container["imagePullPolicy"]) == (0, "Never")
            assert sc["capabilities"]["add"] == [options.read_capability]
        else:
            assert sc["runAsUser"] == options.helper_uid != 0
            assert "add" not in sc["capabilities"]


@pytest.mark.parametrize("name", list(CASES))
def test_presigned_urls_are_only_in_env_never_in_command_or_args(name: str) -> None:
    scan, options = CASES[name]
    manifest = build_node_scan_job(scan, options)
    for container in _containers(manifest).values():
        argv = " ".join([*container.get("command", []), *container.get("args", [])])
        assert "X-Amz-Signature" not in argv
    upload_env = {e["name"]: e["value"] for e in _containers(manifest)["upload"]["env"]}
    assert upload_env[jobspec.RAW_URL_ENV] == RAW_URL
    assert "X-Amz-Signature" not in str(manifest["metadata"])


@pytest.mark.parametrize("name", list(CASES))
def test_trivy_in_the_target_image_reads_only_podsweeps_config_ignore_file_and_directory(name: str) -> None:
    scan, options = CASES[name]
    container = _containers(build_node_scan_job(scan, options))["scan"]
    args = container["args"]
    flags = dict(itertools.pairwise(args))
    assert (flags["--config"], flags["--ignorefile"]) == ("/dev/null", "/dev/null")
    assert container["workingDir"] == jobspec.WORK_DIR
    env = {e["name"]: e["value"] for e in container["env"]}
    assert len(env) == len(container["env"]), "each variable once"
    for name_ in ("TRIVY_SKIP_FILES", "TRIVY_SKIP_DIRS", "TRIVY_SEVERITY", "TRIVY_CONFIG", "TRIVY_IGNOREFILE"):
        assert env[name_] == ""
    for name_ in ("TRIVY_RUN_AS_PLUGIN", "XDG_DATA_HOME", "HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE"):
        assert env[name_] == ""
    assert (env["HOME"], env["TMPDIR"]) == (jobspec.WORK_DIR, jobspec.WORK_DIR)


def test_the_job_is_found_by_label_and_annotations_name_digest_keys_and_node() -> None:
    manifest = build_node_scan_job(_scan(), JobOptions())
    meta = manifest["metadata"]
    assert meta["name"] == SCAN_ID
    assert meta["labels"] == {
        jobs.MANAGED_BY_LABEL: jobs.MANAGED_BY_VALUE,
        jobspec.COMPONENT_LABEL: jobspec.COMPONENT_VALUE,
        jobs.SCAN_ID_LABEL: SCAN_ID,
    }
    assert manifest["spec"]["template"]["spec"]["serviceAccountName"] == "scan"
    assert meta["annotations"] == {
        jobs.DIGEST_REF_ANNOTATION: REF,
        jobs.RAW_KEY_ANNOTATION: storage.raw_key(REF, SCAN_ID),
        jobs.SBOM_KEY_ANNOTATION: storage.sbom_key(REF, SCAN_ID),
        jobs.MODE_ANNOTATION: "node",
        jobs.NODE_ANNOTATION: "worker-1.example.internal",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("digest_ref", "app:latest", id="tag-not-digest"),
        pytest.param("digest_ref", f"App@sha256:{HEX}", id="upper-case-repository"),
        pytest.param("digest_ref", f"app@sha256:{HEX}\n", id="trailing-newline"),
        pytest.param("digest_ref", f"app@sha256:{HEX}; rm -rf /", id="shell-suffix"),
        pytest.param("digest_ref", f"../../etc@sha256:{HEX}", id="path-traversal"),
        pytest.param("digest_ref", f"{'a/' * 200}b@sha256:{HEX}", id="oversized"),
        pytest.param("node", "node-1 --privileged", id="node-with-space"),
        pytest.param("node", "$(reboot)", id="node-with-command-substitution"),
        pytest.param("scan_id", "Psw-UPPER", id="scan-id-not-dns-label"),
        pytest.param("raw_put_url", "file:///etc/passwd", id="url-not-http"),
        pytest.param("raw_put_url", "https://s3/x?a=b\nHost: evil", id="url-with-header-injection"),
    ],
)
def test_hostile_input_is_refused_with_the_field_named(field: str, value: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=field):
        _scan(**{field: value})


def test_a_hand_made_struct_is_validated_again_by_the_builder() -> None:
    forged = NodeScan(scan_id=SCAN_ID, digest_ref="x; rm -rf /", node="n1", raw_put_url=RAW_URL)
    with pytest.raises(msgspec.ValidationError, match="digest_ref"):
        build_node_scan_job(forged, JobOptions())


@given(st.text(min_size=1, max_size=300))
@settings(max_examples=300, deadline=None)
def test_arbitrary_text_reaches_the_spec_only_when_it_is_a_digest_ref(text: str) -> None:
    try:
        manifest = build_node_scan_job(_scan(digest_ref=text), JobOptions())
    except msgspec.ValidationError:
        return
    assert DIGEST_REF_RE.fullmatch(text)
    assert _containers(manifest)["scan"]["image"] == text


_DNS = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")
_ANY = st.text(max_size=80)


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield str(value)


_SEEN = msgspec.json.Decoder(ImageSeen)


@given(
    namespace=st.one_of(_DNS, _ANY),
    pod=st.one_of(_DNS, _ANY),
    container=st.one_of(_DNS, _ANY),
    image=st.one_of(_ANY, st.just("app:1.0")),
    workload=st.one_of(_DNS, _ANY),
    node=st.one_of(_DNS, _ANY),
)
@settings(max_examples=200, deadline=None)
def test_event_text_other_than_digest_and_node_never_reaches_the_job(
    namespace: str, pod: str, container: str, image: str, workload: str, node: str
) -> None:
    """Decode an image.seen with arbitrary text, plan, build: the spec holds only the validated digest and node."""
    raw = msgspec.json.encode(
        {
            "cluster": "c1",
            "digest_ref": REF,
            "image": image,
            "node": node,
            "namespace": namespace,
            "pod": pod,
            "container": container,
            "container_kind": "app",
            "workload": {"kind": "Deployment", "name": workload},
            "observed_at": "2026-11-23T08:00:00Z",
        }
    )
    try:
        seen = _SEEN.decode(raw)
    except msgspec.ValidationError:
        return  # dead-lettered by the consumer loop, never planned
    decision = plan.on_seen(None, seen, seen.observed_at, plan.Policy(cluster="c1"), {}, Limits())
    assert decision.scan is not None and decision.scan.node is not None
    scan = validated_node_scan(
        scan_id=decision.scan.scan_id,
        digest_ref=decision.scan.digest_ref,
        node=decision.scan.node,
        raw_put_url=RAW_URL,
        sbom_put_url=SBOM_URL,
    )
    leaves = set(_leaves(build_node_scan_job(scan, JobOptions())))
    baseline = set(_leaves(build_node_scan_job(_scan(scan_id=decision.scan.scan_id), JobOptions())))
    assert leaves - baseline <= {seen.node}
    assert baseline - leaves <= {"worker-1.example.internal"}


def _item(n: int, **overrides: Any) -> dict[str, Any]:
    ref = f"registry.example.com/team/app{n}@sha256:{n:064x}"
    fields = {
        "scan_id": plan.scan_id_for(ref, 7),
        "digest_ref": ref,
        "sbom_get_url": f"https://s3.example.com/podsweep/sbom/{n}.cdx.json?X-Amz-Signature=get-{n}",
        "raw_put_url": f"https://s3.example.com/podsweep/raw/{n}.json?X-Amz-Signature=put-{n}",
    }
    return {**fields, **overrides}


def _batch(items: list[dict[str, Any]]) -> jobspec.SbomRescan:
    return msgspec.convert({"batch_id": "psw-batch-0001", "items": items}, jobspec.SbomRescan)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param("client-server", JobOptions(), id="client-server"),
        pytest.param("standalone", JobOptions(trivy_server=None, db_claim="trivy-db"), id="standalone"),
    ],
)
def test_sbom_rescan_job_matches_its_golden_file(name: str, options: JobOptions) -> None:
    text = _yaml(jobspec.build_sbom_rescan_job(_batch([_item(1), _item(2)]), options))
    path = GOLDEN / f"sbom-rescan-{name}.yaml"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PODSWEEP_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_sbom_rescan_is_unpinned_non_root_and_lists_its_batch() -> None:
    items = [_item(n) for n in range(3)]
    manifest = jobspec.build_sbom_rescan_job(_batch(items), JobOptions())
    pod = _pod(manifest)
    assert "nodeName" not in pod and "affinity" not in pod and "tolerations" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    containers = _containers(manifest)
    assert list(containers) == ["install-trivy", "rescan"], "one container scans the whole batch"
    rescan = containers["rescan"]
    assert rescan["command"] == ["podsweep", "sbom-rescan"]
    assert rescan["args"][:2] == ["--count", "3"]
    env = {e["name"]: e["value"] for e in rescan["env"]}
    assert env == {
        **{f"PODSWEEP_SBOM_{n}_URL": i["sbom_get_url"] for n, i in enumerate(items)},
        **{f"PODSWEEP_RAW_{n}_URL": i["raw_put_url"] for n, i in enumerate(items)},
    }
    assert rescan["terminationMessagePolicy"] == "FallbackToLogsOnError", "its log's tail names a failed item"
    assert rescan["securityContext"]["readOnlyRootFilesystem"] is True
    assert rescan["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    assert all(c["securityContext"]["runAsUser"] != 0 for c in containers.values())
    assert all(c.get("imagePullPolicy") != "Never" for c in containers.values())
    listing = msgspec.json.decode(manifest["metadata"]["annotations"][jobs.BATCH_ANNOTATION])
    assert [e["scan_id"] for e in listing] == [i["scan_id"] for i in items]
    assert [e["raw_key"] for e in listing] == [storage.raw_key(i["digest_ref"], i["scan_id"]) for i in items]
    for c in containers.values():
        assert "X-Amz-Signature" not in " ".join([*c.get("command", []), *c.get("args", [])])


@pytest.mark.parametrize(
    "items",
    [
        pytest.param([], id="empty-batch"),
        pytest.param([_item(n) for n in range(jobspec.MAX_BATCH + 1)], id="batch-over-the-limit"),
        pytest.param([_item(1), _item(1)], id="same-scan-id-twice"),
        pytest.param([_item(1, digest_ref="app:latest")], id="item-digest-is-a-tag"),
        pytest.param([_item(1, sbom_get_url="https://s3/x y")], id="url-with-space"),
    ],
)
def test_bad_sbom_rescan_batch_is_refused(items: list[dict[str, Any]]) -> None:
    with pytest.raises(msgspec.ValidationError):
        _batch(items)


@pytest.mark.parametrize(
    ("deadline_s", "grace_s", "lifetime_s"),
    [(600, 120, 720), (60, 0, 60), (86400, 120, 86520), (600, -5, 600)],
    ids=["defaults", "no-grace", "longest-deadline", "negative-grace-adds-nothing"],
)
def test_presigned_urls_last_the_jobs_deadline_from_a_start_within_the_grace(
    deadline_s: int, grace_s: int, lifetime_s: int
) -> None:
    options = JobOptions(active_deadline_seconds=deadline_s)
    assert jobspec.url_lifetime_s(options, timedelta(seconds=grace_s)) == lifetime_s
