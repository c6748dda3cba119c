"""Maps the `dispatcher` config section onto the pure core's Policy, Limits and JobOptions, validating every value.

Pure: never reads the environment itself. Errors name the config key and its environment variable.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec

from podsweep.config import ConfigError, DispatcherSettings, Settings, env_name
from services.dispatcher.jobspec import JobOptions
from services.dispatcher.limits import Limits
from services.dispatcher.plan import Policy


class Configured(msgspec.Struct, frozen=True, kw_only=True):
    """The dispatcher's decisions' inputs, built once at start-up."""

    policy: Policy
    limits: Limits
    jobs: JobOptions
    sweep_interval_s: float
    sweep_jitter_ratio: float
    leader_lease_s: float = 15.0
    sbom_batch_size: int = 50
    sbom_batch_window_s: float = 1.0
    vulndb_poll_s: float = 0.0  # 0: the DB is not watched (standalone mode, or switched off)


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def _key(name: str) -> str:
    return f"dispatcher.{name} ({env_name(('dispatcher', name))})"


def job_options(section: DispatcherSettings, namespace: str) -> JobOptions:
    """JobOptions from the section; msgspec validates image refs, URLs, names and quantities by their types."""
    raw = {
        "namespace": namespace,
        "trivy_image": section.trivy_image,
        "trivy_binary": section.trivy_binary,
        "uploader_image": section.podsweep_image,
        "trivy_server": section.trivy_server or None,
        "db_claim": section.db_claim or None,
        "severities": section.severities,
        "ignore_unfixed": section.ignore_unfixed,
        "honor_workload_ignore_unfixed": section.honor_workload_ignore_unfixed,
        "sbom": section.sbom,
        "active_deadline_seconds": round(section.job_deadline_s),
        "ttl_seconds_after_finished": round(section.ttl_after_finished_s),
        "scan_resources": {
            "requests_cpu": section.scan_requests_cpu,
            "requests_memory": section.scan_requests_memory,
            "limits_cpu": section.scan_limits_cpu or None,
            "limits_memory": section.scan_limits_memory,
        },
        "read_capability": section.read_capability,
        "pinning": section.pinning,
        "service_account": section.service_account or None,
        "priority_class": section.priority_class or None,
    }
    names = {
        "uploader_image": "podsweep_image",
        "active_deadline_seconds": "job_deadline_s",
        "ttl_seconds_after_finished": "ttl_after_finished_s",
    }
    try:
        return msgspec.convert(raw, JobOptions)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = text.rsplit("`$.", 1)[-1].rstrip("`") if "`$." in text else ""
        field = at.split("[")[0].split(".")
        if field[0] == "scan_resources" and len(field) > 1:
            name = "scan_" + field[1]
        else:
            name = names.get(field[0], field[0]) or "trivy_server"
        raise ConfigError(f"config: {_key(name)}: {text.split(' - at ')[0]}") from None


def configure(settings: Settings) -> Configured:
    """Everything the dispatcher decides with, or ConfigError naming the key that cannot be used."""
    section = settings.dispatcher
    policy = Policy(
        rescan_interval=_seconds(section.rescan_interval_s),
        jitter_ratio=section.jitter_ratio,
        claim_ttl=_seconds(section.claim_ttl_s),
        job_deadline=_seconds(round(section.job_deadline_s)),
        deadline_grace=_seconds(section.deadline_grace_s),
        max_attempts=section.max_attempts,
        backoff_base=_seconds(section.backoff_base_s),
        backoff_max=_seconds(section.backoff_max_s),
        failure_memory=_seconds(section.failure_memory_s),
        sbom_rescans=section.sbom_rescans and section.sbom,
        rescan_gone_for=_seconds(section.rescan_gone_for_s),
        cluster=settings.cluster,
        home_stale=_seconds(section.home_stale_s),
    )
    limits = Limits(
        max_active=section.max_active,
        max_active_per_node=section.max_active_per_node,
        max_created_per_minute=section.max_created_per_minute,
    )
    return Configured(
        policy=policy,
        limits=limits,
        jobs=job_options(section, settings.namespace),
        sweep_interval_s=section.sweep_interval_s,
        leader_lease_s=section.leader_lease_s,
        sweep_jitter_ratio=section.sweep_jitter_ratio,
        sbom_batch_size=section.sbom_batch_size,
        sbom_batch_window_s=section.sbom_batch_window_s,
        # Only a Trivy server can be asked which DB it serves; a DB claim is the operator's to watch.
        vulndb_poll_s=section.vulndb_poll_s if section.trivy_server else 0.0,
    )
