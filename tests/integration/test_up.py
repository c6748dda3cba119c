"""`podsweep up` as a person runs it: embedded NATS and S3 in a data dir, services running, clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.kube import KubeControlPlane


@pytest.mark.kube
def test_up_starts_embedded_servers_runs_and_stops_cleanly_on_ctrl_c(kube: KubeControlPlane, tmp_path: Path) -> None:
    """Run twice in the same directory, with its default data dir (.podsweep): the second run reuses the data, the
    credentials and the ports; while it runs, the CLI in that directory finds it with nothing configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODSWEEP_", "AWS_"))}
    env |= {"KUBECONFIG": str(kube.kubeconfig), "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true"}
    data = tmp_path / ".podsweep"
    addresses: list[list[str]] = []
    for run in (1, 2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "podsweep", "up"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("first sweep"):
                break
        output = "".join(lines)
        assert any(line.startswith("running:") for line in lines), output
        assert any(line.startswith("first sweep") and " digests: " in line for line in lines), output
        assert "no policy file: findings are stored, but no alert is sent" in output, output
        assert "PODSWEEP_NOTIFIER_POLICY_FILE" in output and "kind: webhook" in output
        addresses.append([line.split(" at ")[1].split(",")[0] for line in lines if line.startswith("embedded ")])
        assert len(addresses[-1]) == 2, output

        status = _cli(tmp_path, env, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert "digests" in json.loads(status.stdout.strip().splitlines()[-1])
        listing = _cli(tmp_path, env, "report", "ls", "--json")
        # The embedded bucket was read with up's credentials: either its index, or (no digest scanned yet, so the
        # parser wrote none) the answer that there is none, never AWS's defaults or a refused signature.
        assert listing.returncode == 0 or "no index in bucket podsweep yet" in listing.stderr, listing.stderr
        assert "AWS defaults" not in listing.stderr

        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"run {run}:\n{output}{out}"
        assert (data / "s3-identity.json").stat().st_mode & 0o077 == 0
        assert data.stat().st_mode & 0o077 == 0
        assert not (data / "up.json").exists(), "up.json left behind after a clean stop"
        records = [json.loads(line) for line in (data / "logs" / "up.log").read_text().splitlines()]
        assert any(r.get("event") == "service starting" for r in records)
    assert addresses[0] == addresses[1], "the second run should listen where the first did"
    leftovers = subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True)
    assert leftovers.stdout == "", "embedded servers still running after Ctrl-C"


def _cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podsweep", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
