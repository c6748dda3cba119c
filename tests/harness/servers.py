"""Session fixtures for a real nats-server (JetStream) and a real SeaweedFS S3, started the way `podsweep up` does.

Tests stay independent by taking their own subject root, stream, KV prefix and bucket (`nats_settings`,
`s3_settings`) instead of resetting the servers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from podsweep import embedded
from podsweep.config import NatsSettings, S3Settings

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embedded.EmbeddedNats]:
    server = embedded.start_nats(Path(tmp_path_factory.mktemp("nats")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[embedded.EmbeddedS3]:
    # Each test takes its own bucket, and each bucket grows 7 volumes: leave room for a few hundred buckets.
    server = embedded.start_seaweedfs(Path(tmp_path_factory.mktemp("seaweedfs")), max_volumes=3000)
    yield server
    server.stop()


@pytest.fixture
def nats_settings(nats_server: embedded.EmbeddedNats) -> NatsSettings:
    n = next(_ids)
    return NatsSettings(
        url=nats_server.url,
        user=nats_server.user,
        password=nats_server.password,
        subject_root=f"t{n}.podsweep",
        stream=f"T{n}",
        kv_prefix=f"t{n}",
        duplicate_window_s=60,
    )


@pytest.fixture
def s3_settings(s3_server: embedded.EmbeddedS3) -> S3Settings:
    return S3Settings(
        endpoint_url=s3_server.endpoint_url,
        bucket=f"podsweep-t{next(_ids)}",
        access_key_id=s3_server.identity.access_key_id,
        secret_access_key=s3_server.identity.secret_access_key,
        path_style=True,
    )
