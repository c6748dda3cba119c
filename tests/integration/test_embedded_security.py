"""The embedded servers of `podsweep up` refuse other local users: NATS without the generated password, SeaweedFS's
own ports (filer, master, volume, gRPC) without the client certificate; the data stays in a 0700 directory.

Each refusal is checked next to the same request with the credential, so a port that is merely down cannot pass.
"""

from __future__ import annotations

import socket
import ssl
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import nats
import nats.errors
import pytest
from botocore.config import Config

from podsweep import bus as busmod
from podsweep import embedded
from podsweep.config import NatsSettings

BUCKET = "podsweep-locked"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("locked") / "data"
    path.mkdir(mode=0o755)  # as a user's earlier run (or a default umask) may have left it
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def nats_locked(data_dir: Path) -> Iterator[embedded.EmbeddedNats]:
    server = embedded.start_nats(data_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3_locked(data_dir: Path) -> Iterator[embedded.EmbeddedS3]:
    server = embedded.start_seaweedfs(data_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stored(s3_locked: embedded.EmbeddedS3) -> str:
    """An object written through the S3 gateway (signed), as podsweep writes its reports."""
    client = _s3(s3_locked)
    for attempt in range(40):  # facts: create_bucket can fail in the first seconds
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except client.exceptions.BucketAlreadyOwnedByYou:
            break
        except Exception:
            if attempt == 39:
                raise
            time.sleep(0.25)
    client.put_object(Bucket=BUCKET, Key="reports/latest.json", Body=b"original")
    return "reports/latest.json"


def _s3(server: embedded.EmbeddedS3) -> object:
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.identity.access_key_id,
        aws_secret_access_key=server.identity.secret_access_key,
        region_name="us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 10, "mode": "standard"},  # a loaded machine: InternalError while volumes grow
        ),
    )


def _get(server: embedded.EmbeddedS3, key: str) -> bytes:
    client = _s3(server)
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined, no-any-return]


def _request(url: str, method: str, body: bytes | None, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read()
        except ConnectionResetError:  # a TLS port answers plain HTTP with 400 and closes: the status is the answer
            return exc.code, b""


def _no_client_certificate() -> ssl.SSLContext:
    """TLS that accepts any server certificate but shows none: an attacker who speaks TLS."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_anonymous_nats_client_is_refused(nats_locked: embedded.EmbeddedNats) -> None:
    with pytest.raises((nats.errors.Error, OSError)) as refused:
        await nats.connect(nats_locked.url, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)
    assert "authorization" in str(refused.value).lower()
    wrong = NatsSettings(url=nats_locked.url, user=nats_locked.user, password="guessed", connect_timeout_s=5)
    with pytest.raises(ConnectionError, match="nats: cannot connect"):
        await busmod.connect(wrong, "intruder")
    settings = NatsSettings(url=nats_locked.url, user=nats_locked.user, password=nats_locked.password)
    bus = await busmod.connect(settings, "owner")
    try:
        await busmod.ensure_stream(bus)  # JetStream works for the one user
        assert (await bus.js.stream_info(settings.stream)).config.name == settings.stream
    finally:
        await bus.close()


def test_nats_password_is_not_on_the_command_line(nats_locked: embedded.EmbeddedNats) -> None:
    argv = Path(f"/proc/{nats_locked.process.proc.pid}/cmdline").read_bytes()
    assert nats_locked.password.encode() not in argv


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_unauthenticated_filer_write_is_refused_and_s3_serves_the_original(
    s3_locked: embedded.EmbeddedS3, stored: str, method: str
) -> None:
    url = f"//127.0.0.1:{s3_locked.ports['filer']}/buckets/{BUCKET}/{stored}"
    # Plain HTTP, as SeaweedFS serves it without podsweep's settings: refused (the port speaks TLS now).
    status, body = _request("http:" + url, method, b"tampered", None)
    assert status == 400, body
    # TLS without the client certificate: the connection fails (an HTTP answer would be returned, not raised).
    with pytest.raises(OSError):
        _request("https:" + url, method, b"tampered", _no_client_certificate())
    assert _get(s3_locked, stored) == b"original"
    # With the certificate the same filer answers: the refusals above were the filer refusing, not a dead port.
    status, body = _request("https:" + url, "GET", None, s3_locked.tls.client_context())
    assert (status, body) == (200, b"original")


def test_master_and_volume_admin_refuse_without_the_certificate(s3_locked: embedded.EmbeddedS3, stored: str) -> None:
    master = f"127.0.0.1:{s3_locked.ports['master']}"
    volume = f"127.0.0.1:{s3_locked.ports['volume']}"
    for url in (f"//{master}/col/delete?collection={BUCKET}", f"//{master}/dir/assign", f"//{volume}/status"):
        status, _ = _request("http:" + url, "GET", None, None)
        assert status == 400, url
        with pytest.raises(OSError):
            _request("https:" + url, "GET", None, _no_client_certificate())
    assert _get(s3_locked, stored) == b"original"  # the bucket's volumes were not deleted
    status, _ = _request(f"https://{volume}/status", "GET", None, s3_locked.tls.client_context())
    assert status == 200


@pytest.mark.parametrize("server", ["master", "volume", "filer", "s3"])
def test_grpc_ports_need_the_client_certificate(s3_locked: embedded.EmbeddedS3, server: str) -> None:
    port = s3_locked.ports[f"{server}.grpc"]
    refused = _no_client_certificate()
    refused.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, refused.wrap_socket(raw) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            tls.recv(1)  # TLS 1.3 reports the missing certificate at the first read
    accepted = s3_locked.tls.client_context()
    accepted.check_hostname = False
    accepted.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, accepted.wrap_socket(raw) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        assert tls.recv(9)[3] == 0x04  # the server's HTTP/2 SETTINGS frame: a gRPC server answered


def test_data_dir_is_private_and_nothing_in_it_is_world_readable(
    data_dir: Path, nats_locked: embedded.EmbeddedNats, s3_locked: embedded.EmbeddedS3, stored: str
) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = [p for p in data_dir.rglob("*") if not p.is_symlink()]
    assert any(p.suffix == ".dat" for p in files), "no SeaweedFS volume written yet"
    assert any(p.name == "nats.conf" for p in files)
    # SeaweedFS makes its `.vif` (a volume's version and replication, no data) 0644 whatever the umask; the 0700
    # directory above is what keeps other users out of those.
    loose = [
        f"{p.relative_to(data_dir)} {stat.S_IMODE(p.stat().st_mode):o}"
        for p in files
        if p.stat().st_mode & 0o077 and p.suffix != ".vif"
    ]
    assert loose == []
