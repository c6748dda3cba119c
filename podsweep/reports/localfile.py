"""Reads a local report file for the CLIs (`podsweep report parse`, `podsweep check --report`) under a size cap.

The cap is applied while reading: a file over it is refused after at most `max_bytes + 1` bytes (a regular file by
its size, before any byte), never read whole first. Pipes and other special files are read up to one
byte past the cap.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from podsweep.reports import trivy


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The file's bytes; trivy.ParseError("oversized") past `max_bytes`, OSError when it cannot be read."""
    with path.open("rb") as file:
        info = os.fstat(file.fileno())
        if stat.S_ISREG(info.st_mode) and info.st_size > max_bytes:
            raise _oversized(f"{info.st_size} bytes", max_bytes)
        data = file.read(max_bytes + 1)  # a pipe, or a file that grew since: never more than one byte past the cap
    if len(data) > max_bytes:
        raise _oversized(f"more than {max_bytes} bytes", max_bytes)
    return data


def _oversized(size: str, max_bytes: int) -> trivy.ParseError:
    return trivy.ParseError(
        "oversized", f"report is {size}, over the {max_bytes}-byte cap; raise the cap (--max-bytes)"
    )
