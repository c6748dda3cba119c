"""Scanner text in the webhook payload: the 256-character bound of every short field and the target shown for a
finding (bench/mutation.py found them unpinned)."""

from __future__ import annotations

import pytest

from services.notifier.decide import decide
from tests.unit.test_notifier_decide import NOW, POLICY, event, finding, report, run


def _payload_finding(**extra: str) -> object:
    decision = decide(event(), report(finding("CVE-1", **extra)), [run()], POLICY, {}, NOW)
    (alert,) = decision.alerts
    (shown,) = alert.payload.findings
    return shown


@pytest.mark.parametrize(
    ("title", "expected"),
    [("t" * 256, "t" * 256), ("t" * 257, "t" * 255 + "…"), ("a\x00b\nc", "a b c")],
    ids=["256-kept", "257-cut", "control-characters"],
)
def test_scanner_text_is_kept_up_to_256_characters(title: str, expected: str) -> None:
    assert _payload_finding(title=title).title == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("extra", "target"),
    [
        ({"target": "alpine 3.19", "pkg_path": ""}, "alpine 3.19"),
        ({"target": "alpine 3.19", "pkg_path": "usr/lib/app.jar"}, "usr/lib/app.jar"),
    ],
    ids=["os-package-shows-its-target", "language-package-shows-its-path"],
)
def test_a_finding_shows_its_package_path_else_its_target(extra: dict[str, str], target: str) -> None:
    assert _payload_finding(**extra).target == target  # type: ignore[attr-defined]


def test_an_alert_with_every_finding_listed_omits_none() -> None:
    (alert,) = decide(event(), report(finding("CVE-1")), [run()], POLICY, {}, NOW).alerts
    assert alert.payload.omitted == 0 and len(alert.payload.findings) == 1


@pytest.mark.parametrize("order", [1, -1], ids=["listed-first", "listed-last"])
def test_pods_of_one_workload_naming_several_routes_take_the_smallest_name(order: int) -> None:
    runs = [run(notify="zeta"), run(notify="alpha"), run()][::order]
    (alert,) = decide(event(), report(finding("CVE-1")), runs, POLICY, {}, NOW).alerts
    assert alert.payload.route == "alpha"
