"""How a CLI finds the embedded servers of a `podsweep up` running in the same directory.

`up` writes `<data_dir>/up.json` (mode 0600): the URLs of the servers it started, the files holding their
credentials, the stream and bucket names; it removes the file when it stops. A CLI command that reads NATS or S3 and
has no URL configured takes them from there (`apply`). The file holds no secret itself, only where they are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec

from podsweep.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from podsweep import embedded

FILE = "up.json"
T = TypeVar("T")


class UpNats(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    credentials_file: str  # embedded.NatsUser as JSON
    subject_root: str
    stream: str
    kv_prefix: str


class UpS3(msgspec.Struct, frozen=True, kw_only=True):
    endpoint_url: str
    credentials_file: str  # embedded.S3Identity as JSON
    bucket: str
    region: str


class UpServers(msgspec.Struct, frozen=True, kw_only=True):
    """What `podsweep up` started; a part it did not start (configured instead) is None."""

    v: int = 1
    pid: int
    nats: UpNats | None = None
    s3: UpS3 | None = None


def describe(
    settings: Settings, data_dir: Path, pid: int, nats: embedded.EmbeddedNats | None, s3: embedded.EmbeddedS3 | None
) -> UpServers:
    """What to write for the servers `up` started, with the names `settings` (already pointing at them) use."""
    from podsweep import embedded  # here, not at the top: a CLI command that only reads (`podsweep cve`) needs none

    root = data_dir.absolute()
    return UpServers(
        pid=pid,
        nats=UpNats(
            url=nats.url,
            credentials_file=str(root / embedded.NATS_USER_FILE),
            subject_root=settings.nats.subject_root,
            stream=settings.nats.stream,
            kv_prefix=settings.nats.kv_prefix,
        )
        if nats is not None
        else None,
        s3=UpS3(
            endpoint_url=s3.endpoint_url,
            credentials_file=str(root / embedded.S3_IDENTITY_FILE),
            bucket=settings.s3.bucket,
            region=settings.s3.region,
        )
        if s3 is not None
        else None,
    )


def write(data_dir: Path, servers: UpServers) -> Path:
    from podsweep import embedded

    path = data_dir / FILE
    embedded.write_private(path, msgspec.json.encode(servers))
    return path


def remove(data_dir: Path, pid: int) -> None:
    """Remove the file if this process wrote it (another `up` may have started in the same directory since)."""
    found = read(data_dir)
    if found is not None and found.pid == pid:
        (data_dir / FILE).unlink(missing_ok=True)


def read(data_dir: Path) -> UpServers | None:
    try:
        return msgspec.json.decode((data_dir / FILE).read_bytes(), type=UpServers)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _credentials(path: str, typ: type[T]) -> T:
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=typ)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(
            f"config: {path} (named in {FILE} by the running `podsweep up`) cannot be read: "
            f"{getattr(exc, 'strerror', None) or type(exc).__name__}; configure NATS and S3 instead"
        ) from None


def apply(settings: Settings) -> Settings:
    """`settings` with NATS and S3 taken from a running `podsweep up` in `settings.data_dir` where none is configured.

    NATS counts as configured when it has a URL; S3 when it has an endpoint or an access key (AWS needs no endpoint).
    A file left by an `up` that is no longer running is ignored.
    """
    found = read(Path(settings.data_dir))
    if found is None or not _running(found.pid):
        return settings
    from podsweep import embedded  # its credential files' types; the module itself is for `up`

    if found.nats is not None and not settings.nats.url:
        user = _credentials(found.nats.credentials_file, embedded.NatsUser)
        nats = msgspec.structs.replace(
            settings.nats,
            url=found.nats.url,
            user=user.user,
            password=user.password,
            subject_root=found.nats.subject_root,
            stream=found.nats.stream,
            kv_prefix=found.nats.kv_prefix,
        )
        settings = msgspec.structs.replace(settings, nats=nats)
    if found.s3 is not None and not settings.s3.endpoint_url and not settings.s3.access_key_id:
        identity = _credentials(found.s3.credentials_file, embedded.S3Identity)
        s3 = msgspec.structs.replace(
            settings.s3,
            endpoint_url=found.s3.endpoint_url,
            access_key_id=identity.access_key_id,
            secret_access_key=identity.secret_access_key,
            bucket=found.s3.bucket,
            region=found.s3.region,
        )
        settings = msgspec.structs.replace(settings, s3=s3)
    return settings


def load_for_cli(file: str | Path | None) -> Settings:
    """`load_settings` for a command that reads what the services stored: beside a running `podsweep up`, its
    servers fill in what is not configured. Raises ConfigError like `load_settings`."""
    return apply(load_settings(file=file))
