"""The deploy-shaped harness's remapping of container paths and Service addresses (tests/harness/deployed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.deployed import Remap

MOUNTS = {
    "/etc/nats": Path("/w/etc/nats"),
    "/etc/nats/tls": Path("/w/etc/nats/tls"),
    "/var/run/secrets/podsweep/nats": Path("/w/nats"),
    "/var/run/secrets/podsweep/nats-tls": Path("/w/nats-tls"),
    "/data": Path("/w/data"),
    "/tmp": Path("/w/tmp"),
}
REMAP = Remap(addresses={"nats.podsweep.svc:4222": "127.0.0.1:14222"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("/etc/nats/nats.conf", "/w/etc/nats/nats.conf", id="file-under-a-mount"),
        pytest.param("/etc/nats/tls/ca.crt", "/w/etc/nats/tls/ca.crt", id="nested-mount-longest-wins"),
        pytest.param("/var/run/secrets/podsweep/nats-tls/tls.key", "/w/nats-tls/tls.key", id="sibling-with-a-dash"),
        pytest.param("/var/run/secrets/podsweep/nats/password", "/w/nats/password", id="the-shorter-sibling"),
        pytest.param("store_dir: /data/jetstream\n", "store_dir: /w/data/jetstream\n", id="inside-a-config-file"),
        pytest.param("/data", "/w/data", id="the-mount-itself"),
        pytest.param("/database/x", "/database/x", id="a-longer-segment-is-not-the-mount"),
        pytest.param("/srv/data/x", "/srv/data/x", id="not-at-the-start-of-a-path"),
        pytest.param("http://host/tmp/x", "http://host/tmp/x", id="a-url-path-is-not-a-mount"),
        pytest.param("nats://nats.podsweep.svc:4222", "nats://127.0.0.1:14222", id="service-address"),
        pytest.param("/etc/natsy", "/etc/natsy", id="prefix-of-a-segment"),
    ],
)
def test_container_paths_and_service_addresses_are_remapped_once_and_whole(text: str, expected: str) -> None:
    assert REMAP.text(text, MOUNTS) == expected


def test_a_remapped_path_is_not_remapped_again() -> None:
    mounts = {"/tmp": Path("/tmp/pytest/pod/tmp"), "/etc/nats": Path("/tmp/pytest/pod/etc/nats")}
    assert REMAP.text("--config /etc/nats/nats.conf", mounts) == "--config /tmp/pytest/pod/etc/nats/nats.conf"
