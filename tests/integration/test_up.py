"""`podsweep up` as a person runs it: embedded NATS and S3 in a data dir, services running, clean Ctrl-C."""

from __future__ import annotations

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
    env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig), "PODSWEEP_LOG_FORMAT": "json"}
    for run in (1, 2):  # the second run reuses the data dir: same S3 identity, same stream
        proc = subprocess.Popen(
            [sys.executable, "-m", "podsweep", "up", "--data-dir", str(tmp_path / "data")],
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
        assert any(line.startswith("running:") for line in lines), "".join(lines)
        assert any(line.startswith("first sweep") and " digests: " in line for line in lines), "".join(lines)
        assert any("embedded NATS" in line for line in lines)
        assert any("embedded S3" in line for line in lines)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"run {run}:\n{''.join(lines)}{out}"
        assert (tmp_path / "data" / "s3-identity.json").stat().st_mode & 0o077 == 0
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True)
    assert leftovers.stdout == "", "embedded servers still running after Ctrl-C"
