"""`podsweep check` exit codes on real Trivy reports (tests/fixtures/trivy/), local and stored in a real S3 with
the workloads in a real NATS KV."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
import typer
from typer.testing import CliRunner

from podsweep import bus as busmod
from podsweep.config import NatsSettings, S3Settings
from podsweep.objectstore import ObjectStore
from podsweep.reports import normalize
from schemas.events import ImageOptions, Workload
from schemas.index import IndexedDigest, NamespaceIndex, NamespaceWorkload, SummaryIndex, WorkloadImage
from schemas.state import WORKLOADS_BUCKET, DigestWorkloads, WorkloadRun
from schemas.storage import SUMMARY_KEY, latest_report_key, namespace_index_key
from services.notifier.cli import check_command

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "trivy"
APP = typer.Typer()
APP.command("check")(check_command)
APP.command("version")(lambda: None)  # a second command keeps `check` a subcommand, as under `podsweep`
DIGEST_A = "registry.example.com/team/app@sha256:" + "a" * 64
DIGEST_B = "registry.example.com/team/db@sha256:" + "b" * 64
DIGEST_GONE = "registry.example.com/team/gone@sha256:" + "c" * 64


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(APP, ["check", *args], env=env or {}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def suppression_policy(tmp_path: Path, cve: str, expires: datetime) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nsuppressions:\n"
        f"  - {{id: {cve}, owner: alice@example.com, reason: accepted risk, expires: '{expires.isoformat()}'}}\n"
    )
    return path


@pytest.mark.parametrize(
    ("fixture", "fail_on", "code"),
    [
        pytest.param("trivy-0.76-alpine.json", "CRITICAL", 1, id="critical-present"),
        pytest.param("trivy-0.76-gobinary.json", "CRITICAL", 0, id="only-high-below-critical"),
        pytest.param("trivy-0.76-gobinary.json", "high", 1, id="high-at-threshold-lower-case-option"),
        pytest.param("v2-cvss-v4.json", "HIGH", 0, id="medium-and-low-below-high"),
        pytest.param("v2-all-statuses.json", "LOW", 1, id="low-at-low"),
        pytest.param("v2-zero-vulns.json", "UNKNOWN", 0, id="no-vulnerabilities"),
        pytest.param("legacy-null.json", "UNKNOWN", 0, id="legacy-null-report"),
        pytest.param("legacy-centos-7-trivy-0.19.2.json", "HIGH", 1, id="legacy-array-report"),
        pytest.param("not-report-trivy-k8s-cluster.json", "LOW", 2, id="not-a-trivy-report"),
        pytest.param("does-not-exist.json", "LOW", 2, id="missing-file"),
    ],
)
def test_check_exit_code_on_a_local_report(fixture: str, fail_on: str, code: int) -> None:
    exit_code, out, err = invoke("--fail-on", fail_on, "--report", str(FIXTURES / fixture))
    assert exit_code == code, out + err
    if code == 2:
        assert "cannot decide" in err


def test_a_report_nested_1000_deep_cannot_be_decided_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_bytes(b'{"SchemaVersion": 2, "X": ' + b"[" * 1_000 + b"]" * 1_000 + b"}")
    exit_code, _, err = invoke("--fail-on", "LOW", "--report", str(path))
    assert exit_code == 2
    assert "cannot decide" in err and "nested deeper" in err


# Runs a podsweep command in a child interpreter and reports its peak RSS on the last line of stderr. VmHWM, not
# getrusage: ru_maxrss also counts the parent's pages the child had before exec (all of pytest's).
_MEASURED = (
    "import re, sys\n"
    "from podsweep_cli.app import app\n"
    "sys.argv[0] = 'podsweep'\n"
    "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\n"
    "with open('/proc/self/status') as status:\n"
    "    print(re.search(r'VmHWM:\\s+(\\d+) kB', status.read()).group(1), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def _measured(*args: str) -> tuple[int, str, int]:
    """(exit code, stdout, peak RSS in MiB) of `podsweep ARGS...`."""
    done = subprocess.run([sys.executable, "-c", _MEASURED, *args], capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout, int(done.stderr.strip().splitlines()[-1]) // 1024


def test_a_file_far_over_the_cap_is_refused_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    with path.open("wb") as file:
        file.truncate(300 * 1024 * 1024)  # sparse: 300 MiB that take no disk
    for command in (["check", "--fail-on", "LOW", "--report", str(path)], ["report", "parse", str(path)]):
        code, _, peak_mib = _measured(*command)
        assert code == 2
        assert peak_mib < 150, f"{command[0]}: {peak_mib} MiB; reading the file whole takes over 300"


def test_check_on_163000_findings_lists_every_one_in_bounded_memory(tmp_path: Path) -> None:
    severities = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN"]
    vulnerabilities = [
        {
            "VulnerabilityID": f"CVE-2099-{n:06d}",
            "PkgName": f"pkg{n % 5000}",
            "InstalledVersion": "1.0.0-r0",
            "FixedVersion": "1.0.1-r0",
            "Status": "fixed",
            "Severity": severities[n % 5],
            "Title": f"title {n}",
            "CVSS": {"nvd": {"V3Score": 7.5, "V3Vector": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"}},
        }
        for n in range(163_000)
    ]
    report = {
        "SchemaVersion": 2,
        "ArtifactName": "big",
        "Results": [{"Target": "t", "Vulnerabilities": vulnerabilities}],
    }
    path = tmp_path / "big.json"
    path.write_bytes(msgspec.json.encode(report))
    del vulnerabilities, report

    code, out, peak_mib = _measured("check", "--fail-on", "UNKNOWN", "--report", str(path))

    assert code == 1
    lines = out.splitlines()
    assert sum(line.startswith("CVE-", line.find("\t") + 1) for line in lines) == 163_000
    assert lines[-1].startswith("163000 findings at or above UNKNOWN")
    # Measured: 982 MiB when every row went into one table, 365 MiB printing a line per row.
    assert peak_mib < 600, f"{peak_mib} MiB"


def test_check_lists_what_remains_at_or_above() -> None:
    exit_code, out, _ = invoke("--fail-on", "HIGH", "--report", str(FIXTURES / "trivy-0.76-alpine.json"))
    assert exit_code == 1
    assert "CVE-2024-45491" in out and "CVE-2024-6119" in out
    assert "3 findings at or above HIGH" in out


@pytest.mark.parametrize(
    ("expires_in", "code", "note"),
    [
        pytest.param(timedelta(days=30), 0, "", id="active-suppression-passes"),
        pytest.param(timedelta(days=-1), 1, "suppression by alice@example.com expired", id="expired-counts-again"),
    ],
)
def test_check_applies_suppressions(tmp_path: Path, expires_in: timedelta, code: int, note: str) -> None:
    policy = suppression_policy(tmp_path, "CVE-2023-45853", datetime.now(UTC) + expires_in)
    exit_code, out, err = invoke(
        "--fail-on", "CRITICAL", "--report", str(FIXTURES / "trivy-0.76-debian.json"), "--policy", str(policy)
    )
    assert exit_code == code, out + err
    assert note in out.replace("\n", " ") or note in out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        pytest.param(["--fail-on", "LOW"], "exactly one of", id="no-source"),
        pytest.param(
            ["--fail-on", "LOW", "--digest", "sha256:" + "a" * 64, "--image", "x"], "exactly one of", id="two"
        ),
        pytest.param(
            ["--fail-on", "LOW", "--report", str(FIXTURES / "v2-zero-vulns.json"), "--policy", "/nonexistent.yaml"],
            "cannot be read",
            id="unreadable-policy",
        ),
    ],
)
def test_check_cannot_decide_says_why(args: list[str], reason: str) -> None:
    exit_code, _, err = invoke(*args)
    assert exit_code == 2 and reason in err


def test_check_refuses_an_invalid_policy_naming_the_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefaults:\n  threshold: {max_high: five}\n")
    exit_code, _, err = invoke(
        "--fail-on", "LOW", "--report", str(FIXTURES / "v2-zero-vulns.json"), "--policy", str(policy)
    )
    assert exit_code == 2 and "policy.yaml:3" in err and "max_high" in err


# ---------------------------------------------------------------------------------------------------------------
# Stored reports


@pytest.fixture
async def stored(nats_settings: NatsSettings, s3_settings: S3Settings) -> dict[str, str]:
    """Two digests with reports in S3 (alpine: a CRITICAL; gobinary: a HIGH), a third known but never reported."""
    store = ObjectStore(s3_settings)
    await store.ensure_bucket()
    for digest_ref, fixture in ((DIGEST_A, "trivy-0.76-alpine.json"), (DIGEST_B, "trivy-0.76-gobinary.json")):
        report = normalize.parse((FIXTURES / fixture).read_bytes(), digest_ref=digest_ref, scan_id="scan-0001")
        await store.put(latest_report_key(digest_ref), msgspec.json.encode(report))
    bus = await busmod.connect(nats_settings, "test")
    try:
        await busmod.ensure_stream(bus)
        kv = await bus.kv(WORKLOADS_BUCKET)
        runs = {
            DIGEST_A: ("payments", "api", "registry.example.com/team/app:1.4"),
            DIGEST_B: ("storage", "db", "registry.example.com/team/db:16"),
            DIGEST_GONE: ("storage", "cache", "registry.example.com/team/gone:1"),
        }
        for digest_ref, (namespace, name, image) in runs.items():
            run = WorkloadRun(
                namespace=namespace,
                workload=Workload(kind="Deployment", name=name),
                image=image,
                options=ImageOptions(),
            )
            doc = DigestWorkloads(digest_ref=digest_ref, runs=[run])
            await kv.put(digest_ref.rsplit(":", 1)[1], msgspec.json.encode(doc))
    finally:
        await bus.close()
    return {
        "PODSWEEP_NATS_URL": nats_settings.url,
        "PODSWEEP_NATS_USER": nats_settings.user,
        "PODSWEEP_NATS_PASSWORD": nats_settings.password,
        "PODSWEEP_NATS_SUBJECT_ROOT": nats_settings.subject_root,
        "PODSWEEP_NATS_STREAM": nats_settings.stream,
        "PODSWEEP_NATS_KV_PREFIX": nats_settings.kv_prefix,
        "PODSWEEP_S3_ENDPOINT_URL": s3_settings.endpoint_url,
        "PODSWEEP_S3_BUCKET": s3_settings.bucket,
        "PODSWEEP_S3_ACCESS_KEY_ID": s3_settings.access_key_id,
        "PODSWEEP_S3_SECRET_ACCESS_KEY": s3_settings.secret_access_key,
    }


@pytest.fixture
def no_podsweep_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the settings each test passes: none from the environment pytest runs in."""
    for name in [n for n in os.environ if n.startswith("PODSWEEP_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("args", "code", "shown"),
    [
        pytest.param(["--fail-on", "CRITICAL", "--digest", DIGEST_A], 1, "payments/Deployment/api", id="digest-ref"),
        pytest.param(["--fail-on", "CRITICAL", "--digest", "sha256:" + "b" * 64], 0, "", id="bare-digest-passes"),
        pytest.param(
            ["--fail-on", "HIGH", "--image", "registry.example.com/team/db:16"], 1, "storage/", id="image-tag"
        ),
        pytest.param(
            ["--fail-on", "CRITICAL", "--image", "registry.example.com/team/app"], 1, "CVE-2024-45491", id="repo"
        ),
        pytest.param(["--fail-on", "CRITICAL", "--namespace", "payments"], 1, "CVE-2024-45491", id="namespace"),
        pytest.param(["--fail-on", "CRITICAL", "--digest", DIGEST_GONE], 2, "", id="digest-without-report"),
        pytest.param(["--fail-on", "CRITICAL", "--namespace", "storage"], 2, "", id="namespace-partly-unreported"),
        pytest.param(["--fail-on", "HIGH", "--namespace", "storage"], 1, "CVE-", id="known-failure-beats-missing"),
        pytest.param(["--fail-on", "LOW", "--namespace", "nobody-here"], 2, "", id="unknown-namespace"),
        pytest.param(["--fail-on", "LOW", "--digest", "sha256:xyz"], 2, "", id="malformed-digest"),
    ],
)
def test_check_stored_reports(
    stored: dict[str, str], no_podsweep_env: None, args: list[str], code: int, shown: str
) -> None:
    exit_code, out, err = invoke(*args, env=stored)
    assert exit_code == code, out + err
    assert shown in out


async def test_check_uses_the_parsers_index_when_present(stored: dict[str, str], no_podsweep_env: None) -> None:
    """index/summary.json and index/namespaces/<ns>.json name the digests; a workload only the index knows (no KV
    run in that namespace) is still checked."""
    store = ObjectStore(
        S3Settings(
            endpoint_url=stored["PODSWEEP_S3_ENDPOINT_URL"],
            bucket=stored["PODSWEEP_S3_BUCKET"],
            access_key_id=stored["PODSWEEP_S3_ACCESS_KEY_ID"],
            secret_access_key=stored["PODSWEEP_S3_SECRET_ACCESS_KEY"],
        )
    )
    now = datetime.now(UTC)
    summary = SummaryIndex(
        generated_at=now,
        digests={
            "a" * 64: IndexedDigest(digest_ref=DIGEST_A, images=["registry.example.com/team/app:1.4"]),
            "b" * 64: IndexedDigest(digest_ref=DIGEST_B, images=["registry.example.com/team/db:16"]),
        },
    )
    indexed = NamespaceIndex(
        namespace="indexed",
        generated_at=now,
        workloads=[
            NamespaceWorkload(
                workload=Workload(kind="StatefulSet", name="web"),
                images=[WorkloadImage(image="registry.example.com/team/app:1.4", digest_ref=DIGEST_A)],
            )
        ],
    )
    await store.put(SUMMARY_KEY, msgspec.json.encode(summary))
    await store.put(namespace_index_key("indexed"), msgspec.json.encode(indexed))

    code, out, err = await asyncio.to_thread(invoke, "--fail-on", "CRITICAL", "--namespace", "indexed", env=stored)
    assert code == 1 and "indexed/StatefulSet/web" in out, out + err
    code, out, err = await asyncio.to_thread(
        invoke, "--fail-on", "HIGH", "--image", "registry.example.com/team/db:16", env=stored
    )
    assert code == 1 and "storage/Deployment/db" in out, out + err  # the KV adds the workload to the index's digest
    code, out, err = await asyncio.to_thread(
        invoke, "--fail-on", "LOW", "--image", "registry.example.com/team/gone:1", env=stored
    )
    assert code == 2 and "no workload is known to run image" in err  # the index, not the KV, answers
