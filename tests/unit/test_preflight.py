"""What `podsweep up` says when what scans need is missing and it may not create it."""

from __future__ import annotations

import pytest

from podsweep.preflight import Missing, advice


def test_nothing_missing_says_nothing() -> None:
    assert advice("podsweep", Missing()) is None


@pytest.mark.parametrize(
    ("missing", "says"),
    [
        pytest.param(
            Missing(namespace="does not exist"), ["namespace 'podsweep'", "deploy/base/namespace.yaml"], id="namespace"
        ),
        pytest.param(
            Missing(service_account="scan"),
            [
                "ServiceAccount 'scan'",
                "deploy/base/serviceaccounts.yaml",
                "kubectl -n podsweep create serviceaccount scan",
            ],
            id="service-account",
        ),
        pytest.param(
            Missing(denied=("create jobs.batch", "delete jobs.batch")),
            ["may not create jobs.batch, delete jobs.batch in 'podsweep'", "deploy/base/rbac-dispatcher.yaml"],
            id="permission",
        ),
    ],
)
def test_each_missing_part_says_what_to_apply(missing: Missing, says: list[str]) -> None:
    message = advice("podsweep", missing)
    assert message is not None and message.startswith("scans cannot run: ")
    for part in says:
        assert part in message
