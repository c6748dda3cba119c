"""Generated events for dispatcher tests and benchmarks: many digests, many nodes, valid by construction."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from schemas.events import ImageSeen, Workload


def digest_ref(prefix: str, n: int) -> str:
    return f"registry.example.com/{prefix}/app{n}@sha256:" + hashlib.sha256(f"{prefix}/{n}".encode()).hexdigest()


def image_seen(ref: str, node: str, n: int, workloads: int = 50) -> ImageSeen:
    return ImageSeen(
        cluster="default",
        digest_ref=ref,
        image=ref.split("@")[0] + ":1.0",
        node=node,
        namespace="apps",
        pod=f"app-{n}",
        container="app",
        container_kind="app",
        workload=Workload("Deployment", f"app-{n % workloads}"),
        observed_at=datetime.now(UTC),
    )
