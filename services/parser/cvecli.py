"""`podsweep cve`: who runs a vulnerability or a package, from the inverted index the parser keeps in S3.

Reads only: the one shard of the id or name, then the digest shards of the digests found, all at once. Written with
argparse rather than typer (which builds every parameter through pydantic), and rich is loaded only for a table, so
a script asking "who runs it?" waits for its answer, not for a CLI framework's imports.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import msgspec

from podsweep import discovery, s3sign
from podsweep.config import ConfigError, S3Settings
from podsweep.s3read import PresignedReader, ReadFailed
from schemas import storage
from schemas.index import CveAnswer, CveDigests, DigestRuns, PackageVersion
from schemas.refs import vuln_id
from services.parser import vulnindex

if TYPE_CHECKING:
    from podsweep.objectstore import ObjectStore

FOUND, NOT_FOUND, ERROR = 0, 1, 2
MAX_SHARD_BYTES = 64 * 1024 * 1024
T = TypeVar("T")

SUMMARY = (
    "Who runs a vulnerability, or a package (from the SBOMs): workloads, images, nodes, fixed version, since when."
)
DESCRIPTION = """\
Who runs a vulnerability, or a package: cluster, namespace, workload, containers, image, the nodes that run it
now, the fixed version and since when (the first stored scan of the digest that reported it).

  podsweep cve CVE-2024-3094
  podsweep cve GHSA-jfh8-c2jp-5v3q --json
  podsweep cve --package liblzma5@5.6.0

--package NAME or NAME@VERSION reads the SBOMs' components, so it answers before any advisory names the
package. The name is matched exactly (any case); VERSION matches the installed version or a prefix of it that
ends where a version part ends (5.6 matches 5.6.0-0.2). Reads index/ in S3 only (settings from PODSWEEP_S3_*,
--config, or a `podsweep up` running in this directory).

exit status: 0 found; 1 not found (no stored report has it, or no index yet); 2 error (a malformed id or
package name, unreadable settings, S3 unreachable)."""


class Failed(Exception):
    """What to tell the person, and the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podsweep cve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cve_id", nargs="?", help="a vulnerability id: CVE-2024-3094, GHSA-…, DLA-…, TEMP-…")
    parser.add_argument("--package", "-p", help="a package name, or NAME@VERSION, from the SBOMs")
    parser.add_argument("--cluster", help="only the workloads of this cluster of a fleet")
    parser.add_argument("--json", action="store_true", dest="as_json", help="print one JSON object (CveAnswer)")
    parser.add_argument("--config", "-c", help="a TOML or YAML settings file (also PODSWEEP_CONFIG)")
    return parser


class _Index:
    """Where index/ is read from: plain GETs signed here and sent with the stdlib (static keys and a path-style
    address podsweep builds exactly: podsweep/s3sign.py), else ObjectStore (boto3), imported only then, for the
    credentials and addressing that only botocore resolves (the environment chain, IRSA, virtual-hosted)."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self._reader: PresignedReader | None = None
        self._store: ObjectStore | None = None
        root = s3sign.path_style_root(
            settings.endpoint_url,
            settings.region,
            settings.bucket,
            settings.path_style,
            os.environ,
            _aws_config_exists(),
        )
        if root is not None and settings.access_key_id and settings.secret_access_key:
            signer = s3sign.QuerySigner(root, settings.region, settings.access_key_id, settings.secret_access_key)
            self._reader = PresignedReader(signer, settings.bucket)
        else:
            from podsweep.objectstore import ObjectStore

            self._store = ObjectStore(settings)

    def read(self, keys: Sequence[str]) -> list[bytes | None]:
        """Each key's bytes, None when absent; Failed when the store cannot be read."""
        if self._reader is not None:
            try:
                return self._reader.get_many(keys, MAX_SHARD_BYTES)
            except ReadFailed as exc:
                if exc.status != 301:
                    raise Failed(str(exc), ERROR) from None
                # S3's PermanentRedirect: the bucket is in another region than configured; botocore follows it.
                print(
                    f"note: bucket {self.bucket} is not in region {self.settings.region}: reading through boto3 "
                    "(set PODSWEEP_S3_REGION to the bucket's region for a faster answer)",
                    file=sys.stderr,
                )
                from podsweep.objectstore import ObjectStore

                self._reader, self._store = None, ObjectStore(self.settings)
        assert self._store is not None
        return _read_with_boto3(self._store, keys)


def _aws_config_exists() -> bool:
    return os.path.exists(os.path.expanduser("~/.aws/config"))


def _read_with_boto3(store: ObjectStore, keys: Sequence[str]) -> list[bytes | None]:
    import asyncio

    async def read_all() -> list[bytes | None]:
        with ThreadPoolExecutor(min(32, len(keys) or 1)) as pool:  # one GET per thread, all at once
            asyncio.get_running_loop().set_default_executor(pool)
            return list(await asyncio.gather(*(store.get_if_exists(key, MAX_SHARD_BYTES) for key in keys)))

    try:
        return asyncio.run(read_all())
    except Exception as exc:  # the S3 client's errors are many; every one is fatal to a read-only command
        raise Failed(f"s3: cannot read index/ from bucket {store.bucket}: {exc}", ERROR) from None


def _index(config: str | None) -> _Index:
    try:
        settings = discovery.load_for_cli(config)
    except ConfigError as exc:
        raise Failed(str(exc), ERROR) from None
    if not settings.s3.endpoint_url and not settings.s3.access_key_id:
        print(
            "note: no S3 endpoint or credentials configured and no running `podsweep up` here; using the AWS defaults",
            file=sys.stderr,
        )
    return _Index(settings.s3)


class _CveShardView(msgspec.Struct):
    """A CveShard with its entries left undecoded: only the one asked for is decoded (and validated)."""

    cves: dict[str, msgspec.Raw] = {}


class _PackageShardView(msgspec.Struct):
    packages: dict[str, msgspec.Raw] = {}


class _DigestRunsShardView(msgspec.Struct):
    digests: dict[str, msgspec.Raw] = {}


def _decoded(index: _Index, key: str, data: bytes, typ: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Failed(f"{key} in bucket {index.bucket} is not a podsweep document ({exc})", ERROR) from None


def _shard(index: _Index, key: str, view: type[T]) -> T | None:
    [data] = index.read([key])
    return _decoded(index, key, data, view) if data is not None else None


def _runs(index: _Index, hexes: Iterable[str]) -> dict[str, DigestRuns]:
    """Who runs each digest: the digest shards they fall in, read at once; only these digests' entries decoded."""
    by_key: dict[str, list[str]] = {}
    for hex_ in hexes:
        try:
            shard_key = storage.digest_shard_key(hex_[:2])
        except ValueError:
            raise Failed(
                f"a shard of index/ in bucket {index.bucket} is not a podsweep document (it names a digest "
                f"{hex_[:80]!r}, not a SHA-256 hex)",
                ERROR,
            ) from None
        by_key.setdefault(shard_key, []).append(hex_)
    keys = sorted(by_key)
    runs: dict[str, DigestRuns] = {}
    for key, data in zip(keys, index.read(keys), strict=True):
        if data is None:
            continue
        shard = _decoded(index, key, data, _DigestRunsShardView).digests
        for hex_ in by_key[key]:
            raw = shard.get(hex_)
            if raw is not None:
                runs[hex_] = _decoded(index, key, raw, DigestRuns)
    return runs


def answer(cve_id: str | None, package: str | None, config: str | None) -> tuple[CveAnswer, str]:
    """The answer, and what to say when it is empty. Failed on bad input or an unreadable store."""
    if (cve_id is None) == (package is None):
        raise Failed(
            "give a vulnerability id (podsweep cve CVE-2024-3094) or --package NAME[@VERSION], not both", ERROR
        )
    if cve_id is not None:
        canonical = vuln_id(cve_id)
        if canonical is None:
            raise Failed(
                f"{cve_id[:80]!r} is not a vulnerability id (CVE-YYYY-NNNN, GHSA-xxxx-xxxx-xxxx, or a vendor id such "
                "as DLA-3449-1)",
                ERROR,
            )
        index = _index(config)
        key = storage.cve_shard_key(storage.shard_of(canonical))
        shard = _shard(index, key, _CveShardView)
        raw = shard.cves.get(canonical) if shard is not None else None
        entry = _decoded(index, key, raw, CveDigests) if raw is not None else None
        runs = _runs(index, entry.digests) if entry is not None else {}
        return vulnindex.answer_cve(canonical, entry, runs), f"{canonical}: no stored report has it"
    assert package is not None
    try:
        name, version = vulnindex.package_query(package)
    except vulnindex.BadQuery as exc:
        raise Failed(str(exc), ERROR) from None
    index = _index(config)
    wanted = vulnindex.package_key(name)
    key = storage.package_shard_key(storage.shard_of(wanted))
    pshard = _shard(index, key, _PackageShardView)
    raw = pshard.packages.get(wanted) if pshard is not None else None
    found = _decoded(index, key, raw, dict[str, list[PackageVersion]]) if raw is not None else {}
    result = vulnindex.answer_package(package, found, _runs(index, found), version)
    return result, f"{package}: no stored SBOM or report of a digest has it"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)  # usage errors exit 2, as every other error
    try:
        if args.cluster is not None:
            vulnindex.cluster_query(args.cluster)
        result, missing = answer(args.cve_id, args.package, args.config)
        if args.cluster is not None:
            result, missing = vulnindex.in_cluster(result, args.cluster), f"{missing} in cluster {args.cluster}"
    except vulnindex.BadQuery as exc:
        print(exc, file=sys.stderr)
        return ERROR
    except Failed as exc:
        print(exc, file=sys.stderr)
        return exc.code
    if args.as_json:
        print(msgspec.json.encode(result).decode())
    if not result.affected:
        print(missing, file=sys.stderr)
        return NOT_FOUND
    if not args.as_json:
        _print_table(result)
    return FOUND


def _print_table(result: CveAnswer) -> None:
    from rich.console import Console
    from rich.table import Table

    from services.parser.richtext import shown

    title = f"{result.query}: {result.digests} digests, {len(result.affected)} workloads"
    if result.title:
        title += f" · {result.title[:100]}"
    table = Table(title=shown(title), title_justify="left")
    columns = ["cluster", "namespace", "workload", "containers", "image", "nodes", "package", "installed"]
    if result.kind == "cve":
        columns += ["fixed", "severity", "since"]
    for column in columns:
        table.add_column(column)
    for row in result.affected:
        nodes = (
            f"not running since {row.not_running_since:%Y-%m-%d %H:%M}"
            if row.not_running_since is not None
            else ", ".join(row.nodes) or "-"
        )
        cells = [
            row.cluster or "-",
            row.namespace or "-",
            f"{row.workload.kind}/{row.workload.name}" if row.workload is not None else "-",
            ", ".join(row.containers) or "-",
            row.image or row.digest_ref,
            nodes,
            row.package,
            row.installed_version,
        ]
        if result.kind == "cve":
            since = f"{row.since:%Y-%m-%d %H:%M}" if row.since is not None else "-"
            cells += [row.fixed_version or "-", row.severity or "-", since]
        table.add_row(*(shown(cell) for cell in cells))
    Console(soft_wrap=True).print(table)
