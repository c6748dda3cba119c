"""digests.py driven without NATS or an API server: in-memory scan states and limiter key, a stand-in API."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

import pytest

from podsweep.config import DispatcherSettings, Settings
from podsweep.kube import KubeError
from schemas.events import ScanFailed
from schemas.refs import digest_hex
from schemas.state import DigestScanState
from services.dispatcher import plan
from services.dispatcher.batching import Gathering
from services.dispatcher.digests import Digests
from services.dispatcher.launcher import Launcher
from services.dispatcher.schedule import Launch, Schedule
from services.dispatcher.settings import configure
from tests.harness.events import digest_ref, image_seen
from tests.unit.test_dispatcher_launcher import Api, Signer
from tests.unit.test_dispatcher_slots import MemoryKey

D = TypeVar("D")
Decide = Callable[[DigestScanState | None], tuple[DigestScanState | None, D]]


class MemoryStates:
    """The scans bucket: documents with revisions, compare-and-set, the writes counted."""

    def __init__(self) -> None:
        self.docs: dict[str, tuple[DigestScanState | None, int]] = {}
        self.writes = 0

    def known(self, key: str) -> tuple[DigestScanState | None, int] | None:
        return self.docs.get(key, (None, 0))

    def documents(self) -> list[tuple[str, DigestScanState]]:
        return [(k, d) for k, (d, _) in self.docs.items() if d is not None]

    async def read(self, key: str) -> tuple[DigestScanState | None, int]:
        return self.docs.get(key, (None, 0))

    async def write(
        self, key: str, decide: Decide[D], known: tuple[DigestScanState | None, int] | None, fresh: bool
    ) -> tuple[DigestScanState | None, int, bool, D]:
        current, revision = known if known is not None else self.docs.get(key, (None, 0))
        while True:
            new, decided = decide(current)
            stored = self.docs.get(key, (None, 0))
            if new is None and (fresh or revision == stored[1]):
                return current, revision, False, decided
            if new is not None and revision == stored[1]:
                self.writes += 1
                self.docs[key] = (new, stored[1] + 1)
                return new, stored[1] + 1, True, decided
            current, revision = stored

    def state(self, ref: str) -> DigestScanState:
        found = self.docs[digest_hex(ref)][0]
        assert found is not None
        return found


class World:
    def __init__(self, api: Api, **limits: int) -> None:
        settings = Settings(namespace="scans", dispatcher=DispatcherSettings(**limits))  # type: ignore[arg-type]
        self.cfg = configure(settings)
        self.api, self.states, self.key = api, MemoryStates(), MemoryKey()
        self.digests = Digests(
            settings=settings,
            cfg=self.cfg,
            states=self.states,
            limiter_key=self.key,
            launcher=Launcher(self.cfg, settings.parser, api, Signer()),
            schedule=Schedule(lambda: datetime.now(UTC)),
            gathering=Gathering(self.cfg.sbom_batch_size, self.cfg.sbom_batch_window_s),
        )

    async def sight(self, ref: str, node: str) -> Launch | None:
        """What main.py does with one image.seen it does not hold."""
        now, key = datetime.now(UTC), digest_hex(ref)
        active, room = self.digests.view(now)
        policy, limits = self.cfg.policy, self.cfg.limits
        seen = [image_seen(ref, node, 1)]
        written = await self.digests.update(
            key, lambda old: plan.on_sightings(old, seen, now, policy, active, limits, room=room), (node,)
        )
        return await self.digests.follow(key, written)

    def slots(self) -> list[str]:
        return [s.scan_id for s in self.digests.slots.view.slots]


REF_A, REF_B = digest_ref("unit", 1), digest_ref("unit", 2)


async def test_a_new_digest_is_claimed_given_a_slot_created_and_recorded_running() -> None:
    world = World(Api())
    assert await world.sight(REF_A, "n1") == "created"
    state = world.states.state(REF_A)
    assert (state.status, state.node, state.attempts) == ("running", "n1", 1)
    ((method, _, body),) = world.api.calls
    assert method == "POST" and body["metadata"]["name"] == state.scan_id
    assert world.slots() == [state.scan_id]
    assert await world.sight(REF_A, "n2") is None, "a second node of a running digest starts nothing"
    assert len(world.api.calls) == 1


async def test_a_digest_parked_for_a_slot_takes_the_finished_scans_slot_in_one_limiter_write() -> None:
    world = World(Api(), max_active=1)
    await world.sight(REF_A, "n1")
    assert await world.sight(REF_B, "n2") is None
    assert digest_hex(REF_B) in world.digests.schedule.parked
    writes = world.key.writes
    await world.digests.hand_over(world.states.state(REF_A).scan_id)
    b = world.states.state(REF_B)
    assert b.status == "running" and world.slots() == [b.scan_id]
    assert world.key.writes == writes + 1, "A's release and B's acquire in one write"
    assert digest_hex(REF_B) not in world.digests.schedule.parked


async def test_a_finished_scan_with_nothing_parked_releases_its_slot() -> None:
    world = World(Api())
    await world.sight(REF_A, "n1")
    await world.digests.hand_over(world.states.state(REF_A).scan_id)
    assert world.slots() == [] and world.digests.slots.releasing == set()


async def test_a_transient_api_failure_gives_the_slot_back_and_raises_for_a_retry() -> None:
    world = World(Api(503))
    with pytest.raises(KubeError):
        await world.sight(REF_A, "n1")
    assert world.slots() == []
    assert world.states.state(REF_A).status == "pending", "the claim stays: it expires and is resumed"


async def test_a_job_the_api_server_will_always_refuse_is_a_failed_attempt_with_backoff() -> None:
    world = World(Api(422))
    assert await world.sight(REF_A, "n1") == "failed"
    state = world.states.state(REF_A)
    assert state.status == "failed" and state.attempts == 1
    assert world.slots() == []
    assert digest_hex(REF_A) in world.digests.schedule.timers, "retried when the backoff passed"


async def test_a_hold_on_refused_pods_stops_new_jobs() -> None:
    world = World(Api())
    await world.sight(REF_A, "n1")
    a = world.states.state(REF_A)
    refused = plan_failed(a, "PodCreateRejected")
    world.digests.launcher.pods_refused(refused, datetime.now(UTC))
    assert await world.sight(REF_B, "n2") is None
    assert len(world.api.calls) == 1 and digest_hex(REF_B) in world.digests.schedule.parked


def plan_failed(state: DigestScanState, reason: str) -> ScanFailed:
    return ScanFailed(
        cluster="default",
        scan_id=state.scan_id or "",
        digest_ref=state.digest_ref,
        mode="node",
        node=state.node,
        job=state.scan_id or "",
        reason=reason,  # type: ignore[arg-type]
        message="forbidden",
        failed_at=datetime.now(UTC),
    )


async def test_the_sweep_selects_only_digests_a_decision_would_change() -> None:
    world = World(Api())
    await world.sight(REF_A, "n1")
    assert world.digests.sweep_candidates() == [], "running within its claim: nothing to do"
