"""Pod state at its edges: names at their length limits, a container whose name is refused, a workload leaving and
coming back on a node another workload keeps, and a relist in which a pod changes or drops what it announced."""

from __future__ import annotations

from schemas.events import ImageOptions, Workload
from services.watcher import podstate
from services.watcher.podstate import Index
from tests.unit.test_watcher_podstate import (
    NOW,
    REF_A,
    REF_B,
    B,
    paged_relist,
    pod,
    running,
    state_of,
    terminated,
    waiting,
)


def _state(p: object) -> object:
    return podstate.pod_state(p, podstate.images_of(p), Workload("Pod", "x"), ImageOptions(), podstate.Interner())  # type: ignore[arg-type]


def test_a_container_whose_name_is_not_a_dns_label_is_skipped_with_the_reason() -> None:
    p = pod(app=(("Bad_Name", f"nginx@sha256:{'a' * 64}", running()),))
    images = podstate.images_of(p)
    assert images.running == () and images.finished == ()
    assert [(s.container, s.reason) for s in images.skipped] == [("Bad_Name", "container name is not a DNS label")]


def test_pod_and_node_names_of_253_characters_are_kept_and_254_refused() -> None:
    longest = ".".join(["a" * 63] * 4)[:253]
    assert len(longest) == 253
    assert isinstance(_state(pod(longest)), podstate.PodState)
    assert isinstance(_state(pod(longest + "a")), podstate.Skipped)
    assert isinstance(_state(pod(node=longest)), podstate.PodState)
    assert isinstance(_state(pod(node=longest + "a")), podstate.Skipped)


def test_a_workload_that_leaves_a_node_another_keeps_is_seen_again_when_it_comes_back() -> None:
    index = Index("prod")
    web, api = Workload("Deployment", "web"), Workload("Deployment", "api")
    podstate.observe(index, state_of(pod("api-1"), index, api), NOW)
    first = podstate.observe(index, state_of(pod("web-1"), index, web), NOW)
    assert [(e.workload, e.node) for e in first] == [(web, "node-1")]
    assert podstate.forget(index, "uid-web-1", NOW) == []  # api still runs the digest there: nothing is gone
    back = podstate.observe(index, state_of(pod("web-2"), index, web), NOW)
    assert [(e.workload, e.node) for e in back] == [(web, "node-1")], "the workload's owners hear of it again"


def test_a_pod_that_changes_its_image_between_lists_reports_the_old_one_gone() -> None:
    index = Index("prod")
    podstate.observe(index, state_of(pod("web-1"), index), NOW)
    changed = pod("web-1", app=(("app", f"ghcr.io/org/app@sha256:{B}", running()),))
    early, at_end = paged_relist(index, [[changed]])
    assert early == [[("seen", REF_B, "node-1")]]
    assert at_end == [("gone", REF_A, "node-1")]


def test_an_image_announced_on_a_page_and_dropped_by_the_same_pod_later_in_the_list_is_gone_at_the_end() -> None:
    index = Index("prod")
    holds = pod("web-1")
    stopped = pod(
        "web-1", phase="Succeeded", restart_policy="Never", app=(("app", f"nginx@sha256:{'a' * 64}", terminated()),)
    )
    early, at_end = paged_relist(index, [[holds], [stopped]])
    assert early == [[("seen", REF_A, "node-1")], []]
    assert at_end == [("gone", REF_A, "node-1")]


def test_a_pair_brought_and_dropped_within_one_page_is_never_announced() -> None:
    index = Index("prod")
    holds = pod("web-1")
    not_running = pod("web-1", app=(("app", "", waiting()),))  # the same pod, listed again holding nothing
    early, at_end = paged_relist(index, [[holds, not_running]])
    assert early == [[]]
    assert at_end == []
