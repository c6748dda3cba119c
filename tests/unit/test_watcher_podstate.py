"""Pod changes → image.seen / image.gone: one per (digest, node), no duplicates, nothing missed."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import ImageGone, ImageOptions, ImageSeen, Workload
from services.watcher import kubeobjects, podstate
from services.watcher.podstate import Index, PodState

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
A = "a" * 64
B = "b" * 64
C = "c" * 64
REF_A = f"docker.io/library/nginx@sha256:{A}"
REF_B = f"ghcr.io/org/app@sha256:{B}"
REF_C = f"ghcr.io/org/init@sha256:{C}"

_seen_decoder = msgspec.json.Decoder(ImageSeen)
_gone_decoder = msgspec.json.Decoder(ImageGone)


def running() -> dict[str, Any]:
    return {"running": {"startedAt": "2026-11-23T08:00:00Z"}}


def waiting(reason: str = "ContainerCreating") -> dict[str, Any]:
    return {"waiting": {"reason": reason}}


def terminated(exit_code: int = 0, reason: str = "Completed") -> dict[str, Any]:
    return {"terminated": {"exitCode": exit_code, "reason": reason}}


def status(name: str, image_id: str, state: dict[str, Any], image: str = "") -> dict[str, Any]:
    return {"name": name, "image": image, "imageID": image_id, "state": state}


def pod(
    name: str = "web-1",
    *,
    uid: str | None = None,
    node: str = "node-1",
    phase: str = "Running",
    restart_policy: str = "Always",
    app: Sequence[tuple[str, str, dict[str, Any]]] = (("app", f"nginx@sha256:{A}", running()),),
    init: Sequence[tuple[str, str, dict[str, Any]]] = (),
    ephemeral: Sequence[tuple[str, str, dict[str, Any]]] = (),
    namespace: str = "shop",
    spec_images: dict[str, str] | None = None,
) -> kubeobjects.Pod:
    """A pod as the API server would send it, decoded by the watcher's own decoder."""
    spec_images = spec_images or {}

    def spec(entries: Sequence[tuple[str, str, dict[str, Any]]]) -> list[dict[str, str]]:
        return [{"name": n, "image": spec_images.get(n, "nginx:1.27")} for n, _, _ in entries]

    raw = {
        "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}", "resourceVersion": "1"},
        "spec": {
            "nodeName": node,
            "restartPolicy": restart_policy,
            "containers": spec(app),
            "initContainers": spec(init),
            "ephemeralContainers": spec(ephemeral),
        },
        "status": {
            "phase": phase,
            "containerStatuses": [status(n, i, s) for n, i, s in app],
            "initContainerStatuses": [status(n, i, s) for n, i, s in init],
            "ephemeralContainerStatuses": [status(n, i, s) for n, i, s in ephemeral],
        },
    }
    return msgspec.json.decode(msgspec.json.encode(raw), type=kubeobjects.Pod)


def state_of(p: kubeobjects.Pod, index: Index, workload: Workload | None = None) -> PodState:
    result = podstate.pod_state(
        p,
        podstate.images_of(p),
        workload or Workload("Deployment", "web"),
        ImageOptions(),
        index.intern,
    )
    assert isinstance(result, PodState)
    return result


def summary(events: Sequence[ImageSeen | ImageGone]) -> list[tuple[str, str, str]]:
    return [("seen" if isinstance(e, ImageSeen) else "gone", e.digest_ref, e.node) for e in events]


def observe(index: Index, p: kubeobjects.Pod) -> list[tuple[str, str, str]]:
    return summary(podstate.observe(index, state_of(p, index), NOW))


def test_first_running_container_emits_one_seen_with_its_context() -> None:
    index = Index("prod")
    events = podstate.observe(index, state_of(pod(), index), NOW)
    assert events == [
        ImageSeen(
            cluster="prod",
            digest_ref=REF_A,
            image="nginx:1.27",
            node="node-1",
            namespace="shop",
            pod="web-1",
            container="app",
            container_kind="app",
            workload=Workload("Deployment", "web"),
            observed_at=NOW,
        )
    ]
    # What the watcher emits decodes under the contract's validation.
    assert _seen_decoder.decode(msgspec.json.encode(events[0])) == events[0]


def test_second_replica_on_the_same_node_emits_nothing_and_one_on_another_node_emits_seen() -> None:
    index = Index("prod")
    assert observe(index, pod("web-1")) == [("seen", REF_A, "node-1")]
    assert observe(index, pod("web-2")) == []
    assert observe(index, pod("web-3", node="node-2")) == [("seen", REF_A, "node-2")]


def test_repeated_status_updates_never_emit_duplicates() -> None:
    index = Index("prod")
    observe(index, pod())
    for _ in range(3):
        assert observe(index, pod()) == []


def test_gone_only_when_the_last_holder_on_a_node_is_deleted() -> None:
    index = Index("prod")
    observe(index, pod("web-1"))
    observe(index, pod("web-2"))
    assert summary(podstate.forget(index, "uid-web-1", NOW)) == []
    events = podstate.forget(index, "uid-web-2", NOW)
    assert summary(events) == [("gone", REF_A, "node-1")]
    assert _gone_decoder.decode(msgspec.json.encode(events[0])) == events[0]
    assert index.counts == {}
    assert summary(podstate.forget(index, "uid-web-2", NOW)) == []  # a second DELETED is harmless


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        pytest.param(
            pod(app=[("app", "", waiting())]),
            pod(),
            [("seen", REF_A, "node-1")],
            id="container-gets-its-image-id",
        ),
        pytest.param(pod(), pod(phase="Succeeded"), [("gone", REF_A, "node-1")], id="pod-succeeded"),
        pytest.param(pod(), pod(phase="Failed"), [("gone", REF_A, "node-1")], id="pod-failed"),
        pytest.param(
            pod(restart_policy="Never"),
            pod(restart_policy="Never", app=[("app", f"nginx@sha256:{A}", terminated(1, "Error"))]),
            [("gone", REF_A, "node-1")],
            id="container-terminated-never-restarts",
        ),
        pytest.param(
            pod(),
            pod(app=[("app", f"nginx@sha256:{A}", terminated(1, "Error"))]),
            [],
            id="crash-with-restart-always-keeps-the-digest",
        ),
        pytest.param(
            pod(app=[("app", f"nginx@sha256:{A}", terminated(1, "Error"))]),
            pod(app=[("app", f"nginx@sha256:{A}", waiting("CrashLoopBackOff"))]),
            [],
            id="crash-loop-backoff-never-flaps",
        ),
        pytest.param(
            pod(restart_policy="OnFailure"),
            pod(restart_policy="OnFailure", app=[("app", f"nginx@sha256:{A}", terminated(2, "Error"))]),
            [],
            id="on-failure-restart-after-error-keeps-the-digest",
        ),
        pytest.param(
            pod(restart_policy="OnFailure"),
            pod(restart_policy="OnFailure", app=[("app", f"nginx@sha256:{A}", terminated(0))]),
            [("gone", REF_A, "node-1")],
            id="on-failure-success-stops-for-good",
        ),
        pytest.param(
            pod(),
            pod(app=[("app", f"ghcr.io/org/app@sha256:{B}", running())]),
            [("seen", REF_B, "node-1"), ("gone", REF_A, "node-1")],
            id="image-changed-in-place-new-seen-before-old-gone",
        ),
        pytest.param(
            pod(app=[("app", f"nginx@sha256:{A}", running())]),
            pod(
                app=[("app", f"nginx@sha256:{A}", running())],
                ephemeral=[("debugger", f"ghcr.io/org/app@sha256:{B}", running())],
            ),
            [("seen", REF_B, "node-1")],
            id="ephemeral-debug-container-attached",
        ),
        pytest.param(
            pod(ephemeral=[("debugger", f"ghcr.io/org/app@sha256:{B}", running())]),
            pod(ephemeral=[("debugger", f"ghcr.io/org/app@sha256:{B}", terminated(0))]),
            [("gone", REF_B, "node-1")],
            id="ephemeral-container-exits",
        ),
    ],
)
def test_container_lifecycle_changes(
    before: kubeobjects.Pod, after: kubeobjects.Pod, expected: list[tuple[str, str, str]]
) -> None:
    index = Index("prod")
    observe(index, before)
    assert observe(index, after) == expected


def test_init_container_seen_while_running_is_kept_after_it_completes() -> None:
    index = Index("prod")
    starting = pod(
        phase="Pending", init=[("migrate", f"ghcr.io/org/init@sha256:{C}", running())], app=[("app", "", waiting())]
    )
    assert observe(index, starting) == [("seen", REF_C, "node-1")]
    done = pod(init=[("migrate", f"ghcr.io/org/init@sha256:{C}", terminated(0))])
    assert observe(index, done) == [("seen", REF_A, "node-1")]
    assert summary(podstate.forget(index, "uid-web-1", NOW)) == [("gone", REF_C, "node-1"), ("gone", REF_A, "node-1")]


def test_init_container_that_finished_unobserved_is_still_reported() -> None:
    index = Index("prod")
    first_seen_running = pod(init=[("migrate", f"ghcr.io/org/init@sha256:{C}", terminated(0))])
    assert sorted(observe(index, first_seen_running)) == [("seen", REF_A, "node-1"), ("seen", REF_C, "node-1")]


def test_fast_job_pod_first_seen_succeeded_emits_seen_then_gone() -> None:
    index = Index("prod")
    done = pod("job-x", phase="Succeeded", restart_policy="Never", app=[("main", f"nginx@sha256:{A}", terminated(0))])
    assert observe(index, done) == [("seen", REF_A, "node-1"), ("gone", REF_A, "node-1")]
    assert observe(index, done) == []  # a later status update of the finished pod is not news
    assert podstate.reconcile(index, [state_of(done, index)], NOW) == []  # nor is a relist


def test_fast_job_pod_is_not_flashed_when_another_pod_holds_the_digest() -> None:
    index = Index("prod")
    observe(index, pod("web-1"))
    done = pod("job-x", phase="Succeeded", restart_policy="Never", app=[("main", f"nginx@sha256:{A}", terminated(0))])
    assert observe(index, done) == []


def test_pod_deleted_before_it_was_seen_running_is_reported_from_its_last_state() -> None:
    index = Index("prod")
    observe(index, pod(app=[("app", "", waiting())]))
    last = state_of(pod(), index)
    assert summary(podstate.forget(index, last.uid, NOW, last)) == [
        ("seen", REF_A, "node-1"),
        ("gone", REF_A, "node-1"),
    ]


def test_deleted_pod_with_a_final_state_already_reported_emits_only_gone() -> None:
    index = Index("prod")
    observe(index, pod())
    last = state_of(pod(), index)
    assert summary(podstate.forget(index, last.uid, NOW, last)) == [("gone", REF_A, "node-1")]


def test_unscheduled_pod_and_invalid_image_ids_hold_nothing() -> None:
    index = Index("prod")
    assert observe(index, pod(node="")) == []
    hostile = pod(app=[("app", "evil;reboot@sha256:xyz", running())])
    images = podstate.images_of(hostile)
    assert images.running == ()
    assert not images.has_images()
    assert podstate.images_of(pod()).has_images()
    assert [s.reason for s in images.skipped] == ["repository is not a valid OCI name (repo-digest)"]
    assert observe(index, hostile) == []


def test_same_digest_in_two_containers_of_one_pod_is_one_seen_and_one_gone() -> None:
    index = Index("prod")
    two = pod(app=[("a", f"nginx@sha256:{A}", running()), ("b", f"nginx@sha256:{A}", running())])
    assert observe(index, two) == [("seen", REF_A, "node-1")]
    assert observe(index, pod(app=[("a", f"nginx@sha256:{A}", running())])) == []
    assert summary(podstate.forget(index, "uid-web-1", NOW)) == [("gone", REF_A, "node-1")]


def test_rollout_replacing_every_pod_on_a_node_emits_new_seen_then_old_gone_once() -> None:
    index = Index("prod")
    old = [pod(f"web-old-{i}", node=f"node-{i % 2}") for i in range(4)]
    for p in old:
        observe(index, p)
    new_app = [("app", f"ghcr.io/org/app@sha256:{B}", running())]
    events: list[tuple[str, str, str]] = []
    for i in range(4):  # surge one new pod, then delete one old pod, like a RollingUpdate
        events += observe(index, pod(f"web-new-{i}", node=f"node-{i % 2}", app=new_app))
        events += summary(podstate.forget(index, f"uid-web-old-{i}", NOW))
    assert events == [
        ("seen", REF_B, "node-0"),
        ("seen", REF_B, "node-1"),
        ("gone", REF_A, "node-0"),
        ("gone", REF_A, "node-1"),
    ]


def test_relist_of_an_unchanged_cluster_emits_nothing() -> None:
    index = Index("prod")
    pods = [pod(f"web-{i}", node=f"node-{i % 3}") for i in range(30)]
    for p in pods:
        observe(index, p)
    assert podstate.reconcile(index, [state_of(p, index) for p in pods], NOW) == []
    assert len(index.pods) == 30


def test_relist_catches_deletions_and_additions_missed_while_disconnected() -> None:
    index = Index("prod")
    observe(index, pod("web-1", node="node-1"))
    observe(index, pod("web-2", node="node-2"))
    observe(index, pod("other", node="node-3", app=[("app", f"ghcr.io/org/app@sha256:{B}", running())]))
    # While the watch was down: web-2 and other were deleted, web-3 started on node-2 with the same digest,
    # and web-4 started on node-4.
    listed = [pod("web-1", node="node-1"), pod("web-3", node="node-2"), pod("web-4", node="node-4")]
    events = podstate.reconcile(index, [state_of(p, index) for p in listed], NOW)
    assert sorted(summary(events)) == [("gone", REF_B, "node-3"), ("seen", REF_A, "node-4")]
    assert set(index.pods) == {"uid-web-1", "uid-web-3", "uid-web-4"}


def test_relist_after_restart_reports_every_digest_once() -> None:
    index = Index("prod")
    listed = [pod(f"web-{i}", node=f"node-{i % 2}") for i in range(10)]
    events = podstate.reconcile(index, [state_of(p, index) for p in listed], NOW)
    assert sorted(summary(events)) == [("seen", REF_A, "node-0"), ("seen", REF_A, "node-1")]


def test_resync_re_emits_one_seen_per_digest_and_node_marked_resync() -> None:
    index = Index("prod")
    for i in range(6):
        observe(index, pod(f"web-{i}", node=f"node-{i % 2}"))
    observe(index, pod("job", node="node-0", app=[("app", f"ghcr.io/org/app@sha256:{B}", running())]))
    resynced = podstate.resync(index, NOW)
    assert sorted(summary(resynced)) == [
        ("seen", REF_A, "node-0"),
        ("seen", REF_A, "node-1"),
        ("seen", REF_B, "node-0"),
    ]
    assert all(e.resync for e in resynced)
    assert podstate.resync(index, NOW) == resynced  # deterministic: same message ids within a slot
    assert [podstate.message_id(e) for e in podstate.resync(index, NOW)] == [podstate.message_id(e) for e in resynced]


def test_resync_of_an_empty_index_is_empty() -> None:
    assert podstate.resync(Index("prod"), NOW) == []


def test_workload_or_option_change_updates_state_without_events() -> None:
    index = Index("prod")
    observe(index, pod())
    updated = podstate.pod_state(
        pod(), podstate.images_of(pod()), Workload("Rollout", "web"), ImageOptions(notify="oncall"), index.intern
    )
    assert isinstance(updated, PodState)
    assert podstate.observe(index, updated, NOW) == []
    assert index.workload_of("uid-web-1") == (Workload("Rollout", "web"), ImageOptions(notify="oncall"))


def test_message_ids_differ_between_events_and_repeat_for_the_same_event() -> None:
    index = Index("prod")
    seen = podstate.observe(index, state_of(pod(), index), NOW)[0]
    gone = podstate.forget(index, "uid-web-1", NOW)[0]
    assert podstate.message_id(seen) == podstate.message_id(seen)
    assert podstate.message_id(seen) != podstate.message_id(gone)


@pytest.mark.parametrize(
    ("namespace", "name", "node"),
    [
        pytest.param("Shop", "web-1", "node-1", id="namespace-not-a-label"),
        pytest.param("shop", "web_1", "node-1", id="pod-name-not-a-subdomain"),
        pytest.param("shop", "web-1", "node 1", id="node-name-with-space"),
    ],
)
def test_pods_with_names_the_api_server_would_refuse_are_skipped(namespace: str, name: str, node: str) -> None:
    p = pod(name, namespace=namespace, node=node)
    result = podstate.pod_state(p, podstate.images_of(p), Workload("Pod", "x"), ImageOptions(), podstate.Interner())
    assert isinstance(result, podstate.Skipped)


def test_replicas_share_interned_state() -> None:
    index = Index("prod")
    a = state_of(pod("web-1"), index)
    b = state_of(pod("web-2"), index)
    assert a.running[0] is b.running[0]
    assert a.workload is b.workload
    assert a.namespace is b.namespace
    assert a.node is b.node
    observe(index, pod("web-1"))
    podstate.forget(index, "uid-web-1", NOW)
    podstate.resync(index, NOW)
    assert len(index.intern) == 0  # resync drops interned values no pod uses any more


# Any sequence of watch events and relists keeps these rules: per (digest, node), gone follows a seen and the events
# say exactly what the index holds; every workload holding a digest on a node was named by a seen since that
# (digest, node) last started; and a workload that kept holding through a change is not announced again.
_UIDS = [f"u{i}" for i in range(6)]
_REFS = [REF_A, REF_B, REF_C]
_op: st.SearchStrategy[tuple[str, Any, list[str], list[str]]] = st.one_of(
    st.tuples(
        st.just("observe"),
        st.sampled_from(_UIDS),
        st.lists(st.sampled_from(_REFS), max_size=3),
        st.lists(st.sampled_from(_REFS), max_size=2),
    ),
    st.tuples(st.just("forget"), st.sampled_from(_UIDS), st.just([]), st.lists(st.sampled_from(_REFS), max_size=2)),
    st.tuples(st.just("relist"), st.sets(st.sampled_from(_UIDS)).map(sorted), st.just([]), st.just([])),
)


def _state(uid: str, running: list[str], finished: list[str]) -> PodState:
    node = "node-0" if uid in ("u0", "u1", "u2") else "node-1"
    images = [podstate.RunningImage(ref, f"c{i}", "app", "nginx") for i, ref in enumerate(running)]
    done = [podstate.RunningImage(ref, f"f{i}", "app", "nginx") for i, ref in enumerate(finished)]
    return PodState(
        uid, "shop", f"pod-{uid}", node, Workload("Pod", f"pod-{uid}"), ImageOptions(), tuple(images), tuple(done)
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=25))
def test_any_event_sequence_alternates_seen_and_gone_per_digest_and_node(
    ops: list[tuple[str, Any, list[str], list[str]]],
) -> None:
    index = Index("prod")
    active: set[tuple[str, str]] = set()
    announced: dict[tuple[str, str], set[Workload]] = {}
    cluster_now: dict[str, PodState] = {}  # what the API server would list

    def holders() -> set[tuple[str, str, Workload]]:
        return {(i.digest_ref, s.node, s.workload) for s in cluster_now.values() for i in s.running}

    for op, target, running_refs, finished_refs in ops:
        held_before = holders()
        if op == "observe":
            state = _state(target, running_refs, finished_refs)
            cluster_now[target] = state
            events = podstate.observe(index, state, NOW)
        elif op == "forget":
            last = cluster_now.pop(target, None)
            events = podstate.forget(index, target, NOW, last)
        else:  # a relist after a disconnect: pods not listed were deleted meanwhile
            cluster_now = {uid: s for uid, s in cluster_now.items() if uid in target}
            events = podstate.reconcile(index, list(cluster_now.values()), NOW)
        held_after = holders()
        for event in events:
            key = (event.digest_ref, event.node)
            if isinstance(event, ImageSeen):
                kept = (*key, event.workload) in held_before and (*key, event.workload) in held_after
                assert not (kept and key in active), f"{event.workload} kept holding {key} and was announced again"
                active.add(key)
                announced.setdefault(key, set()).add(event.workload)
            else:
                assert key in active, f"gone without seen for {key}"
                active.remove(key)
                announced.pop(key, None)
        holding = {(ref, node) for ref, node, _ in held_after}
        assert active == holding == set(index.counts)
        for ref, node, workload in held_after:
            assert workload in announced[(ref, node)], f"{workload} holds {(ref, node)} and was never announced"
        assert index.pods == cluster_now


def paged_relist(index: Index, pages: Sequence[Sequence[kubeobjects.Pod]]) -> tuple[list[Any], list[Any]]:
    """(what each page announced, what finish emitted), as summaries."""
    relist = podstate.Relist(index)
    early = [summary(relist.page([state_of(p, index) for p in page], NOW)) for page in pages]
    return early, summary(relist.finish(NOW))


def test_first_list_announces_each_digest_and_node_on_the_page_that_brings_it() -> None:
    pages = [[pod("web-1"), pod("web-2")], [pod("web-3"), pod("web-4", node="node-2")]]
    early, at_end = paged_relist(Index("prod"), pages)
    assert early == [[("seen", REF_A, "node-1")], [("seen", REF_A, "node-2")]]
    assert at_end == []


def test_relist_announces_only_new_pairs_and_reports_gone_at_the_end() -> None:
    index = Index("prod")
    observe(index, pod("web-1"))
    observe(index, pod("other", node="node-2", app=[("app", f"ghcr.io/org/app@sha256:{B}", running())]))
    # Meanwhile: web-1 was replaced by web-3 on the same node, other was deleted, web-4 started on node-3.
    pages = [[pod("web-3")], [pod("web-4", node="node-3", app=[("app", f"ghcr.io/org/app@sha256:{B}", running())])]]
    early, at_end = paged_relist(index, pages)
    assert early == [[], [("seen", REF_B, "node-3")]]
    assert at_end == [("gone", REF_B, "node-2")]


def test_digest_whose_new_holder_comes_on_a_later_page_is_never_gone() -> None:
    index = Index("prod")
    observe(index, pod("web-1"))
    early, at_end = paged_relist(index, [[pod("db-1", node="node-2")], [pod("web-9")]])  # web-1 replaced by web-9
    assert early == [[("seen", REF_A, "node-2")], []]
    assert at_end == []


def test_pod_that_ran_and_stopped_between_lists_is_reported_at_the_end_as_seen_then_gone() -> None:
    index = Index("prod")
    job = pod("job-1", phase="Succeeded", restart_policy="Never", app=(("app", f"nginx@sha256:{A}", terminated()),))
    early, at_end = paged_relist(index, [[job]])
    assert early == [[]]
    assert at_end == [("seen", REF_A, "node-1"), ("gone", REF_A, "node-1")]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_op, max_size=15),
    st.lists(st.tuples(st.sampled_from(_UIDS), st.lists(st.sampled_from(_REFS), max_size=3)), max_size=6),
    st.lists(st.integers(min_value=0, max_value=6), max_size=4),
)
def test_a_relist_in_pages_emits_what_the_same_relist_in_one_piece_emits(
    ops: list[tuple[str, Any, list[str], list[str]]],
    listed_pods: list[tuple[str, list[str]]],
    cuts: list[int],
) -> None:
    def history() -> Index:
        index = Index("prod")
        for op, target, running_refs, finished_refs in ops:
            if op == "observe":
                podstate.observe(index, _state(target, running_refs, finished_refs), NOW)
            elif op == "forget":
                podstate.forget(index, target, NOW)
        return index

    listed = list({uid: _state(uid, refs, []) for uid, refs in listed_pods}.values())  # a list names a uid once
    whole, paged = history(), history()
    expected = podstate.reconcile(whole, listed, NOW)
    relist = podstate.Relist(paged)
    bounds = [0, *sorted(min(c, len(listed)) for c in cuts), len(listed)]
    events: list[Any] = []
    for start, end in itertools.pairwise(bounds):
        events += relist.page(listed[start:end], NOW)
    events += relist.finish(NOW)
    assert sorted(summary(events)) == sorted(summary(expected))
    assert paged.pods == whole.pods
    assert paged.counts == whole.counts
