"""The dispatcher's commands for the `podsweep` CLI: `podsweep upload` and `podsweep download`, run inside scan Jobs.

Only parses arguments and maps the outcome to an exit code; the work is in services.dispatcher.upload.
"""

from __future__ import annotations

from typing import Annotated

import typer

from podsweep import logs
from services.dispatcher import upload


def upload_command(
    files: Annotated[
        list[str],
        typer.Argument(
            help="FILE=ENV_VAR pairs: upload FILE to the presigned URL held in environment variable ENV_VAR."
        ),
    ],
    attempts: Annotated[int, typer.Option(min=1, max=20, help="Tries per file before giving up.")] = 5,
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
    attempts: Annotated[int, typer.Option(min=1, max=20, help="Tries per file before giving up.")] = 5,
    max_wait: Annotated[float, typer.Option(min=0, help="Longest pause between tries, in seconds.")] = 30.0,
    timeout: Annotated[float, typer.Option(min=1, help="Timeout of one GET, in seconds.")] = 60.0,
) -> None:
    """Fetch each FILE from its presigned URL (gunzipping gzip objects). Exit 0 ok, 1 failed after retries, 2 bad input."""
    logs.configure("info", "json")
    policy = upload.RetryPolicy(attempts=attempts, max_wait_s=max_wait, timeout_s=timeout)
    raise typer.Exit(upload.download(files, policy=policy))


# Mount with `app.add_typer(upload_app)` (no name): it adds the two commands at the top level.
upload_app = typer.Typer(add_completion=False)
upload_app.command("upload")(upload_command)
upload_app.command("download")(download_command)
