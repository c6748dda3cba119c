"""Who runs a digest: recording image.seen sightings without rewriting KV on every resync."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from podsweep.workloads import MAX_RUNS, forget_older_than, record_seen
from schemas.events import ImageOptions, ImageSeen, Workload

T0 = datetime(2026, 11, 23, 8, tzinfo=UTC)
REF = "registry.example.com/app@sha256:" + "c" * 64


def seen(ns: str = "shop", name: str = "web", at: datetime = T0, **options: object) -> ImageSeen:
    return ImageSeen(
        cluster="c1",
        digest_ref=REF,
        image="registry.example.com/app:1.0",
        node="node-1",
        namespace=ns,
        pod=f"{name}-abc",
        container="app",
        container_kind="app",
        workload=Workload("Deployment", name),
        options=ImageOptions(**options),  # type: ignore[arg-type]
        observed_at=at,
    )


def test_first_sighting_creates_the_document() -> None:
    doc = record_seen(None, seen())
    assert doc is not None
    assert [(r.namespace, r.workload.name) for r in doc.runs] == [("shop", "web")]


@pytest.mark.parametrize(
    ("later", "writes"),
    [
        pytest.param(seen(at=T0 + timedelta(minutes=5)), False, id="resync-within-an-hour"),
        pytest.param(seen(at=T0 + timedelta(hours=2)), True, id="resync-after-an-hour-refreshes"),
        pytest.param(seen(at=T0 + timedelta(minutes=5), ignore_unfixed=True), True, id="options-changed"),
        pytest.param(seen(at=T0 - timedelta(hours=2)), False, id="older-redelivery"),
        pytest.param(seen(name="api"), True, id="another-workload"),
        pytest.param(seen(ns="billing"), True, id="another-namespace"),
    ],
)
def test_only_news_is_written(later: ImageSeen, writes: bool) -> None:
    doc = record_seen(None, seen())
    assert doc is not None
    assert (record_seen(doc, later) is not None) is writes


def test_runs_are_capped_keeping_the_most_recent() -> None:
    doc = None
    for i in range(MAX_RUNS + 10):
        doc = record_seen(doc, seen(name=f"w{i}", at=T0 + timedelta(seconds=i))) or doc
    assert doc is not None
    assert len(doc.runs) == MAX_RUNS
    assert doc.runs[0].workload.name == f"w{MAX_RUNS + 9}"


def test_forgetting_drops_only_stale_runs() -> None:
    doc = record_seen(record_seen(None, seen(at=T0)), seen(name="api", at=T0 + timedelta(days=10)))
    assert doc is not None
    kept = forget_older_than(doc, T0 + timedelta(days=7))
    assert kept is not None and [r.workload.name for r in kept.runs] == ["api"]
    assert forget_older_than(kept, T0) is None


def test_a_second_container_of_the_same_image_is_recorded_with_the_cluster() -> None:
    doc = record_seen(None, seen())
    assert doc is not None and doc.runs[0].containers == ["app"] and doc.runs[0].cluster == "c1"
    sidecar = msgspec.structs.replace(seen(at=T0 + timedelta(minutes=1)), container="sidecar")
    after = record_seen(doc, sidecar)
    assert after is not None and after.runs[0].containers == ["app", "sidecar"]
    assert record_seen(after, sidecar) is None  # known now: a resync writes nothing
    older = msgspec.structs.replace(seen(at=T0 - timedelta(hours=1)), container="init")
    merged = record_seen(after, older)
    assert merged is not None and merged.runs[0].containers == ["app", "init", "sidecar"]
    assert merged.runs[0].last_seen_at == T0 + timedelta(minutes=1)  # an older sighting never moves it back
