"""The policy file as the notifier sees it: loaded at start (an invalid file stops the start), reloaded when its
modification time, size or inode changes. A bad reload keeps the previous policy and logs why; never raises after
start.
"""

from __future__ import annotations

import os
from pathlib import Path

from podsweep import logs
from podsweep.policy import EMPTY_POLICY, Policy, PolicyError, load_policy

log = logs.get("podsweep.notifier")

MAX_POLICY_BYTES = 4 * 1024 * 1024


class PolicySource:
    """`policy` is what handlers use (no I/O); `refresh()` stats the file and reloads it when it changed, called
    every `notifier.policy_poll_s` (a stat per event cost a visible share of a delivery on a busy node)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._policy = EMPTY_POLICY
        self.reloads = 0
        self.errors = 0

    def load(self) -> Policy:
        """The first load: raises PolicyError naming the line and key, or OSError, so a bad start fails loudly."""
        if not self.path:
            log.warning("no policy file (notifier.policy_file): fingerprints are kept, nothing is sent")
            return self._policy
        stamp = self._stat()
        self._policy = self._read()
        self._stamp = stamp
        log.info("policy loaded", path=self.path, destinations=len(self._policy.destinations))
        return self._policy

    @property
    def policy(self) -> Policy:
        return self._policy

    def refresh(self) -> Policy:
        if not self.path:
            return self._policy
        try:
            stamp = self._stat()
        except OSError as exc:
            if self._stamp is not None:
                log.error("policy file cannot be read; keeping the previous policy", path=self.path, error=exc.strerror)
                self._stamp = None
                self.errors += 1
            return self._policy
        if stamp == self._stamp:
            return self._policy
        self._stamp = stamp  # a broken file is reported once, not on every event
        try:
            policy = self._read()
        except (PolicyError, OSError, UnicodeDecodeError) as exc:
            self.errors += 1
            log.error("policy reload refused; keeping the previous policy", path=self.path, error=str(exc))
            return self._policy
        self._policy = policy
        self.reloads += 1
        log.info("policy reloaded", path=self.path, destinations=len(policy.destinations))
        return policy

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> Policy:
        with Path(self.path).open("rb") as handle:
            data = handle.read(MAX_POLICY_BYTES + 1)
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError(f"{self.path}: larger than {MAX_POLICY_BYTES} bytes; is it the right file?")
        return load_policy(data.decode(), self.path)
