"""The dispatcher's config section maps onto Policy, Limits and JobOptions; unusable values name their key."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec
import pytest

from podsweep.config import ConfigError, DispatcherSettings, Settings, load_settings
from services.dispatcher.settings import configure


def test_defaults_fit_a_namespace_that_enforces_baseline_pod_security() -> None:
    cfg = configure(Settings(namespace="scans"))
    assert cfg.jobs.read_capability == "DAC_OVERRIDE"
    assert cfg.jobs.service_account == "scan"
    assert cfg.jobs.namespace == "scans"
    assert cfg.jobs.trivy_server == "http://trivy.podsweep.svc:4954" and cfg.jobs.db_claim is None


def test_durations_in_seconds_become_the_policy_and_the_job_deadline() -> None:
    section = DispatcherSettings(
        rescan_interval_s=3600, claim_ttl_s=30, job_deadline_s=300.4, backoff_base_s=2.5, ttl_after_finished_s=60
    )
    cfg = configure(Settings(dispatcher=section))
    assert cfg.policy.rescan_interval == timedelta(hours=1)
    assert cfg.policy.claim_ttl == timedelta(seconds=30)
    assert cfg.policy.job_deadline == timedelta(seconds=300)
    assert cfg.policy.backoff_base == timedelta(seconds=2.5)
    assert cfg.jobs.active_deadline_seconds == 300
    assert cfg.jobs.ttl_seconds_after_finished == 60


def test_sbom_rescans_need_sboms() -> None:
    assert configure(Settings(dispatcher=DispatcherSettings(sbom=False))).policy.sbom_rescans is False


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param({"PODSWEEP_DISPATCHER_MAX_ACTIVE": "0"}, "dispatcher.max_active", id="zero-limit"),
        pytest.param(
            {"PODSWEEP_DISPATCHER_JOB_DEADLINE_S": "10"}, "dispatcher.job_deadline_s", id="deadline-too-short"
        ),
        pytest.param({"PODSWEEP_DISPATCHER_TRIVY_SERVER": ""}, "dispatcher.trivy_server", id="neither-server-nor-db"),
        pytest.param(
            {"PODSWEEP_DISPATCHER_READ_CAPABILITY": "SYS_ADMIN"}, "dispatcher.read_capability", id="other-capability"
        ),
    ],
)
def test_unusable_section_values_are_refused_at_load_naming_the_key(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(environ=env)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        pytest.param("trivy_image", "not an image; rm -rf /", "PODSWEEP_DISPATCHER_TRIVY_IMAGE", id="hostile-image"),
        pytest.param(
            "podsweep_image",
            "ghcr.io/podsweep/podsweep:0.1 --privileged",
            "PODSWEEP_DISPATCHER_PODSWEEP_IMAGE",
            id="bad-uploader-image",
        ),
        pytest.param("scan_limits_memory", "lots", "PODSWEEP_DISPATCHER_SCAN_LIMITS_MEMORY", id="bad-quantity"),
        pytest.param("severities", ["CRITICAL", "BAD"], "PODSWEEP_DISPATCHER_SEVERITIES", id="unknown-severity"),
        pytest.param("service_account", "Scan_SA", "PODSWEEP_DISPATCHER_SERVICE_ACCOUNT", id="bad-account-name"),
        pytest.param("trivy_server", "http://x/ y", "PODSWEEP_DISPATCHER_TRIVY_SERVER", id="bad-server-url"),
    ],
)
def test_values_that_would_reach_a_job_are_validated_at_start_naming_the_variable(
    field: str, value: Any, named: str
) -> None:
    section = msgspec.structs.replace(DispatcherSettings(), **{field: value})
    with pytest.raises(ConfigError, match=named):
        configure(Settings(dispatcher=section))
