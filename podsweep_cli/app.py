"""The `podsweep` command: run the services, and look at what they found. The composition root: it imports every
service's CLI and starts services by name (podsweep_cli.services)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import typer
from rich.console import Console, Group
from rich.table import Table

from podsweep import __version__, discovery, embedded, logs, natsaccess, preflight, progress, runtime
from podsweep.config import ConfigError, Settings, load_settings
from podsweep.operatoraccess import CONNECTION, OPERATOR
from podsweep.policy import EXAMPLE_POLICY
from podsweep.status import StatusReport
from podsweep_cli import services
from services.admission.cli import admissions_command
from services.dispatcher.cli import upload_app
from services.notifier.cli import check_command
from services.parser import cvecli
from services.parser.cli import report_app

app = typer.Typer(
    name="podsweep",
    no_args_is_help=True,
    rich_markup_mode="rich",
    help=(
        "Find every image digest running in a Kubernetes cluster, scan each one once with Trivy on a node that "
        "already has it, store the reports in S3 and tell workload owners about new breaches.\n\n"
        "Start here: [bold]podsweep up[/bold] runs everything against your current kubeconfig, with an embedded "
        "NATS and S3 when none is configured.\n\n"
        "Configuration comes from PODSWEEP_* environment variables and an optional file (--config); "
        "see `podsweep config`."
    ),
)
schemas_app = typer.Typer(no_args_is_help=True, help="The event and document contract (JSON Schema).")
app.add_typer(schemas_app, name="schemas")
deploy_app = typer.Typer(no_args_is_help=True, help="Files in deploy/ that are generated from the code.")
app.add_typer(deploy_app, name="deploy")
app.add_typer(report_app, name="report")
report_app.command("admissions")(admissions_command)  # the admission gate's audit, from the stream
app.add_typer(upload_app)  # `podsweep upload` / `podsweep download`: what the scan Job's containers run
app.command("check")(check_command)


@app.command(
    "cve",
    help=cvecli.SUMMARY + " See `podsweep cve --help`.",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def cve(ctx: typer.Context) -> None:
    """`podsweep cve` is argparse (services/parser/cvecli.py); the console script runs it without this app."""
    raise typer.Exit(cvecli.main(ctx.args))


err = Console(stderr=True)
ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="A TOML or YAML settings file (also PODSWEEP_CONFIG).")
]
LogFormatOption = Annotated[
    Literal["auto", "json", "console"] | None,
    typer.Option(
        "--log-format",
        help="json, console, or auto: lines for people on a terminal, JSON otherwise (also PODSWEEP_LOG_FORMAT).",
    ),
]


def _settings(config: Path | None, **overrides: object) -> Settings:
    try:
        settings = load_settings(file=config, overrides={k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    logs.configure(settings.log_level, settings.log_format)
    return settings


def _reader_settings(config: Path | None) -> Settings:
    """Settings for a command that reads NATS or S3: beside a running `podsweep up`, its servers are used for
    whatever is not configured (podsweep.discovery)."""
    try:
        settings = discovery.load_for_cli(config)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    logs.configure(settings.log_level, settings.log_format)
    return settings


@app.command()
def version() -> None:
    """Print podsweep's version."""
    typer.echo(f"podsweep {__version__}")


@app.command("config")
def show_config(config: ConfigOption = None) -> None:
    """Print the effective settings (secrets replaced by ***) after validating them."""
    settings = _settings(config)
    typer.echo(msgspec.json.format(msgspec.json.encode(settings.redacted()), indent=2).decode())


@app.command()
def run(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(services.SERVICES)}.")],
    config: ConfigOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Run one service against configured NATS and S3 (how the Deployments run it)."""
    settings = _settings(config, log_format=log_format)
    if not settings.nats.url:
        err.print("[red]config: nats.url (PODSWEEP_NATS_URL) is required for `podsweep run`[/red]")
        raise typer.Exit(2)
    try:
        mains = services.mains([service])
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    runtime.serve(runtime.run(settings, mains))


async def _run_up(settings: Settings, names: list[str]) -> None:
    """The services, and a progress line whenever the sweep moves."""
    stop = asyncio.Event()
    follower = asyncio.create_task(progress.follow(settings, stop, err.print))
    try:
        await runtime.run(settings, services.mains(names), stop)
    finally:
        stop.set()
        await follower


@app.command()
def up(
    config: ConfigOption = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where embedded NATS and S3 keep their data (default .podsweep).")
    ] = None,
    log_format: LogFormatOption = None,
) -> None:
    """Run every service in this process against the current kubeconfig.

    With no NATS or S3 configured, starts nats-server (JetStream) and SeaweedFS (S3) from their PyPI packages in
    the data directory; a restart with the same directory continues where it stopped. `podsweep status`,
    `report` and `rescan` run in the same directory find them. Logs also go, as JSON, to <data dir>/logs/up.log.
    """
    settings = _settings(config, data_dir=str(data_dir) if data_dir else None, log_format=log_format)
    try:
        runtime.kubeconfig_path(settings)
    except FileNotFoundError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    root = embedded.private_dir(Path(settings.data_dir))
    logs.configure(settings.log_level, settings.log_format, file=root / "logs" / "up.log")
    started: list[embedded.EmbeddedNats | embedded.EmbeddedS3] = []
    try:
        settings = start_embedded(settings, root, started, err.print)
        asyncio.run(_prepare(settings))
        names = [n for n in services.available() if n not in services.NOT_IN_UP]
        if not settings.notifier.policy_file and "notifier" in names:
            err.print(NO_POLICY_HINT, markup=False, highlight=False, soft_wrap=True)
        err.print(f"running: {', '.join(names) or '(no services in this build yet)'} — Ctrl-C stops")
        runtime.serve(_run_up(settings, names))
    except embedded.EmbeddedServerError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    except preflight.NotReady as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
    finally:
        discovery.remove(root, os.getpid())
        for server in reversed(started):
            server.stop()
        logs.configure(settings.log_level, settings.log_format)  # closes the log file


NO_POLICY_HINT = f"""no policy file: findings are stored, but no alert is sent. To get alerts, save a policy
like this one as podsweep-policy.yaml, export PODSWEEP_WEBHOOK_KEY (the key that signs each webhook),
and restart with PODSWEEP_NOTIFIER_POLICY_FILE=podsweep-policy.yaml. Slack, Teams, DefectDojo, rules
per namespace and suppressions: docs/webhooks.md.

{EXAMPLE_POLICY}"""


def start_embedded(
    settings: Settings,
    root: Path,
    started: list[embedded.EmbeddedNats | embedded.EmbeddedS3],
    say: Callable[[str], object],
) -> Settings:
    """Start NATS and S3 where none is configured (each appended to `started` at once, for the caller to stop),
    write what a CLI beside `up` needs to find them (podsweep.discovery), and return settings pointing at them."""
    nats: embedded.EmbeddedNats | None = None
    s3: embedded.EmbeddedS3 | None = None
    if not settings.nats.url:
        nats = embedded.start_nats(root)
        started.append(nats)
        settings = msgspec.structs.replace(
            settings,
            nats=msgspec.structs.replace(settings.nats, url=nats.url, user=nats.user, password=nats.password),
        )
        say(f"embedded NATS (JetStream) at {nats.url}, data in {root / 'nats'}")
    if not settings.s3.endpoint_url:
        s3 = embedded.start_seaweedfs(root)
        started.append(s3)
        settings = msgspec.structs.replace(
            settings,
            s3=msgspec.structs.replace(
                settings.s3,
                endpoint_url=s3.endpoint_url,
                access_key_id=s3.identity.access_key_id,
                secret_access_key=s3.identity.secret_access_key,
            ),
        )
        say(f"embedded S3 (SeaweedFS) at {s3.endpoint_url}, bucket {settings.s3.bucket}, data in {root / 's3'}")
    if started:
        found = discovery.write(root, discovery.describe(settings, root, os.getpid(), nats, s3))
        where = "in this directory" if root == Path(".podsweep") else f"with PODSWEEP_DATA_DIR={root}"
        say(f"`podsweep status`, `report` and `rescan` run {where} use them ({found} says where they are)")
    return settings


async def _prepare(settings: Settings) -> None:
    """Check what scans need in the cluster (preflight.py: stops `up` with what to apply), then declare the stream
    and bucket once before the services start (each also does so idempotently)."""
    from podsweep.kube import Kube

    kube = await Kube.connect(runtime.kubeconfig_path(settings))
    try:
        for what in await preflight.prepare(kube, settings.namespace, settings.dispatcher.service_account):
            err.print(f"created {what} (what scan Jobs need)")
    finally:
        await kube.close()
    await _declare(settings)


async def _declare(settings: Settings) -> None:
    """The stream and the bucket, declared once before the services start."""
    from podsweep import bus as busmod
    from podsweep.objectstore import ObjectStore

    bus = await busmod.connect(settings.nats, "up")
    try:
        await busmod.ensure_stream(bus)
    finally:
        await bus.close()
    await ObjectStore(settings.s3).ensure_bucket()


@schemas_app.command("export")
def schemas_export(
    check: Annotated[bool, typer.Option(help="Exit 1 when the committed files differ from the Structs.")] = False,
) -> None:
    """Write the JSON Schema of every event and stored document into schemas/json/."""
    from schemas import export

    if check:
        stale = [name for name, text in export.render().items() if _read(export.JSON_DIR / name) != text]
        if stale:
            err.print(f"stale JSON Schema files: {', '.join(stale)}; run `podsweep schemas export`")
            raise typer.Exit(1)
        return
    for path in export.export():
        typer.echo(str(path))


DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"


# The JetStream domain deploy/nats-leaf/accounts.conf is written for: the hub's (`jetstream { domain: hub }` in its
# nats.conf, docs/deploy.md "Leaf nodes").
LEAF_DOMAIN = "hub"


def nats_accounts(deploy: Path = DEPLOY_DIR, clusters: Sequence[str] = (), domain: str = "") -> str:
    """accounts.conf from every service's NATS declaration, for the names (subject root, stream, KV prefix, cluster)
    of the base's podsweep.yaml, or for every cluster of a fleet given in `clusters`; with `domain`, a leaf server's
    whose clients use that JetStream domain."""
    settings = load_settings(environ={}, file=deploy / "base" / "podsweep.yaml")
    nats = settings.nats
    names = natsaccess.Names(
        root=nats.subject_root,
        stream=nats.stream,
        kv_prefix=nats.kv_prefix,
        domain=domain,
        clusters=tuple(clusters) or (settings.cluster,),
    )
    users = [*(services.nats_access(name) for name in services.SERVICES), OPERATOR]
    return natsaccess.accounts_conf(users, names)


@deploy_app.command("nats-accounts")
def deploy_nats_accounts(
    check: Annotated[bool, typer.Option(help="Exit 1 when the committed file differs from the declarations.")] = False,
    deploy: Annotated[Path, typer.Option(help="The deploy/ directory.")] = DEPLOY_DIR,
    cluster: Annotated[
        list[str] | None,
        typer.Option(help="A fleet: every cluster reporting into this NATS (repeat it); default: podsweep.yaml's."),
    ] = None,
) -> None:
    """Write deploy/base/nats/accounts.conf (one NATS user per service) from what each service declares it does, the
    Helm chart's copy of it, and deploy/nats-leaf/accounts.conf (the same users on a leaf server, for the hub's
    JetStream domain `hub`)."""
    try:
        text = nats_accounts(deploy, cluster or ())
        targets = {
            deploy / "base" / "nats" / "accounts.conf": text,
            deploy / "helm" / "podsweep" / "files" / "nats" / "accounts.conf": text,
            deploy / "nats-leaf" / "accounts.conf": nats_accounts(deploy, cluster or (), LEAF_DOMAIN),
        }
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if check:
        stale = [str(target) for target, wanted in targets.items() if _read(target) != wanted]
        if stale:
            err.print(f"stale {', '.join(stale)}: run `podsweep deploy nats-accounts`")
            raise typer.Exit(1)
        return
    for target, wanted in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(wanted)
        typer.echo(str(target))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def main() -> None:  # pragma: no cover - console entry for `python -m podsweep`
    sys.exit(app())


@app.command()
def status(
    config: ConfigOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    watch: Annotated[float, typer.Option("--watch", help="Refresh every N seconds (0: once).")] = 0.0,
    cluster: Annotated[
        str | None, typer.Option("--cluster", help="A fleet: only the digests this cluster runs (default: all).")
    ] = None,
) -> None:
    """Digests by scan state (and by cluster in a fleet), consumer lag per service, oldest pending scan, running scans
    per node, failures.

    Beside a running `podsweep up` (same directory) with nothing configured, reads its embedded NATS."""
    settings = _reader_settings(config)
    if not settings.nats.url:
        err.print(
            "[red]config: nats.url (PODSWEEP_NATS_URL) is required for `podsweep status`, "
            "or run it in the directory of a running `podsweep up`[/red]"
        )
        raise typer.Exit(2)
    try:
        asyncio.run(_status(settings, json_out, watch, cluster))
    except ConnectionError as exc:
        err.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None


async def _status(settings: Settings, json_out: bool, watch: float, cluster: str | None = None) -> None:
    from rich.live import Live

    from podsweep import bus as busmod
    from podsweep import status as statusmod

    bus = await busmod.connect(settings.nats, CONNECTION, OPERATOR)
    try:
        report = await statusmod.collect(bus, cluster, settings.cluster)
        if json_out:
            typer.echo(msgspec.json.encode(report).decode())
            return
        if not watch:
            Console().print(_status_tables(report))
            return
        with Live(_status_tables(report), refresh_per_second=1) as live:
            while True:
                await asyncio.sleep(watch)
                live.update(_status_tables(await statusmod.collect(bus, cluster, settings.cluster)))
    finally:
        await bus.close()


def _status_tables(report: StatusReport) -> Group:
    where = f" in cluster {report.cluster}" if report.cluster else ""
    states = Table(title=f"{report.digests} digests{where}")
    states.add_column("state")
    states.add_column("digests", justify="right")
    for state, n in report.by_state.items():
        states.add_row(state, str(n))
    lag = Table(title="consumers")
    for column in ("service", "pending", "in flight", "redelivered"):
        lag.add_column(column, justify="left" if column == "service" else "right")
    for c in report.consumers:
        lag.add_row(c.service, str(c.pending), str(c.in_flight), str(c.redelivered))
    nodes = Table(title="running scans per node")
    nodes.add_column("node")
    nodes.add_column("running", justify="right")
    for node, n in report.running_per_node.items():
        nodes.add_row(node, str(n))
    by_reason = Table(title="failed digests by reason")
    by_reason.add_column("reason")
    by_reason.add_column("digests", justify="right")
    for reason, n in report.failed_by_reason.items():
        by_reason.add_row(reason, str(n))
    failures = Table(title="recent failures")
    for column in ("digest", "reason", "at", "detail"):
        failures.add_column(column)
    for f in report.recent_failures:
        failures.add_row(f.digest_ref, f.reason, f.at.isoformat() if f.at else "", f.detail)
    oldest = (
        f"oldest pending: {report.oldest_pending} since {report.oldest_pending_since}"
        if report.oldest_pending
        else "nothing pending"
    )
    leader = f"dispatcher leader: {report.dispatcher_leader or 'none'}"
    clusters = Table(title="digests by cluster (home or elsewhere)")
    clusters.add_column("cluster")
    clusters.add_column("digests", justify="right")
    for name, n in report.by_cluster.items():
        clusters.add_row(name, str(n))
    return Group(states, clusters, lag, nodes, by_reason, failures, oldest, leader)
