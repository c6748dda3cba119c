"""While scan pods are refused: nothing new until a backoff passes, then one probe; its pod clears the hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher import rejections
from services.dispatcher.rejections import Hold

T0 = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
BASE, CAP = timedelta(seconds=30), timedelta(minutes=5)
MSG = 'pods "x" is forbidden: exceeded quota: no-pods'


def test_the_first_refusal_holds_every_creation_for_the_base_backoff() -> None:
    hold = rejections.rejected(None, "psw-a", MSG, T0, BASE, CAP)
    assert hold == Hold(message=MSG, since=T0, until=T0 + BASE)
    assert rejections.allowance(hold, T0) == 0
    assert rejections.allowance(hold, T0 + BASE - timedelta(seconds=1)) == 0
    assert rejections.allowance(hold, T0 + BASE) == 1, "one probe once the backoff passed"


@pytest.mark.parametrize(
    ("hold", "scan_id", "expected"),
    [
        pytest.param(
            Hold(message=MSG, since=T0, until=T0 + BASE), "psw-b", None, id="jobs-made-before-the-hold-count-once"
        ),
        pytest.param(Hold(message=MSG, since=T0, until=T0 + BASE, probe="psw-p"), "psw-b", None, id="not-the-probe"),
        pytest.param(
            Hold(message=MSG, since=T0, until=T0 + BASE, probe="psw-p"),
            "psw-p",
            Hold(message=MSG, since=T0, until=T0 + timedelta(minutes=1), rejections=2),
            id="the-probe-refused-doubles-the-backoff",
        ),
        pytest.param(
            Hold(message=MSG, since=T0, until=T0, rejections=9, probe="psw-p"),
            "psw-p",
            Hold(message=MSG, since=T0, until=T0 + CAP, rejections=10),
            id="capped",
        ),
    ],
)
def test_refusals(hold: Hold, scan_id: str, expected: Hold | None) -> None:
    assert rejections.rejected(hold, scan_id, MSG, T0, BASE, CAP) == expected


def test_one_probe_at_a_time() -> None:
    hold = Hold(message=MSG, since=T0, until=T0 + BASE)
    assert rejections.probing(hold, "psw-p", T0) is None, "no probe before the backoff passed"
    probing = rejections.probing(hold, "psw-p", T0 + BASE)
    assert probing is not None and probing.probe == "psw-p"
    assert rejections.allowance(probing, T0 + BASE) == 0, "nothing else while the probe is out"
    assert rejections.probing(probing, "psw-q", T0 + BASE) is None


@pytest.mark.parametrize(
    ("scan_id", "probe_after"),
    [pytest.param("psw-p", None, id="the-probe-failed-otherwise"), pytest.param("psw-x", "psw-p", id="another-scan")],
)
def test_a_probe_failing_for_another_reason_lets_the_next_scan_probe(scan_id: str, probe_after: str | None) -> None:
    probing = Hold(message=MSG, since=T0, until=T0, probe="psw-p")
    after = rejections.failed_otherwise(probing, scan_id) or probing
    assert after.probe == probe_after


def test_without_a_hold_only_the_limits_apply() -> None:
    assert rejections.allowance(None, T0) is None
    assert rejections.failed_otherwise(None, "psw-p") is None
    assert rejections.probing(None, "psw-p", T0) is None
