"""`podsweep check --fail-on SEVERITY`: a CI gate over a local Trivy report or the stored reports of an image,
a digest or a namespace, with the notifier's policy filters and suppressions.

Exit 0: nothing at or above SEVERITY remains; 1: something does (a table says what); 2: cannot decide (no report,
unreadable file, bad policy), with the reason. Reads S3 (reports, the parser's index) and the WORKLOADS KV; never
writes anything.
"""

from __future__ import annotations

import asyncio
import enum
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from podsweep import discovery
from podsweep.config import ConfigError, Settings
from podsweep.objectstore import ObjectStore
from podsweep.policy import EMPTY_POLICY, Policy, PolicyError, load_policy, rule_for
from podsweep.reports import localfile, normalize, trivy
from schemas.events import Severity
from schemas.index import NamespaceIndex, SummaryIndex
from schemas.refs import DNS_LABEL_PATTERN, IMAGE_RE
from schemas.report import Report
from schemas.state import WORKLOADS_BUCKET, DigestWorkloads
from schemas.storage import SUMMARY_KEY, latest_report_key, namespace_index_key
from services.notifier import targets
from services.notifier.check import CheckRow, check

CANNOT_DECIDE = 2
TABLE_ROWS = 1000  # above this, rows are printed as tab-separated lines
IndexDoc = TypeVar("IndexDoc", SummaryIndex, NamespaceIndex)
_NAMESPACE_RE = re.compile(DNS_LABEL_PATTERN)
_report_decoder = msgspec.json.Decoder(Report)


class FailOn(enum.StrEnum):
    CRITICAL = "CRITICAL"
    HIGH = "HIGH"
    MEDIUM = "MEDIUM"
    LOW = "LOW"
    UNKNOWN = "UNKNOWN"


class CannotDecide(Exception):
    """Exit 2 with this reason."""


@dataclass
class Outcome:
    rows: list[tuple[str, CheckRow]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    checked: int = 0
    suppressed: int = 0
    not_counted: int = 0


def check_command(
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", case_sensitive=False, help="Fail when a finding at or above this remains.")
    ],
    report: Annotated[Path | None, typer.Option("--report", help="A local Trivy JSON report (any version).")] = None,
    image: Annotated[
        str | None, typer.Option("--image", help="Stored reports of the digests running this image.")
    ] = None,
    digest: Annotated[
        str | None, typer.Option("--digest", help="The stored report of sha256:<hex> or repo@sha256:<hex>.")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="Stored reports of every digest running in it.")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="The notifier's policy file (filters, suppressions).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Settings file, for stored reports.")] = None,
) -> None:
    """Exit 0 when nothing at or above --fail-on remains after the policy's filters and suppressions, 1 when
    something does (listed), 2 when it cannot decide."""
    err = Console(stderr=True, soft_wrap=True)
    sources = [
        name
        for name, value in (("--report", report), ("--image", image), ("--digest", digest), ("--namespace", namespace))
        if value is not None
    ]
    try:
        if len(sources) != 1:
            raise CannotDecide(f"give exactly one of --report, --image, --digest, --namespace (got {len(sources)})")
        now = datetime.now(UTC)
        if report is not None:
            outcome = _check_file(report, fail_on.value, _policy(policy, None), now)
        else:
            settings = _settings(config)
            chosen = _policy(policy, settings)
            outcome = asyncio.run(_check_stored(settings, chosen, fail_on.value, now, image, digest, namespace))
    except CannotDecide as exc:
        err.print(f"cannot decide: {escape(str(exc))}", highlight=False)
        raise typer.Exit(CANNOT_DECIDE) from None
    console = Console(soft_wrap=True)
    if not console.is_terminal:  # CI logs: never cut a CVE id or a package name to fit 80 columns
        console = Console(soft_wrap=True, width=200)
    if len(outcome.rows) > TABLE_ROWS:
        _print_lines(outcome.rows, fail_on.value)
    elif outcome.rows:
        console.print(_table(outcome.rows, fail_on.value))
    for what in outcome.missing:
        err.print(f"no stored report for {escape(what)}", highlight=False)
    console.print(
        f"{len(outcome.rows)} findings at or above {fail_on.value} in {outcome.checked} checked "
        f"({outcome.suppressed} suppressed, {outcome.not_counted} not counted by the policy)",
        highlight=False,
    )
    if outcome.rows:
        raise typer.Exit(1)
    if outcome.missing:
        err.print("cannot decide: some reports are missing", highlight=False)
        raise typer.Exit(CANNOT_DECIDE)


def _settings(config: Path | None) -> Settings:
    try:
        return discovery.load_for_cli(config)
    except ConfigError as exc:
        raise CannotDecide(str(exc)) from None


def _policy(path: Path | None, settings: Settings | None) -> Policy:
    source = str(path) if path is not None else (settings.notifier.policy_file if settings is not None else "")
    if not source:
        return EMPTY_POLICY
    try:
        return load_policy(Path(source).read_text(), source)
    except OSError as exc:
        raise CannotDecide(f"policy {source} cannot be read ({exc.strerror})") from None
    except (PolicyError, UnicodeDecodeError) as exc:
        raise CannotDecide(str(exc)) from None


def _check_file(path: Path, fail_on: Severity, policy: Policy, now: datetime) -> Outcome:
    try:
        parsed = normalize.parse(localfile.read_capped(path, trivy.DEFAULT_MAX_BYTES))
    except OSError as exc:
        raise CannotDecide(f"{path} cannot be read ({exc.strerror})") from None
    except trivy.ParseError as exc:
        raise CannotDecide(f"{path}: {exc}") from None
    image = parsed.digest_ref or (parsed.artifact if IMAGE_RE.match(parsed.artifact) else "")
    result = check(parsed, fail_on, rule_for(policy, None, None, None), policy.suppressions, None, image, now)
    where = parsed.artifact or path.name
    return Outcome(
        rows=[(where, row) for row in result.rows],
        checked=1,
        suppressed=result.suppressed,
        not_counted=result.not_counted,
    )


async def _check_stored(
    settings: Settings,
    policy: Policy,
    fail_on: Severity,
    now: datetime,
    image: str | None,
    digest: str | None,
    namespace: str | None,
) -> Outcome:
    if not settings.s3.endpoint_url and not settings.s3.access_key_id:
        raise CannotDecide("config: s3.endpoint_url (PODSWEEP_S3_ENDPOINT_URL) is needed to read stored reports")
    store = ObjectStore(settings.s3)
    if digest is not None:
        parsed = targets.parse_digest(digest)
        if parsed is None:
            raise CannotDecide(f"--digest {digest[:120]!r} is not sha256:<64 hex> or repository@sha256:<64 hex>")
        hex_, shown = parsed
        known = await _workloads(settings, only=[hex_], required=False)
        chosen = targets.for_digest(hex_, shown, known[0] if known else None)
    elif image is not None:
        summary = await _index(store, SUMMARY_KEY, SummaryIndex)
        if summary is not None:
            hexes = targets.digests_for_image(summary, image)
            docs = {d.digest_ref.rsplit(":", 1)[1]: d for d in await _workloads(settings, only=hexes, required=False)}
            chosen = targets.from_index(hexes, docs, image=image, summary=summary)
        else:
            chosen = targets.for_image(await _workloads(settings, only=None, required=True), image)
        if not chosen:
            raise CannotDecide(f"no workload is known to run image {image[:200]!r}")
    else:
        assert namespace is not None
        if not _NAMESPACE_RE.match(namespace):
            raise CannotDecide(f"--namespace {namespace[:80]!r} is not a Kubernetes namespace name")
        ns_index = await _index(store, namespace_index_key(namespace), NamespaceIndex)
        if ns_index is not None:
            hexes = targets.digests_for_namespace(ns_index)
            docs = {d.digest_ref.rsplit(":", 1)[1]: d for d in await _workloads(settings, only=hexes, required=False)}
            chosen = targets.from_index(hexes, docs, namespace_index=ns_index)
        else:
            chosen = targets.for_namespace(await _workloads(settings, only=None, required=True), namespace)
        if not chosen:
            raise CannotDecide(f"no workload is known to run in namespace {namespace!r}")
    outcome = Outcome()
    reports: dict[str, Report | None] = {}
    for target in chosen:
        if target.digest_hex not in reports:
            reports[target.digest_hex] = await _stored_report(store, target.digest_hex)
        stored = reports[target.digest_hex]
        if stored is None:
            outcome.missing.append(f"{target.where} ({target.image})")
            continue
        result = check(
            stored,
            fail_on,
            targets.rule_of(policy, target),
            policy.suppressions,
            target.namespace,
            target.image,
            now,
        )
        outcome.checked += 1
        outcome.rows += [(target.where, row) for row in result.rows]
        outcome.suppressed += result.suppressed
        outcome.not_counted += result.not_counted
    return outcome


async def _stored_report(store: ObjectStore, digest_hex: str) -> Report | None:
    key = latest_report_key(f"x@sha256:{digest_hex}")
    try:
        data = await store.get_if_exists(key, int(store.settings.max_object_mb * 1024 * 1024))
    except Exception as exc:
        raise CannotDecide(f"s3: {key} cannot be read from bucket {store.bucket}: {type(exc).__name__}") from None
    if data is None:
        return None
    try:
        return _report_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CannotDecide(f"s3: {key} is not a podsweep report: {exc}") from None


async def _index(store: ObjectStore, key: str, typ: type[IndexDoc]) -> IndexDoc | None:
    """The parser's index document under `key`, or None when there is none yet (then the KV is asked)."""
    try:
        data = await store.get_if_exists(key, int(store.settings.max_object_mb * 1024 * 1024))
    except Exception as exc:
        raise CannotDecide(f"s3: {key} cannot be read from bucket {store.bucket}: {type(exc).__name__}") from None
    if data is None:
        return None
    try:
        return msgspec.json.decode(data, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CannotDecide(f"s3: {key} is not a podsweep index: {exc}") from None


async def _workloads(settings: Settings, only: list[str] | None, required: bool) -> list[DigestWorkloads]:
    """Who runs what, from the WORKLOADS KV (the parser keeps it from image.seen)."""
    import nats.js.errors

    from podsweep import bus as busmod
    from podsweep.operatoraccess import CONNECTION, OPERATOR

    if not settings.nats.url:
        if required:
            raise CannotDecide("config: nats.url (PODSWEEP_NATS_URL) is needed to find the workloads")
        return []
    try:
        bus = await busmod.connect(settings.nats, CONNECTION, OPERATOR)
    except ConnectionError as exc:
        raise CannotDecide(str(exc)) from None
    try:
        bus.check_kv(WORKLOADS_BUCKET)
        try:  # not bus.kv: a missing bucket is not created here (nothing is written)
            kv = await bus.js.key_value(bus.kv_bucket(WORKLOADS_BUCKET))
        except (nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            return []
        if only is not None:
            keys = only
        else:
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                return []
        docs = []
        for key in keys:
            doc, _ = await busmod.kv_read(kv, key, DigestWorkloads)
            if doc is not None:
                docs.append(doc)
        return docs
    finally:
        await bus.close()


_COLUMNS = ("severity", "id", "package", "installed", "fixed", "cvss", "where", "note")
# Tab, newline and C1 controls out of a cell (C0 is gone already: the stored report has none but tab and newline).
_LINE_DROP = dict.fromkeys([0x09, 0x0A, 0x0D, *range(0x80, 0xA0)])


def _cells(where: str, row: CheckRow) -> tuple[str, ...]:
    cvss = f"{row.cvss:.1f}" if row.cvss is not None else ""
    return (row.severity, row.id, row.package, row.installed_version, row.fixed_version, cvss, where, row.note)


def _print_lines(rows: list[tuple[str, CheckRow]], fail_on: str) -> None:
    """Many rows: one tab-separated line each, written as it is formatted (a table holds every cell and measures
    them all first: 163,000 rows took 680 MB and four minutes)."""
    out = sys.stdout
    out.write(f"findings at or above {fail_on}\n" + "\t".join(_COLUMNS) + "\n")
    for where, row in rows:
        out.write("\t".join(cell.translate(_LINE_DROP) for cell in _cells(where, row)) + "\n")
    out.flush()


def _table(rows: list[tuple[str, CheckRow]], fail_on: str) -> Table:
    table = Table(title=f"findings at or above {fail_on}", title_justify="left")
    for column in _COLUMNS:
        table.add_column(column, no_wrap=column in ("severity", "id"))
    for where, row in rows:
        severity, *cells = _cells(where, row)
        # Everything but the severity came from a scanned image: never let rich read it as markup.
        table.add_row(severity, *(escape(cell) for cell in cells))
    return table
