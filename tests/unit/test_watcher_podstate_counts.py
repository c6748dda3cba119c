"""Per-workload holder counts and early announcements: a workload is news on a node only when none of its pods held
the digest there, however its pods come and go; a container name at the DNS-label limit; a skipped name's bound;
message ids (bench/mutation.py found these unpinned)."""

from __future__ import annotations

import pytest

from schemas.events import ImageOptions, Workload
from services.watcher import podstate
from services.watcher.podstate import Index
from tests.unit.test_watcher_podstate import NOW, REF_A, paged_relist, pod, running, state_of

WEB, API = Workload("Deployment", "web"), Workload("Deployment", "api")


def _holders(index: Index) -> None:
    podstate.observe(index, state_of(pod("api-1"), index, API), NOW)
    podstate.observe(index, state_of(pod("web-1"), index, WEB), NOW)
    assert podstate.observe(index, state_of(pod("web-2"), index, WEB), NOW) == []


def test_a_workload_with_a_pod_left_on_the_node_is_no_news_when_another_of_its_pods_starts() -> None:
    index = Index("prod")
    _holders(index)
    assert podstate.forget(index, "uid-web-1", NOW) == []  # web-2 still holds it
    assert podstate.observe(index, state_of(pod("web-3"), index, WEB), NOW) == []


def test_a_workload_whose_pods_all_left_is_news_again_when_one_comes_back() -> None:
    index = Index("prod")
    _holders(index)
    assert podstate.forget(index, "uid-web-1", NOW) == []
    assert podstate.forget(index, "uid-web-2", NOW) == []  # api still runs the digest there: nothing is gone
    back = podstate.observe(index, state_of(pod("web-3"), index, WEB), NOW)
    assert [(e.workload, e.node) for e in back] == [(WEB, "node-1")]


def test_a_pod_filed_under_another_workload_takes_its_count_there() -> None:
    """A pod filed anew (silently) leaves no count under its old workload: when it goes, nothing is held, and the old
    workload starting there again is news (the leaked count made it look as if it never left)."""
    index = Index("prod")
    podstate.observe(index, state_of(pod("web-1"), index, WEB), NOW)
    assert podstate.observe(index, state_of(pod("web-1"), index, API), NOW) == []
    assert index.workload_counts == {(REF_A, "node-1", "shop", API): 1}
    podstate.forget(index, "uid-web-1", NOW)
    assert index.workload_counts == {}
    podstate.observe(index, state_of(pod("api-2"), index, API), NOW)
    back = podstate.observe(index, state_of(pod("web-2"), index, WEB), NOW)
    assert [(e.workload, e.node) for e in back] == [(WEB, "node-1")]


def test_one_new_holder_listed_on_a_page_is_announced_with_that_page() -> None:
    early, at_end = paged_relist(Index("prod"), [[pod("web-1")]])
    assert early == [[("seen", REF_A, "node-1")]] and at_end == []


def test_a_digest_announced_on_one_page_is_not_announced_again_on_the_next() -> None:
    early, at_end = paged_relist(Index("prod"), [[pod("web-1")], [pod("web-2")]])
    assert early == [[("seen", REF_A, "node-1")], []] and at_end == []


@pytest.mark.parametrize(("length", "kept"), [(63, True), (64, False)])
def test_a_container_name_is_a_dns_label_of_at_most_63_characters(length: int, kept: bool) -> None:
    name = "c" * length
    images = podstate.images_of(pod(app=((name, f"nginx@sha256:{'a' * 64}", running()),)))
    assert (len(images.running) == 1) is kept
    if not kept:
        assert [(s.container, s.reason) for s in images.skipped] == [("c" * 63, "container name is not a DNS label")]


def test_the_name_of_a_skipped_container_is_cut_to_63_characters_and_escaped() -> None:
    name = "Ünicode_" + "x" * 100
    images = podstate.images_of(pod(app=((name, f"nginx@sha256:{'a' * 64}", running()),)))
    assert [s.container for s in images.skipped] == [ascii(name[:63])[1:-1]]


def test_a_message_id_is_the_kind_and_40_hex_characters_of_the_event_hash() -> None:
    index = Index("prod")
    (seen,) = podstate.observe(index, state_of(pod("web-1"), index, WEB), NOW)
    (gone,) = podstate.forget(index, "uid-web-1", NOW)
    for event, kind in ((seen, "seen"), (gone, "gone")):
        ident = podstate.message_id(event)
        prefix, _, digest = ident.partition("-")
        assert prefix == kind and len(digest) == 40 and int(digest, 16) >= 0
    assert podstate.message_id(seen) != podstate.message_id(gone)


def test_options_are_interned_with_the_pod_state() -> None:
    intern = podstate.Interner()
    first = podstate.pod_state(pod("a"), podstate.images_of(pod("a")), WEB, ImageOptions(notify="x"), intern)
    second = podstate.pod_state(pod("b"), podstate.images_of(pod("b")), WEB, ImageOptions(notify="x"), intern)
    assert isinstance(first, podstate.PodState) and isinstance(second, podstate.PodState)
    assert first.options is second.options


def _with_options(index: Index, notify: str | None) -> podstate.PodState:
    p = pod("web-1")
    result = podstate.pod_state(p, podstate.images_of(p), WEB, ImageOptions(notify=notify), index.intern)
    assert isinstance(result, podstate.PodState)
    return result


def test_a_pod_whose_options_change_without_its_images_emits_nothing_and_keeps_the_new_options() -> None:
    """A new notify annotation is no news by itself, but every later event about the pod carries it."""
    index = Index("prod")
    podstate.observe(index, _with_options(index, None), NOW)
    assert podstate.observe(index, _with_options(index, "team-a"), NOW) == []
    assert [e.options.notify for e in podstate.resync(index, NOW)] == ["team-a"]


def test_a_relist_keeps_the_new_options_of_a_pod_whose_images_did_not_change() -> None:
    index = Index("prod")
    podstate.observe(index, _with_options(index, None), NOW)
    assert podstate.reconcile(index, [_with_options(index, "team-a")], NOW) == []
    assert [e.options.notify for e in podstate.resync(index, NOW)] == ["team-a"]


def test_a_pod_whose_workload_is_resolved_anew_with_the_same_images_emits_nothing() -> None:
    """Only what a pod runs is news; the workload it is filed under is kept as the newest, silently."""
    index = Index("prod")
    podstate.observe(index, state_of(pod("web-1"), index, WEB), NOW)
    assert podstate.observe(index, state_of(pod("web-1"), index, API), NOW) == []
    assert podstate.reconcile(index, [state_of(pod("web-1"), index, WEB)], NOW) == []
    assert [e.workload for e in podstate.resync(index, NOW)] == [WEB]


def test_a_relisted_pod_filed_under_another_workload_with_the_same_images_emits_nothing() -> None:
    index = Index("prod")
    podstate.observe(index, state_of(pod("web-1"), index, WEB), NOW)
    assert podstate.reconcile(index, [state_of(pod("web-1"), index, API)], NOW) == []


def test_a_container_not_started_yet_is_neither_held_nor_skipped() -> None:
    """No imageID yet: the runtime has not pulled it; it is reported once it has, not refused now."""
    images = podstate.images_of(pod(app=(("app", "", {"waiting": {"reason": "ContainerCreating"}}),)))
    assert (images.running, images.finished, images.skipped) == ((), (), ())


def test_a_container_with_a_very_long_spec_image_is_still_judged() -> None:
    """Inputs too long to memoise go the uncached way, to the same answer."""
    spec_image = "registry.example.com/" + "a" * 1100 + ":1"
    images = podstate.images_of(pod(spec_images={"app": spec_image}))
    assert len(images.running) + len(images.skipped) == 1
    assert all(isinstance(i, podstate.RunningImage) for i in images.running)
    assert [i.digest_ref for i in images.running] in ([REF_A], [])


@pytest.mark.parametrize(("length", "kept"), [(63, True), (64, False)])
def test_a_pod_namespace_is_a_dns_label_of_at_most_63_characters(length: int, kept: bool) -> None:
    p = pod(namespace="n" * length)
    result = podstate.pod_state(p, podstate.images_of(p), WEB, ImageOptions(), podstate.Interner())
    assert isinstance(result, podstate.PodState) is kept
