"""The CLI run in the directory of a running `podsweep up`, with nothing configured, uses up's embedded servers.

The servers are started and the discovery file written by the code `up` runs (`podsweep_cli.app.start_embedded`); the
commands run as separate processes, with no PODSWEEP_* or AWS_* variable and no AWS files to fall back on.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from podsweep import bus as busmod
from podsweep import discovery, embedded
from podsweep.config import Settings
from podsweep.objectstore import ObjectStore
from podsweep_cli.app import _declare, start_embedded
from schemas import storage
from schemas.index import IndexedDigest, SummaryIndex
from schemas.state import SCANS_BUCKET, DigestScanState

HEX = "ab" * 32
DIGEST_REF = f"registry.example/app@sha256:{HEX}"


@dataclass
class RunningUp:
    workdir: Path
    settings: Settings


@pytest.fixture(scope="module")
def running_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningUp]:
    workdir = tmp_path_factory.mktemp("beside-up")
    root = embedded.private_dir(workdir / ".podsweep")
    started: list[embedded.EmbeddedNats | embedded.EmbeddedS3] = []
    try:
        settings = start_embedded(Settings(data_dir=str(root)), root, started, lambda _: None)
        asyncio.run(_seed(settings))
        yield RunningUp(workdir, settings)
    finally:
        discovery.remove(root, os.getpid())
        for server in reversed(started):
            server.stop()


async def _seed(settings: Settings) -> None:
    await _declare(settings)
    bus = await busmod.connect(settings.nats, "seed")
    try:
        kv = await bus.kv(SCANS_BUCKET)
        state = DigestScanState(digest_ref=DIGEST_REF, status="pending", last_seen_at=datetime.now(UTC))
        await busmod.kv_update(kv, HEX, DigestScanState, lambda _: state)
    finally:
        await bus.close()
    index = SummaryIndex(generated_at=datetime.now(UTC), digests={HEX: IndexedDigest(digest_ref=DIGEST_REF)})
    await ObjectStore(settings.s3).put(storage.SUMMARY_KEY, msgspec.json.encode(index))


def _cli(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODSWEEP_", "AWS_"))}
    env |= {
        "HOME": str(workdir),  # no ~/.aws, no ~/.kube
        "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", "podsweep", *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )


def test_status_finds_the_running_up(running_up: RunningUp) -> None:
    result = _cli(running_up.workdir, "status", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["digests"] == 1 and report["by_state"] == {"pending": 1}


def test_report_ls_finds_the_running_up(running_up: RunningUp) -> None:
    result = _cli(running_up.workdir, "report", "ls", "--json")
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)["digests"]) == [HEX]
    assert "AWS defaults" not in result.stderr


def test_cve_reads_the_running_ups_bucket(running_up: RunningUp) -> None:
    result = _cli(running_up.workdir, "cve", "CVE-2024-3094")  # no index yet: not found, rather than an error
    assert result.returncode == 1, result.stderr
    assert result.stderr == "CVE-2024-3094: no stored report has it\n"


def test_the_discovery_file_is_private_and_holds_no_secret(running_up: RunningUp) -> None:
    path = Path(running_up.settings.data_dir) / discovery.FILE
    assert path.stat().st_mode & 0o077 == 0
    text = path.read_text()
    assert running_up.settings.nats.password not in text
    assert running_up.settings.s3.secret_access_key not in text


def test_configured_servers_win_over_the_running_up(running_up: RunningUp) -> None:
    """A URL given by the user is used even beside `up` (here one nothing listens on: the command must fail)."""
    env_url = f"nats://127.0.0.1:{embedded.free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "podsweep", "status", "--json"],
        cwd=running_up.workdir,
        env={**os.environ, "PODSWEEP_NATS_URL": env_url, "PODSWEEP_NATS_CONNECT_TIMEOUT_S": "3"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert env_url in result.stderr


def test_a_file_left_by_an_up_that_stopped_is_ignored(tmp_path: Path) -> None:
    root = embedded.private_dir(tmp_path / ".podsweep")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = discovery.UpServers(
        pid=int(gone.stdout),
        nats=discovery.UpNats(
            url="nats://127.0.0.1:4222",
            credentials_file=str(root / embedded.NATS_USER_FILE),
            subject_root="podsweep",
            stream="PODSWEEP",
            kv_prefix="podsweep",
        ),
    )
    discovery.write(root, stale)
    result = _cli(tmp_path, "status", "--json")
    assert result.returncode == 2
    assert "running `podsweep up`" in result.stderr
