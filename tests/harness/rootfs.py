"""Small fixture root filesystems with real package metadata that tests/fixtures/advisories/base.json matches.

Each tree stands in for an unpacked container image; trees are cached by content hash and never changed in place.
Test code only: nothing here may reach a real image, a registry or a node.
"""

from __future__ import annotations

import enum
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import msgspec


class FixtureKind(enum.StrEnum):
    ALPINE = "alpine"
    DEBIAN = "debian"
    PYTHON = "python"
    NPM = "npm"
    GOBINARY = "gobinary"
    COMBINED = "combined"


class ExpectedFinding(msgspec.Struct, frozen=True, order=True):
    """One finding real Trivy must report for a fixture tree over the base advisories."""

    package: str
    vulnerability_id: str
    installed_version: str
    fixed_version: str
    severity: str
    status: str


def default_cache_dir() -> Path:
    """Where fixture trees, the fixture DB and the Go fixture binary are cached between runs."""
    env = os.environ.get("PODSWEEP_TEST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "podsweep"


# --- package metadata -------------------------------------------------------------------------------------------

_ALPINE_OS_RELEASE = """\
NAME="Alpine Linux"
ID=alpine
VERSION_ID=3.19.3
PRETTY_NAME="Alpine Linux v3.19"
HOME_URL="https://alpinelinux.org/"
BUG_REPORT_URL="https://gitlab.alpinelinux.org/alpine/aports/-/issues"
"""

# name, version, origin (source package: what Alpine secdb keys advisories by), license, one file it owns
_ALPINE_PACKAGES = (
    ("musl", "1.2.4_git20230717-r4", "musl", "MIT", ("lib", "ld-musl-x86_64.so.1")),
    ("libexpat", "2.6.2-r0", "expat", "MIT", ("usr/lib", "libexpat.so.1.9.2")),
    ("libcrypto3", "3.1.6-r2", "openssl", "Apache-2.0", ("usr/lib", "libcrypto.so.3")),
    ("libssl3", "3.1.6-r2", "openssl", "Apache-2.0", ("usr/lib", "libssl.so.3")),
)


def _apk_installed() -> str:
    entries = []
    for name, version, origin, license_, (directory, filename) in _ALPINE_PACKAGES:
        entries.append(
            f"P:{name}\nV:{version}\nA:x86_64\nT:{name} (podsweep fixture)\nU:https://alpinelinux.org/\n"
            f"L:{license_}\no:{origin}\nm:podsweep fixtures\nF:{directory}\nR:{filename}\n"
        )
    return "\n".join(entries) + "\n"


_DEBIAN_OS_RELEASE = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"""

# name, source (what the Debian tracker keys advisories by), version
_DEBIAN_PACKAGES = (
    ("libc6", "glibc", "2.36-9+deb12u1"),
    ("zlib1g", "zlib", "1:1.2.13.dfsg-1"),
    ("apt", "apt", "2.6.1"),
    ("base-files", "base-files", "12.4+deb12u1"),
)


def _dpkg_status() -> str:
    entries = []
    for name, source, version in _DEBIAN_PACKAGES:
        source_line = f"Source: {source}\n" if source != name else ""
        entries.append(
            f"Package: {name}\nStatus: install ok installed\nPriority: required\nSection: libs\n"
            f"Installed-Size: 100\nMaintainer: podsweep fixtures <fixtures@podsweep.invalid>\nArchitecture: amd64\n"
            f"{source_line}Version: {version}\nDescription: {name} (podsweep fixture)\n"
        )
    return "\n".join(entries)


_SITE_PACKAGES = "usr/lib/python3.11/site-packages"
_PYTHON_PACKAGES = (("PyYAML", "5.3.1", "MIT"), ("requests", "2.31.0", "Apache 2.0"), ("idna", "3.7", "BSD"))


def _dist_info(name: str, version: str, license_: str) -> dict[str, bytes]:
    base = f"{_SITE_PACKAGES}/{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {name} (podsweep fixture)\n"
    return {
        f"{base}/METADATA": (metadata + f"License: {license_}\n").encode(),
        f"{base}/INSTALLER": b"pip\n",
    }


_NPM_APP = "usr/src/app"
_NPM_PACKAGES = (("lodash", "4.17.20", "MIT"), ("ms", "2.1.3", "MIT"))


def _npm_files() -> dict[str, bytes]:
    deps = {name: version for name, version, _ in _NPM_PACKAGES}
    files: dict[str, bytes] = {
        f"{_NPM_APP}/package.json": msgspec.json.format(
            msgspec.json.encode({"name": "fixture-app", "version": "1.0.0", "dependencies": deps})
        ),
    }
    lock_packages: dict[str, object] = {"": {"name": "fixture-app", "version": "1.0.0", "dependencies": deps}}
    for name, version, license_ in _NPM_PACKAGES:
        lock_packages[f"node_modules/{name}"] = {
            "version": version,
            "resolved": f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz",
            "license": license_,
        }
        # Trivy's rootfs mode reads installed node_modules/*/package.json; fs mode reads the lockfile.
        files[f"{_NPM_APP}/node_modules/{name}/package.json"] = msgspec.json.format(
            msgspec.json.encode({"name": name, "version": version, "license": license_, "main": "index.js"})
        )
    lock = {
        "name": "fixture-app",
        "version": "1.0.0",
        "lockfileVersion": 3,
        "requires": True,
        "packages": lock_packages,
    }
    files[f"{_NPM_APP}/package-lock.json"] = msgspec.json.format(msgspec.json.encode(lock))
    return files


# The Go fixture: a real program whose build info pins golang.org/x/text at a version GHSA-69ch-w2m2-3vjp affects.
_GO_MAIN = """\
package main

import (
\t"fmt"
\t"os"

\t"golang.org/x/text/language"
)

func main() {
\ttags, _, err := language.ParseAcceptLanguage(os.Getenv("LANG_HEADER"))
\tfmt.Println(tags, err)
}
"""
_GO_MOD = "module podsweep.local/fixtures/gobinary\n\ngo 1.21\n\nrequire golang.org/x/text v0.3.7\n"
_GO_BINARY_PATH = "usr/local/bin/fixture-app"


def _go_binary(cache_dir: Path) -> bytes:
    """Build (once) the Go fixture program and return the binary; `go` fetches x/text through the module proxy."""
    go_version = subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True).stdout.strip()
    key = hashlib.sha256(f"{go_version}\n{_GO_MOD}\n{_GO_MAIN}".encode()).hexdigest()[:16]
    binary = cache_dir / "gobinary" / key / "fixture-app"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=binary.parent) as src:
            (Path(src) / "main.go").write_text(_GO_MAIN)
            (Path(src) / "go.mod").write_text(_GO_MOD)
            env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
            for cmd in (["go", "mod", "tidy"], ["go", "build", "-trimpath", "-o", "fixture-app", "."]):
                done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(
                        f"Go fixture binary: {' '.join(cmd)} failed ({done.stderr.strip()[-400:]}); "
                        "it needs the Go module proxy once, then the binary is cached"
                    )
            os.replace(Path(src) / "fixture-app", binary)
    return binary.read_bytes()


# --- trees ------------------------------------------------------------------------------------------------------

_EXECUTABLE = {_GO_BINARY_PATH}


def _files_for(kind: FixtureKind, cache_dir: Path) -> dict[str, bytes]:
    if kind is FixtureKind.ALPINE:
        return {"etc/os-release": _ALPINE_OS_RELEASE.encode(), "lib/apk/db/installed": _apk_installed().encode()}
    if kind is FixtureKind.DEBIAN:
        return {
            "etc/os-release": _DEBIAN_OS_RELEASE.encode(),
            "etc/debian_version": b"12.6\n",
            "var/lib/dpkg/status": _dpkg_status().encode(),
        }
    if kind is FixtureKind.PYTHON:
        files: dict[str, bytes] = {}
        for name, version, license_ in _PYTHON_PACKAGES:
            files.update(_dist_info(name, version, license_))
        return files
    if kind is FixtureKind.NPM:
        return _npm_files()
    if kind is FixtureKind.GOBINARY:
        return {_GO_BINARY_PATH: _go_binary(cache_dir)}
    combined: dict[str, bytes] = {}
    for part in (FixtureKind.ALPINE, FixtureKind.PYTHON, FixtureKind.NPM, FixtureKind.GOBINARY):
        combined.update(_files_for(part, cache_dir))
    return combined


def _content_hash(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return digest.hexdigest()[:16]


def build_rootfs(kind: FixtureKind, cache_dir: Path | None = None) -> Path:
    """Return the fixture tree for `kind`, building it under the cache dir if no tree with this content exists."""
    cache = cache_dir or default_cache_dir()
    return _tree(kind.value, _files_for(kind, cache), cache)


# An image that carries Trivy settings of its own, each of which hid a finding of its own from podsweep's scans
# before they ran with podsweep's config, ignore file, working directory and environment: a trivy.yaml and a
# .trivyignore in the image's working directory (a repository copied in with its Trivy files), and TRIVY_* variables
# in its config.
HOSTILE_WORKDIR = "/srv/app"
HOSTILE_TRIVY_ENV: Mapping[str, str] = {
    "TRIVY_SKIP_FILES": f"/{_GO_BINARY_PATH}",  # hides golang.org/x/text
    "TRIVY_SEVERITY": "CRITICAL,HIGH,LOW,UNKNOWN",  # hides requests (the one MEDIUM)
}
# The trivy.yaml names a Rego ignore policy (a key podsweep passes no flag for, and no variable above sets: flags
# beat variables, variables beat the file).
_HOSTILE_FILES = {
    f"{HOSTILE_WORKDIR.lstrip('/')}/trivy.yaml": f"ignore-policy: {HOSTILE_WORKDIR}/ignore.rego\n".encode(),
    f"{HOSTILE_WORKDIR.lstrip('/')}/ignore.rego": (
        b'package trivy\n\nimport rego.v1\n\ndefault ignore := false\n\nignore if input.PkgName == "lodash"\n'
    ),  # hides lodash
    f"{HOSTILE_WORKDIR.lstrip('/')}/.trivyignore": b"CVE-2024-45491\n",  # hides libexpat
}


def hostile_trivy_settings_rootfs(cache_dir: Path | None = None) -> Path:
    """The combined tree plus a working directory holding a trivy.yaml (and its policy) and a .trivyignore; run it with
    `HOSTILE_TRIVY_ENV` and `HOSTILE_WORKDIR` as the image config's Env and WorkingDir. Its packages are exactly
    the combined tree's, so a scan that ignores its settings finds EXPECTED_FINDINGS[COMBINED]."""
    cache = cache_dir or default_cache_dir()
    return _tree("hostile-trivy-settings", {**_files_for(FixtureKind.COMBINED, cache), **_HOSTILE_FILES}, cache)


def _tree(name: str, files: Mapping[str, bytes], cache: Path) -> Path:
    target = cache / "rootfs" / f"{name}-{_content_hash(files)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        for rel, content in files.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o755 if rel in _EXECUTABLE else 0o644)
        staging.chmod(0o755)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # a concurrent build that won the rename is as good as ours
            raise
    return target


def alpine_rootfs(cache_dir: Path | None = None) -> Path:
    return build_rootfs(FixtureKind.ALPINE, cache_dir)


def debian_rootfs(cache_dir: Path | None = None) -> Path:
    return build_rootfs(FixtureKind.DEBIAN, cache_dir)


def python_rootfs(cache_dir: Path | None = None) -> Path:
    return build_rootfs(FixtureKind.PYTHON, cache_dir)


def npm_rootfs(cache_dir: Path | None = None) -> Path:
    return build_rootfs(FixtureKind.NPM, cache_dir)


def gobinary_rootfs(cache_dir: Path | None = None) -> Path:
    return build_rootfs(FixtureKind.GOBINARY, cache_dir)


def combined_rootfs(cache_dir: Path | None = None) -> Path:
    """Alpine base plus the Python, npm and Go packages: one image with findings of every language kind."""
    return build_rootfs(FixtureKind.COMBINED, cache_dir)


# --- what Trivy must find over tests/fixtures/advisories/base.json ----------------------------------------------

_ALPINE_EXPECTED = frozenset(
    {
        ExpectedFinding("libexpat", "CVE-2024-45491", "2.6.2-r0", "2.6.3-r0", "CRITICAL", "fixed"),
        ExpectedFinding("libcrypto3", "CVE-2024-6119", "3.1.6-r2", "3.1.7-r0", "HIGH", "fixed"),
        ExpectedFinding("libssl3", "CVE-2024-6119", "3.1.6-r2", "3.1.7-r0", "HIGH", "fixed"),
    }
)
_PYTHON_EXPECTED = frozenset(
    {
        ExpectedFinding("PyYAML", "CVE-2020-14343", "5.3.1", "5.4", "CRITICAL", "fixed"),
        ExpectedFinding("requests", "CVE-2024-35195", "2.31.0", "2.32.0", "MEDIUM", "fixed"),
    }
)
_NPM_EXPECTED = frozenset({ExpectedFinding("lodash", "CVE-2021-23337", "4.17.20", "4.17.21", "HIGH", "fixed")})
_GO_EXPECTED = frozenset({ExpectedFinding("golang.org/x/text", "CVE-2022-32149", "v0.3.7", "0.3.8", "HIGH", "fixed")})

EXPECTED_FINDINGS: Mapping[FixtureKind, frozenset[ExpectedFinding]] = {
    FixtureKind.ALPINE: _ALPINE_EXPECTED,
    FixtureKind.DEBIAN: frozenset(
        {
            ExpectedFinding("libc6", "CVE-2023-4911", "2.36-9+deb12u1", "2.36-9+deb12u3", "HIGH", "fixed"),
            ExpectedFinding("zlib1g", "CVE-2023-45853", "1:1.2.13.dfsg-1", "", "CRITICAL", "will_not_fix"),
            ExpectedFinding("apt", "CVE-2011-3374", "2.6.1", "", "LOW", "affected"),
        }
    ),
    FixtureKind.PYTHON: _PYTHON_EXPECTED,
    FixtureKind.NPM: _NPM_EXPECTED,
    FixtureKind.GOBINARY: _GO_EXPECTED,
    FixtureKind.COMBINED: _ALPINE_EXPECTED | _PYTHON_EXPECTED | _NPM_EXPECTED | _GO_EXPECTED,
}

# What tests/fixtures/advisories/extra.json adds for the npm and combined trees (the "new CVE on rescan").
EXTRA_FINDINGS: Mapping[FixtureKind, frozenset[ExpectedFinding]] = {
    kind: frozenset({ExpectedFinding("lodash", "CVE-2020-28500", "4.17.20", "4.17.21", "MEDIUM", "fixed")})
    for kind in (FixtureKind.NPM, FixtureKind.COMBINED)
}
