"""Locates the Go tools the deploy tests run (helm, promtool), built and cached by build.sh beside this file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build.sh")


class ToolError(RuntimeError):
    pass


def locate_tool(name: str, build_script: Path = BUILD_SCRIPT) -> Path:
    """The tool's binary: build.sh prints its path, building it first when it is not cached (needs Go)."""
    result = subprocess.run(["bash", str(build_script), name], capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise ToolError(
            f"{build_script} {name} failed with {result.returncode}; run it by hand to see why "
            f"(it needs Go >= 1.26 for a cold build):\n{tail}"
        )
    binary = Path(lines[-1])
    if not os.access(binary, os.X_OK):
        raise ToolError(f"{build_script} printed {binary}, which is not an executable")
    return binary
