"""What the benches that start their own servers share: settings for the embedded NATS and SeaweedFS they start,
and a `main` that runs one in a temporary directory and prints its result as the last line."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings


def local_settings(
    nats_server: embedded.EmbeddedNats, s3_server: embedded.EmbeddedS3, root: str, bucket: str
) -> tuple[NatsSettings, S3Settings]:
    """The bench's own subjects (`<root>.podsweep`), stream (`ROOT`), KV prefix and bucket on the servers it started."""
    nats = NatsSettings(
        url=nats_server.url,
        user=nats_server.user,
        password=nats_server.password,
        subject_root=f"{root}.podsweep",
        stream=root.upper(),
        kv_prefix=root,
    )
    s3 = S3Settings(
        endpoint_url=s3_server.endpoint_url,
        bucket=bucket,
        access_key_id=s3_server.identity.access_key_id,
        secret_access_key=s3_server.identity.secret_access_key,
        path_style=True,
    )
    return nats, s3


def run_in_tempdir(
    run: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, dict[str, Any]]],
    args: argparse.Namespace,
    prefix: str,
) -> None:
    """Run the bench in a fresh temporary directory, then print its result as one JSON line."""
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        result = asyncio.run(run(args, Path(work)))
    print(json.dumps(msgspec.to_builtins(result)))
