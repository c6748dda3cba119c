"""`podsweep status` against a real NATS with scan state in KV."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import msgspec
from typer.testing import CliRunner

from podsweep import bus as busmod
from podsweep.config import NatsSettings
from podsweep_cli.app import app
from schemas.state import LEADER_KEY, LIMITS_BUCKET, SCANS_BUCKET, DigestScanState, DispatcherLease, NodeFailure

HEX = "ab" * 32


async def _seed(settings: NatsSettings) -> None:
    bus = await busmod.connect(settings, "seed")
    await busmod.ensure_stream(bus)
    kv = await bus.kv(SCANS_BUCKET)
    t = datetime(2026, 11, 23, 8, tzinfo=UTC)
    docs = [
        DigestScanState(digest_ref=f"app@sha256:{HEX}", status="running", node="node-1", last_seen_at=t),
        DigestScanState(digest_ref=f"db@sha256:{HEX}", status="pending", last_seen_at=t),
        DigestScanState(
            digest_ref=f"web@sha256:{HEX}",
            status="not_scanned",
            failures=[NodeFailure(node="node-2", reason="ErrImageNeverPull", at=t)],
        ),
    ]
    for i, doc in enumerate(docs):
        await busmod.kv_update(kv, f"k{i}", DigestScanState, lambda _, doc=doc: doc)
    lease = DispatcherLease(holder="dispatcher-7c9f-x2:1", acquired_at=t, renewed_at=t, ttl_s=15)
    await busmod.kv_put_if(await bus.kv(LIMITS_BUCKET), LEADER_KEY, lease, 0)
    await bus.close()


def _env(settings: NatsSettings) -> dict[str, str]:
    """`podsweep status`'s settings, as the environment gives them."""
    return {
        "PODSWEEP_NATS_URL": settings.url,
        "PODSWEEP_NATS_USER": settings.user,
        "PODSWEEP_NATS_PASSWORD": settings.password,
        "PODSWEEP_NATS_STREAM": settings.stream,
        "PODSWEEP_NATS_SUBJECT_ROOT": settings.subject_root,
        "PODSWEEP_NATS_KV_PREFIX": settings.kv_prefix,
    }


def test_status_json_counts_states_nodes_and_failures(nats_settings: NatsSettings) -> None:
    asyncio.run(_seed(nats_settings))
    env = _env(nats_settings)
    result = CliRunner().invoke(app, ["status", "--json"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["digests"] == 3
    assert report["by_state"] == {"not_scanned": 1, "pending": 1, "running": 1}
    assert report["running_per_node"] == {"node-1": 1}
    assert report["oldest_pending"] == f"db@sha256:{HEX}"
    assert report["recent_failures"][0]["reason"] == "ErrImageNeverPull"
    assert report["dispatcher_leader"] == "dispatcher-7c9f-x2:1"
    tables = CliRunner().invoke(app, ["status"], env=env)
    assert tables.exit_code == 0
    assert "node-1" in tables.output and "ErrImageNeverPull" in tables.output
    assert "dispatcher leader: dispatcher-7c9f-x2:1" in tables.output


def test_status_before_any_service_ran_shows_nothing_and_creates_no_bucket(nats_settings: NatsSettings) -> None:
    """The operator user creates nothing: on a NATS where no dispatcher has made its buckets yet, status says there
    is nothing, and the buckets are still the services' to create (with their settings) afterwards."""
    fresh = msgspec.structs.replace(nats_settings, kv_prefix="fresh", stream="FRESH", subject_root="fresh")
    result = CliRunner().invoke(app, ["status", "--json"], env=_env(fresh))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["digests"] == 0 and report["dispatcher_leader"] == ""

    async def buckets() -> list[str]:
        bus = await busmod.connect(fresh, "check")
        try:
            return [info.config.name or "" for info in await bus.js.streams_info()]
        finally:
            await bus.close()

    assert not [name for name in asyncio.run(buckets()) if "fresh" in name]
