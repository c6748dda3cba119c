"""The dispatcher's commands for the `podsweep` CLI: `podsweep upload` / `download` (run inside scan Jobs) and
`podsweep rescan` (asks the dispatcher to make digests due; never creates a Job itself).

Only parses arguments, talks to NATS for `rescan`, and maps the outcome to an exit code; the decisions are in
services.dispatcher.upload and services.dispatcher.rescans.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from nats.aio.msg import Msg

from podsweep import bus as busmod
from podsweep import discovery, logs
from podsweep.config import ConfigError, Settings
from podsweep.operatoraccess import CONNECTION, OPERATOR
from schemas import subjects
from schemas.events import RescanAccepted, RescanRequested
from services.dispatcher import rescans, sbomrescan, upload

_ACCEPTED = msgspec.json.Decoder(RescanAccepted)


def upload_command(
    files: Annotated[
        list[str],
        typer.Argument(
            help="FILE=ENV_VAR pairs: upload FILE to the presigned URL held in environment variable ENV_VAR."
        ),
    ],
    attempts: Annotated[int, typer.Option(min=1, max=20, help="Tries per file before giving up.")] = 8,
    max_wait: Annotated[float, typer.Option(min=0, help="Longest pause between tries, in seconds.")] = 30.0,
    timeout: Annotated[float, typer.Option(min=1, help="Timeout of one PUT, in seconds.")] = 60.0,
) -> None:
    """Gzip each FILE and PUT it to its presigned URL. Exit 0 uploaded, 1 failed after retries, 2 bad input.

    URLs come from the environment, never from arguments, so they stay out of process lists; logs show them
    without their query string (the signature).
    """
    logs.configure("info", "json")
    policy = upload.RetryPolicy(attempts=attempts, max_wait_s=max_wait, timeout_s=timeout)
    raise typer.Exit(upload.run(files, policy=policy))


def download_command(
    files: Annotated[
        list[str],
        typer.Argument(help="FILE=ENV_VAR pairs: write to FILE the object at the presigned URL in ENV_VAR."),
    ],
    attempts: Annotated[int, typer.Option(min=1, max=20, help="Tries per file before giving up.")] = 8,
    max_wait: Annotated[float, typer.Option(min=0, help="Longest pause between tries, in seconds.")] = 30.0,
    timeout: Annotated[float, typer.Option(min=1, help="Timeout of one GET, in seconds.")] = 60.0,
) -> None:
    """Fetch each FILE from its presigned URL (gunzipping gzip objects). Exit 0 ok, 1 failed after retries, 2 bad input."""
    logs.configure("info", "json")
    policy = upload.RetryPolicy(attempts=attempts, max_wait_s=max_wait, timeout_s=timeout)
    raise typer.Exit(upload.download(files, policy=policy))


def sbom_rescan_command(
    trivy_flags: Annotated[list[str], typer.Argument(help="Trivy flags for every item (after --).")],
    count: Annotated[int, typer.Option(min=1, max=1000, help="Items: <in>/0.cdx.json to <in>/<count-1>.cdx.json.")],
    trivy: Annotated[str, typer.Option(help="The trivy binary.")],
    in_dir: Annotated[str, typer.Option(help="Where the SBOMs are.")],
    out_dir: Annotated[str, typer.Option(help="Where the reports go.")],
    work_dir: Annotated[str, typer.Option(help="Trivy's TMPDIR and HOME, and its captured output.")],
) -> None:
    """Download a rescan batch's SBOMs, run `trivy sbom` on each in turn, upload the reports (what an SBOM rescan Job
    runs; URLs from PODSWEEP_SBOM_<n>_URL and PODSWEEP_RAW_<n>_URL). Exit 0 done, 1 an item or a transfer failed (an
    item's log line names it), 2 bad input."""
    logs.configure("info", "json")
    code = sbomrescan.rescan_batch(
        count, trivy=trivy, trivy_flags=trivy_flags, in_dir=in_dir, out_dir=out_dir, work_dir=work_dir
    )
    raise typer.Exit(code)


def rescan_command(
    digests: Annotated[
        list[str] | None, typer.Argument(help="Digests to rescan, as repo@sha256:<64 hex> (or use --namespace/--all).")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Every digest a workload in this namespace has run.")
    ] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every digest the dispatcher knows.")] = False,
    reason: Annotated[str, typer.Option(help="Why (kept in the request, e.g. 'trivy db updated').")] = "",
    requested_by: Annotated[str, typer.Option(help="Who asks (shown in the dispatcher's log).")] = "cli",
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the dispatcher's answer.")] = 30.0,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="A TOML or YAML settings file (also PODSWEEP_CONFIG).")
    ] = None,
) -> None:
    """Make digests due for a rescan now (e.g. from a CronJob after the Trivy DB updated).

    Goes through the dispatcher on NATS, so its claims, batches and limits apply. Exit 0 answered, 1 no answer
    within --timeout (the request stays on the stream and is handled when a dispatcher runs), 2 bad input, 3 NATS
    unreachable or refusing (nothing was asked).
    """
    try:
        settings = discovery.load_for_cli(config)
        logs.configure(settings.log_level, settings.log_format)
        request = rescans.rescan_request(
            cluster=settings.cluster,
            request_id=rescans.new_request_id(),
            digests=list(digests or []),
            namespace=namespace,
            everything=everything,
            requested_by=requested_by,
            reason=reason,
            now=datetime.now(UTC),
        )
    except (ConfigError, rescans.BadRescanRequest) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if not settings.nats.url:
        typer.echo(
            "config: nats.url (PODSWEEP_NATS_URL) is required for `podsweep rescan`, "
            "or run it in the directory of a running `podsweep up`",
            err=True,
        )
        raise typer.Exit(2)
    try:
        answer = asyncio.run(request_rescan(settings, request, timeout))
    except ConnectionError as exc:  # names the URL, never the credentials
        typer.echo(f"rescan {request.request_id}: nothing was asked: {exc}", err=True)
        raise typer.Exit(3) from None
    if answer is None:
        typer.echo(
            f"rescan {request.request_id}: no answer from a dispatcher within {timeout:g}s "
            "(the request is on the stream and will be handled when one runs)",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(rescans.describe(answer))


async def request_rescan(settings: Settings, request: RescanRequested, timeout_s: float) -> RescanAccepted | None:
    """Publish the request on the stream and wait for the dispatcher's rescan.accepted with the same request_id, as
    the operator user (podsweep/operatoraccess.py)."""
    bus = await busmod.connect(settings.nats, CONNECTION, OPERATOR)
    try:
        answered: asyncio.Future[RescanAccepted] = asyncio.get_running_loop().create_future()

        async def on_reply(msg: Msg) -> None:
            try:
                accepted = _ACCEPTED.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            if accepted.request_id == request.request_id and not answered.done():
                answered.set_result(accepted)

        # Subscribed before publishing: the answer cannot come before we listen.
        sub = await bus.listen(subjects.RESCAN_ACCEPTED, on_reply)
        try:
            await bus.publish(subjects.RESCAN_REQUESTED, request, msg_id=f"rescan-{request.request_id}")
            try:
                return await asyncio.wait_for(answered, timeout_s)
            except TimeoutError:
                return None
        finally:
            await sub.unsubscribe()
    finally:
        await bus.close()


# Mount with `app.add_typer(upload_app)` (no name): it adds these commands at the top level.
upload_app = typer.Typer(add_completion=False)
upload_app.command("upload")(upload_command)
upload_app.command("download")(download_command)
upload_app.command("rescan")(rescan_command)
upload_app.command("sbom-rescan", hidden=True)(sbom_rescan_command)
