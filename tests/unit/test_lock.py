"""The locks in requirements/ hold every dependency pyproject.toml declares, at a version its range allows.

install.sh installs a lock with `--no-deps` for podsweep itself, so a dependency added to pyproject.toml without
`scripts/lock.sh` would otherwise go missing only on a fresh machine.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins(lock: str) -> dict[str, str]:
    """Package name -> exact version, from a lock's `name==version` lines."""
    out: dict[str, str] = {}
    for line in (REPO / "requirements" / f"{lock}.txt").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            spec = line.split(";")[0].split(" ")[0]
            name, _, version = spec.partition("==")
            out[canonicalize_name(name)] = version
    return out


def declared(extras: list[str]) -> list[Requirement]:
    """What installing podsweep with these extras asks for, its own extras followed to the bottom."""
    wanted, seen, out = list(extras), set(), [Requirement(r) for r in PROJECT["dependencies"]]
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in PROJECT["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == "podsweep":
                wanted.extend(requirement.extras)
            else:
                out.append(requirement)
    return out


@pytest.mark.parametrize(("lock", "extras"), [("runtime", []), ("embedded", ["embedded"]), ("dev", ["dev"])])
def test_lock_pins_every_declared_dependency_within_its_range(lock: str, extras: list[str]) -> None:
    locked = pins(lock)
    environment = {**default_environment(), "sys_platform": "linux"}
    problems = []
    for requirement in declared(extras):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        version = locked.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name} is not in requirements/{lock}.txt")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}=={version} is outside {requirement.specifier}")
    assert not problems, f"{problems}: run `bash scripts/lock.sh` and commit requirements/"


def test_every_pin_in_a_lock_carries_a_hash() -> None:
    for lock in ("runtime", "embedded", "dev"):
        lines = (REPO / "requirements" / f"{lock}.txt").read_text().splitlines()
        for n, line in enumerate(lines):
            if "==" in line and not line[0].isspace() and not line.startswith("#"):
                assert n + 1 < len(lines) and "--hash=sha256:" in lines[n + 1], f"{lock}: {line} has no hash"
