"""Runs a podsweep service as its own `python -m podsweep run <name>` process with given Settings, for tests and
benchmarks that need real replicas (kill -9 one, measure one's CPU). Signals only the processes it started, by PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from podsweep.config import Settings, env_name

REPO = Path(__file__).resolve().parents[2]


def settings_env(settings: Settings) -> dict[str, str]:
    """The PODSWEEP_* variables that give a subprocess exactly these settings."""
    env: dict[str, str] = {}

    def flatten(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                flatten(inner, (*path, key))
        elif isinstance(value, list):
            env[env_name(path)] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            env[env_name(path)] = "true" if value else "false"
        elif value is not None:
            env[env_name(path)] = str(value)

    flatten(msgspec.to_builtins(settings), ())
    return env


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_for_log(self, pattern: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, self.log.read_text(errors="replace")):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not log {pattern!r} within {timeout_s:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()


def start(service: str, settings: Settings, log: Path, *, profile: Path | None = None) -> Replica:
    """Start `podsweep run <service>`; with `profile`, under cProfile writing there when it exits cleanly."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PODSWEEP_")}, **settings_env(settings)}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                *(["-m", "cProfile", "-o", str(profile)] if profile else []),
                "-m",
                "podsweep",
                "run",
                service,
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Replica(service, proc, log)
