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
