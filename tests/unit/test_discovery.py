"""What the CLI takes from a running `podsweep up`'s up.json: only what is not configured, only while up runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from podsweep import discovery, embedded
from podsweep.config import ConfigError, NatsSettings, S3Settings, Settings


def _up_dir(tmp_path: Path, pid: int) -> Path:
    root = embedded.private_dir(tmp_path / ".podsweep")
    embedded.write_private(root / embedded.NATS_USER_FILE, msgspec.json.encode(embedded.NatsUser("podsweep", "pw")))
    embedded.write_private(root / embedded.S3_IDENTITY_FILE, msgspec.json.encode(embedded.S3Identity("ak", "sk")))
    discovery.write(
        root,
        discovery.UpServers(
            pid=pid,
            nats=discovery.UpNats(
                url="nats://127.0.0.1:14222",
                credentials_file=str(root / embedded.NATS_USER_FILE),
                subject_root="up.podsweep",
                stream="UP",
                kv_prefix="up",
            ),
            s3=discovery.UpS3(
                endpoint_url="http://127.0.0.1:18333",
                credentials_file=str(root / embedded.S3_IDENTITY_FILE),
                bucket="up-bucket",
                region="us-east-1",
            ),
        ),
    )
    return root


def test_nothing_configured_takes_both_servers_with_their_credentials(tmp_path: Path) -> None:
    root = _up_dir(tmp_path, os.getpid())
    got = discovery.apply(Settings(data_dir=str(root)))
    assert (got.nats.url, got.nats.user, got.nats.password, got.nats.stream) == (
        "nats://127.0.0.1:14222",
        "podsweep",
        "pw",
        "UP",
    )
    assert (got.s3.endpoint_url, got.s3.access_key_id, got.s3.secret_access_key, got.s3.bucket) == (
        "http://127.0.0.1:18333",
        "ak",
        "sk",
        "up-bucket",
    )


@pytest.mark.parametrize(
    ("nats", "s3"),
    [
        pytest.param(NatsSettings(url="nats://nats:4222"), S3Settings(), id="nats-configured"),
        pytest.param(NatsSettings(), S3Settings(endpoint_url="https://s3.example"), id="s3-endpoint-configured"),
        pytest.param(NatsSettings(), S3Settings(access_key_id="AKIA-aws"), id="aws-keys-configured"),
    ],
)
def test_what_is_configured_is_kept(tmp_path: Path, nats: NatsSettings, s3: S3Settings) -> None:
    root = _up_dir(tmp_path, os.getpid())
    got = discovery.apply(Settings(data_dir=str(root), nats=nats, s3=s3))
    assert (got.nats == nats) == bool(nats.url)
    assert (got.s3 == s3) == bool(s3.endpoint_url or s3.access_key_id)


def test_no_file_or_a_stopped_up_changes_nothing(tmp_path: Path) -> None:
    assert discovery.apply(Settings(data_dir=str(tmp_path / "none"))) == Settings(data_dir=str(tmp_path / "none"))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = _up_dir(tmp_path, int(ended.stdout))
    assert discovery.apply(Settings(data_dir=str(root))) == Settings(data_dir=str(root))


def test_unreadable_credentials_name_the_file(tmp_path: Path) -> None:
    root = _up_dir(tmp_path, os.getpid())
    (root / embedded.NATS_USER_FILE).unlink()
    with pytest.raises(ConfigError, match=embedded.NATS_USER_FILE):
        discovery.apply(Settings(data_dir=str(root)))


def test_only_the_up_that_wrote_the_file_removes_it(tmp_path: Path) -> None:
    root = _up_dir(tmp_path, os.getpid())
    discovery.remove(root, os.getpid() + 1)
    assert discovery.read(root) is not None
    discovery.remove(root, os.getpid())
    assert discovery.read(root) is None
