"""Runs podsweep services for tests and benchmarks: as their own `python -m podsweep run <name>` processes with given
Settings (real replicas: kill -9 one, measure one's CPU; signals only the processes it started, by PID), or in this
event loop (`in_process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from podsweep.config import (
    ConsumerSettings,
    DispatcherSettings,
    NatsSettings,
    NotifierSettings,
    S3Settings,
    Settings,
    WatcherSettings,
    env_name,
)

REPO = Path(__file__).resolve().parents[2]
FAST = ConsumerSettings(max_deliver=30, backoff_s=[0.2, 0.5, 1.0], ack_wait_s=5, batch=32, concurrency=8)


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


def fast_settings(
    cluster: str, kubeconfig: Path, jobs: str, apps: str, nats: NatsSettings, s3: S3Settings, policy: Path
) -> Settings:
    """Settings for the four services of a small world (test_e2e.py, test_jscluster.py): scan Jobs in `jobs`, only
    `apps` watched, short retries and leases so that a killed replica's work is taken over within seconds."""
    dispatcher = {
        "sweep_interval_s": 2.0,
        "claim_ttl_s": 10.0,
        "leader_lease_s": 3.0,  # the killed dispatcher's restart takes its lease over after this
        "backoff_base_s": 0.5,
        "backoff_max_s": 2.0,
        "max_active": 60,
        "max_active_per_node": 10,
        "max_created_per_minute": 6000,
        "job_deadline_s": 300.0,
        "sbom": False,  # SBOMs end to end are tests/integration/test_rescan_e2e.py's
        "trivy_image": "registry.example.com/aquasec/trivy:0.76.0",
        "podsweep_image": "registry.example.com/podsweep/podsweep:test",
    }
    notifier = {
        "policy_file": str(policy),
        "workloads_wait_deliveries": 5,
        "workloads_wait_s": 0.5,
        "retry_base_s": 0.2,
        "retry_cap_s": 1.0,
        "outbox_ack_wait_s": 8.0,
    }
    return Settings(
        cluster=cluster,
        kubeconfig=str(kubeconfig),
        namespace=jobs,
        nats=nats,
        s3=s3,
        consumer=FAST,
        log_format="json",
        watcher=WatcherSettings(include_namespaces=[apps]),
        dispatcher=msgspec.convert(dispatcher, DispatcherSettings),
        notifier=msgspec.convert(notifier, NotifierSettings),
    )


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far (from /proc)."""
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU time the process has used so far (from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

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


_PROFILED = """
import cProfile, sys, time
from podsweep_cli.app import main
out = sys.argv.pop(1)
profiler = cProfile.Profile(time.process_time)
try:
    profiler.runcall(main)
finally:
    profiler.dump_stats(out)
"""


def start(service: str, settings: Settings, log: Path, *, profile: Path | None = None) -> Replica:
    """Start `podsweep run <service>`; with `profile`, under cProfile writing there when it exits cleanly.

    The profile counts CPU time (`time.process_time`), not wall time: a profile of services sharing two cores with
    the control plane is otherwise mostly the time they were not scheduled.
    """
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PODSWEEP_")}, **settings_env(settings)}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                *(["-c", _PROFILED, str(profile)] if profile else ["-m", "podsweep"]),
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


ServiceMain = Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]


@contextlib.asynccontextmanager
async def in_process(*mains: ServiceMain, settings: Settings, stop_within_s: float = 60.0) -> AsyncIterator[None]:
    """Run services' `main(settings, stop)` in this event loop for the block, then set `stop`. A service that does
    not return within `stop_within_s` is named with the stack it waits in; one that raised fails the block."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(main(settings, stop), name=main.__module__) for main in mains]
    try:
        yield
    finally:
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=stop_within_s)
        for task in pending:
            task.print_stack(file=sys.stderr)
            task.cancel()
        assert not pending, f"did not stop within {stop_within_s:.0f} s: {sorted(t.get_name() for t in pending)}"
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"{task.get_name()} failed") from task.exception()


def tails(running: dict[str, Replica], chars: int = 1500) -> str:
    """The end of each replica's log, under its name."""
    return "\n".join(f"--- {name}\n{replica.tail(chars)}" for name, replica in running.items())


class Watched(Protocol):
    """A world of service processes (test_e2e.py, test_jscluster.py): what runs, and the tails of their logs."""

    running: dict[str, Replica]

    def tails(self) -> str: ...


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float, what: str, world: Watched) -> None:
    """Wait until `check()` holds; fail at once when a service exits on its own (a kill -9 by the test does not
    count), or after `timeout_s` with every service's log tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = check()
        if not isinstance(done, bool):
            done = await done
        if done:
            return
        for name, replica in world.running.items():
            if replica.proc.poll() is not None and replica.proc.returncode != -9:
                raise AssertionError(f"{name} exited with {replica.proc.returncode}:\n{replica.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{world.tails()}")
        await asyncio.sleep(0.25)
