"""Configuration: defaults, then an optional TOML/YAML file, then PODSWEEP_* environment variables.

Validated once at start-up into frozen Structs; every error names the key (file path and environment variable).
Secrets may come from `<VAR>_FILE` (a mounted Secret) and are never logged: use `Settings.redacted()` to show config.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import msgspec

if TYPE_CHECKING:
    import yaml

ENV_PREFIX = "PODSWEEP_"
SECRET_FIELDS = frozenset({"secret_access_key", "creds_file_contents", "hmac_key", "token", "password"})

_NATS_URL_RE = re.compile(r"^(nats|tls|ws|wss)://[^\s/:]+(:\d{1,5})?/?$")
_HTTP_URL_RE = re.compile(r"^https?://[^\s/]+(/[^\s]*)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ROOT_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_NAMESPACE_GLOB_RE = re.compile(r"^[a-z0-9*?\[\]!-]{1,63}$")


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the key and says what is expected."""


class NatsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str = ""  # empty: `podsweep up` starts an embedded nats-server
    creds_file: str = ""
    # A NATS user and password (deploy/: one user per service); the password usually from PODSWEEP_NATS_PASSWORD_FILE.
    user: str = ""
    password: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    subject_root: str = "podsweep"
    stream: str = "PODSWEEP"
    kv_prefix: str = "podsweep"
    duplicate_window_s: float = 120.0
    max_age_days: float = 14.0
    replicas: int = 1  # of every stream and KV bucket podsweep creates: 1 on one server, 3 on a cluster
    # The JetStream domain to use (""; the server's own): a service connected to a leaf server names the hub's.
    domain: str = ""
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.url:
            for one in self.url.split(","):
                if not _NATS_URL_RE.match(one.strip()):
                    raise ValueError(f"url {one!r} is not a NATS URL (expected nats://host:port)")
        if not _ROOT_RE.match(self.subject_root):
            raise ValueError(f"subject_root {self.subject_root!r} must be dot-separated [a-z0-9_-] tokens")
        if self.domain and not _NAME_RE.match(self.domain):
            raise ValueError(f"domain {self.domain!r} must be 1-64 of [A-Za-z0-9_-]")
        for name in ("stream", "kv_prefix"):
            if not _NAME_RE.match(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} must be 1-64 of [A-Za-z0-9_-]")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if bool(self.user) != bool(self.password):
            raise ValueError("user and password must be given together")
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"replicas {self.replicas} must be between 1 and 5")


class S3Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    endpoint_url: str = ""  # empty: AWS, or the embedded SeaweedFS under `podsweep up`
    region: str = "us-east-1"
    bucket: str = "podsweep"
    access_key_id: str = ""
    secret_access_key: str = ""
    path_style: bool = True
    max_object_mb: float = 64.0

    def __post_init__(self) -> None:
        if self.endpoint_url and not _HTTP_URL_RE.match(self.endpoint_url):
            raise ValueError(f"endpoint_url {self.endpoint_url!r} is not a URL (expected http(s)://host:port)")
        if not re.match(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", self.bucket):
            raise ValueError(f"bucket {self.bucket!r} is not a valid S3 bucket name")


class ConsumerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_deliver: int = 5
    backoff_s: list[float] = msgspec.field(default_factory=lambda: [1.0, 5.0, 30.0, 120.0])
    ack_wait_s: float = 60.0
    batch: int = 64
    concurrency: int = 8
    # Delivered and not yet acked, at most: handlers that settle their events later (the dispatcher's sightings)
    # hold many at once; the others never come near it.
    max_ack_pending: int = 20_000

    def __post_init__(self) -> None:
        if self.max_ack_pending < 1:
            raise ValueError(f"max_ack_pending {self.max_ack_pending} must be at least 1")
        if self.max_deliver < 1:
            raise ValueError(f"max_deliver {self.max_deliver} must be at least 1")
        if not self.backoff_s or any(b < 0 for b in self.backoff_s):
            raise ValueError("backoff_s must be a non-empty list of seconds >= 0")


Exporter = Literal["none", "console", "otlp"]


class TelemetrySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    traces: Exporter = "none"
    metrics: Exporter = "none"
    otlp_endpoint: str = ""
    metrics_port: int = 0  # Prometheus /metrics and /healthz; 0 = off

    def __post_init__(self) -> None:
        if "otlp" in (self.traces, self.metrics) and not self.otlp_endpoint:
            raise ValueError("otlp_endpoint is required when traces or metrics is 'otlp'")


class NotifierSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The notifier: its policy file and how its outbox delivers (docs/webhooks.md)."""

    policy_file: str = ""  # YAML policy (podsweep.policy); empty: no destinations, fingerprints only
    policy_poll_s: float = 2.0  # how often the file's mtime is checked for a reload
    # A report.stored whose digest has no known workload yet waits this many deliveries, then goes on without one.
    workloads_wait_deliveries: int = 3
    workloads_wait_s: float = 2.0
    outbox_ack_wait_s: float = 90.0  # also caps each HTTP call (minus 5 s), so one delivery never runs twice at once
    outbox_concurrency: int = 8  # deliveries in flight per destination
    retry_base_s: float = 1.0
    retry_cap_s: float = 300.0
    retry_max_attempts: int = 8
    retry_max_after_s: float = 3600.0  # a longer Retry-After gives up
    delivered_ttl_h: float = 168.0  # how long "already delivered" markers are kept (beyond any redelivery)
    # In a storm (alerts wait for a destination's rate), a partly filled grouped message leaves once no alert
    # arrived for group_quiet_s, or once its oldest alert waited group_max_wait_s.
    group_quiet_s: float = 2.0
    group_max_wait_s: float = 30.0

    def __post_init__(self) -> None:
        if self.outbox_ack_wait_s < 6:
            raise ValueError(f"outbox_ack_wait_s {self.outbox_ack_wait_s} must be at least 6 seconds")
        if self.outbox_concurrency < 1 or self.retry_max_attempts < 1 or self.workloads_wait_deliveries < 1:
            raise ValueError("outbox_concurrency, retry_max_attempts and workloads_wait_deliveries must be >= 1")
        if min(self.retry_base_s, self.retry_cap_s, self.policy_poll_s, self.delivered_ttl_h) <= 0:
            raise ValueError("retry_base_s, retry_cap_s, policy_poll_s and delivered_ttl_h must be > 0")
        if not 0 < self.group_quiet_s <= self.group_max_wait_s:
            raise ValueError(
                f"group_quiet_s {self.group_quiet_s} must be > 0 and at most group_max_wait_s {self.group_max_wait_s}"
            )


class DispatcherSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The dispatcher: rescans, retries, limits and the shape of scan Jobs (docs/dispatcher.md).

    Plain values here; services/dispatcher/settings.py maps them onto its Policy, Limits and JobOptions and validates
    them at start-up (an image ref or quantity that cannot be used is refused there, naming its key).
    """

    rescan_interval_s: float = 86400.0
    jitter_ratio: float = 0.1  # due times spread over [interval, interval * (1 + jitter_ratio)]
    sweep_interval_s: float = 60.0  # every key of the scan state is looked at this often (plus jitter)
    sweep_jitter_ratio: float = 0.2
    claim_ttl_s: float = 120.0
    # One replica leads (consumes events); a standby takes over once the leader's lease lapses for this long.
    leader_lease_s: float = 15.0
    max_active: int = 20
    max_active_per_node: int = 2
    max_created_per_minute: int = 30
    max_attempts: int = 4
    backoff_base_s: float = 30.0
    backoff_max_s: float = 1800.0
    failure_memory_s: float = 3600.0
    job_deadline_s: float = 600.0  # the Job's activeDeadlineSeconds, and the presigned URLs' lifetime
    deadline_grace_s: float = 120.0
    ttl_after_finished_s: float = 900.0
    trivy_image: str = "mirror.gcr.io/aquasec/trivy:0.76.0"
    trivy_binary: str = "/usr/local/bin/trivy"
    podsweep_image: str = "ghcr.io/podsweep/podsweep:0.1.0"  # the uploader
    trivy_server: str = "http://trivy.podsweep.svc:4954"  # client/server mode; empty: standalone with db_claim
    db_claim: str = ""  # a PVC holding a Trivy cache (standalone mode)
    severities: list[str] = msgspec.field(default_factory=list)  # empty: all
    ignore_unfixed: bool = False
    honor_workload_ignore_unfixed: bool = False
    sbom: bool = True
    sbom_rescans: bool = True
    sbom_batch_size: int = 50  # digests per SBOM rescan Job
    sbom_batch_window_s: float = 1.0  # how long due SBOM rescans gather before a partial batch starts
    rescan_gone_for_s: float = 604800.0  # digests no node runs any more are rescanned from their SBOM this long
    vulndb_poll_s: float = 300.0  # how often the leader asks the Trivy server which DB it serves; 0: never
    # A fleet: another cluster takes a digest over when its home cluster has not said it runs it for this long.
    home_stale_s: float = 10800.0
    scan_requests_cpu: str = "100m"
    scan_requests_memory: str = "256Mi"
    scan_limits_cpu: str = ""
    scan_limits_memory: str = "1Gi"
    # deploy/base enforces Pod Security "baseline" in podsweep's namespace, which admits DAC_OVERRIDE but not
    # DAC_READ_SEARCH; the target container's readOnlyRootFilesystem keeps DAC_OVERRIDE from writing to the image.
    read_capability: Literal["DAC_READ_SEARCH", "DAC_OVERRIDE"] = "DAC_OVERRIDE"
    pinning: Literal["nodeName", "affinity"] = "nodeName"
    service_account: str = "scan"
    priority_class: str = ""

    def __post_init__(self) -> None:
        for name in ("max_active", "max_active_per_node", "max_created_per_minute", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be at least 1")
        for name in (
            "rescan_interval_s",
            "sweep_interval_s",
            "claim_ttl_s",
            "backoff_base_s",
            "backoff_max_s",
            "home_stale_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} {getattr(self, name)} must be more than 0 seconds")
        if not 1 <= self.leader_lease_s <= 3600:
            raise ValueError(f"leader_lease_s {self.leader_lease_s} must be between 1 and 3600 seconds")
        if not 1 <= self.sbom_batch_size <= 100:
            raise ValueError(f"sbom_batch_size {self.sbom_batch_size} must be between 1 and 100")
        if self.sbom_batch_window_s < 0 or self.rescan_gone_for_s < 0 or self.vulndb_poll_s < 0:
            raise ValueError("sbom_batch_window_s, rescan_gone_for_s and vulndb_poll_s must not be negative")
        if not 60 <= self.job_deadline_s <= 86400:
            raise ValueError(f"job_deadline_s {self.job_deadline_s} must be between 60 and 86400 seconds")
        if self.deadline_grace_s < 0 or self.ttl_after_finished_s < 0 or self.failure_memory_s < 0:
            raise ValueError("deadline_grace_s, ttl_after_finished_s and failure_memory_s must not be negative")
        if not 0 <= self.jitter_ratio <= 1 or not 0 <= self.sweep_jitter_ratio <= 1:
            raise ValueError("jitter_ratio and sweep_jitter_ratio must be between 0 and 1")
        if bool(self.trivy_server) == bool(self.db_claim):
            raise ValueError("trivy_server set exactly one of trivy_server (client/server mode) and db_claim")


class ParserSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The parser: size caps for uploads, how long a missing upload is waited for, how often the index is written."""

    max_report_mb: float = 64.0  # a Trivy report, after gunzip (larger ones are quarantined)
    max_sbom_mb: float = 64.0  # a CycloneDX SBOM, after gunzip
    missing_retries: int = 3  # deliveries that wait for a missing upload before it is quarantined
    missing_retry_s: float = 2.0
    index_flush_s: float = 3.0  # the index is written at most this often (and on stop)

    def __post_init__(self) -> None:
        if min(self.max_report_mb, self.max_sbom_mb, self.index_flush_s) <= 0:
            raise ValueError("max_report_mb, max_sbom_mb and index_flush_s must be > 0")
        if self.missing_retries < 1 or self.missing_retry_s < 0:
            raise ValueError("missing_retries must be >= 1 and missing_retry_s >= 0")


class WatcherSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the watcher reads (docs/watcher.md). Namespace globs: `team-*`; empty include = every namespace."""

    include_namespaces: list[str] = []
    exclude_namespaces: list[str] = []
    label_selector: str = ""  # server-side pod filter, e.g. `tier!=batch`
    resync_interval_s: float = 3600.0  # re-publish image.seen for what runs (rescans are the dispatcher's call)
    page_size: int = 500
    watch_timeout_s: int = 300
    owner_lookup_concurrency: int = 16

    def __post_init__(self) -> None:
        if self.resync_interval_s < 10:
            raise ValueError(f"resync_interval_s {self.resync_interval_s} must be at least 10 seconds")
        if not 10 <= self.page_size <= 5000:
            raise ValueError(f"page_size {self.page_size} must be between 10 and 5000")
        if not 30 <= self.watch_timeout_s <= 3600:
            raise ValueError(f"watch_timeout_s {self.watch_timeout_s} must be between 30 and 3600")


class AdmissionBypass(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Admit objects whose labels carry every pair of `selector` (e.g. a Helm release), recorded as a suppression."""

    selector: dict[str, str]
    namespaces: list[str] = []  # globs; empty: every namespace the gate judges
    owner: str
    reason: str
    expires: datetime

    def __post_init__(self) -> None:
        if not self.selector:
            raise ValueError("selector must name at least one label (key: value)")
        if not 0 < len(self.owner.strip()) <= 128 or not 0 < len(self.reason.strip()) <= 1024:
            raise ValueError("owner (1-128 characters) and reason (1-1024 characters) are required")
        if self.expires.tzinfo is None:
            raise ValueError("expires must carry a time zone (e.g. 2026-12-31T00:00:00Z)")
        for glob in self.namespaces:
            if not _NAMESPACE_GLOB_RE.match(glob):
                raise ValueError(f"namespaces {glob!r} is not a namespace glob ([a-z0-9-] and * ? [ ] !)")


class AdmissionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The admission gate (docs/admission.md): where it listens, its TLS files, and how it decides per namespace."""

    host: str = "0.0.0.0"  # noqa: S104 (the apiserver calls it through a Service)
    port: int = 8443
    cert_file: str = ""  # PEM certificate chain and key, e.g. a mounted kubernetes.io/tls Secret; required
    key_file: str = ""
    cert_reload_s: float = 10.0  # how often the files are checked; a renewed pair serves new connections
    policy_file: str = ""  # empty: notifier.policy_file (one policy for alerts and admission)
    policy_poll_s: float = 2.0
    default_mode: Literal["off", "warn", "enforce"] = "warn"
    namespace_modes: list[str] = []  # "glob=mode", first match wins, e.g. "prod-*=enforce,sandbox=off"
    unknown_images: Literal["warn", "deny"] = "warn"  # deny applies in enforce mode only (strict)
    exempt_namespaces: list[str] = msgspec.field(default_factory=lambda: ["kube-system"])  # plus podsweep's own
    check_templates: bool = True  # also judge Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs
    bypasses: list[AdmissionBypass] = []  # file only (not expressible as an environment variable)
    annotation_bypass_namespaces: list[str] = []  # globs where the podsweep.io/bypass-* annotations are honoured
    max_bypass_days: float = 30.0  # an annotation bypass may not expire later than this
    replay_s: float = 7200.0  # the stream is replayed from this long before the stored index was written
    audit_queue: int = 10000  # audit events waiting to be published; beyond it they are counted and dropped
    rescan_every_s: float = 600.0  # a scan of one unscanned digest is requested at most this often
    findings_concurrency: int = 16  # stored reports read at once while loading findings
    # Every review the apiserver can send must fit, or a padded object is refused 413 and admitted unjudged under
    # failurePolicy Ignore: an object of up to 3 MiB (the apiserver's request limit), re-encoded as JSON in which
    # one byte can take six (`<` is written \u003c), and on UPDATE the stored old object beside it.
    max_body_mb: float = 32.0
    # The TLS handshake, a request's headers once begun, and its body must each arrive within this: a late body is
    # answered 408, the rest are closed. The apiserver sends a review at once and gives up after timeoutSeconds (3).
    read_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} must be between 1 and 65535")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file must be given together")
        for entry in self.namespace_modes:
            glob, sep, mode = entry.partition("=")
            if not sep or not _NAMESPACE_GLOB_RE.match(glob) or mode not in ("off", "warn", "enforce"):
                raise ValueError(f"namespace_modes {entry!r} must be 'glob=off|warn|enforce', e.g. 'prod-*=enforce'")
        for name in ("exempt_namespaces", "annotation_bypass_namespaces"):
            for glob in getattr(self, name):
                if not _NAMESPACE_GLOB_RE.match(glob):
                    raise ValueError(f"{name} {glob!r} is not a namespace glob ([a-z0-9-] and * ? [ ] !)")
        if min(self.cert_reload_s, self.policy_poll_s, self.max_bypass_days, self.rescan_every_s) <= 0:
            raise ValueError("cert_reload_s, policy_poll_s, max_bypass_days and rescan_every_s must be > 0")
        if not 1 <= self.max_body_mb <= 1024:
            raise ValueError(f"max_body_mb {self.max_body_mb} must be between 1 and 1024 (MiB)")
        if self.read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s {self.read_timeout_s} must be > 0 (seconds)")
        if self.replay_s < 0 or self.audit_queue < 1 or self.findings_concurrency < 1:
            raise ValueError("replay_s must be >= 0, audit_queue and findings_concurrency >= 1")


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cluster: str = "default"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    data_dir: str = ".podsweep"
    kubeconfig: str = ""
    namespace: str = "podsweep"
    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    s3: S3Settings = msgspec.field(default_factory=S3Settings)
    consumer: ConsumerSettings = msgspec.field(default_factory=ConsumerSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)
    notifier: NotifierSettings = msgspec.field(default_factory=NotifierSettings)
    parser: ParserSettings = msgspec.field(default_factory=ParserSettings)
    watcher: WatcherSettings = msgspec.field(default_factory=WatcherSettings)
    dispatcher: DispatcherSettings = msgspec.field(default_factory=DispatcherSettings)
    admission: AdmissionSettings = msgspec.field(default_factory=AdmissionSettings)

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", self.cluster):
            raise ValueError(f"cluster {self.cluster!r} must be a DNS-1123 label")
        if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", self.namespace):
            raise ValueError(f"namespace {self.namespace!r} must be a DNS-1123 label")

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with every secret replaced, for `podsweep config` and start-up logs."""

        def scrub(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: ("***" if k in SECRET_FIELDS and v else scrub(v)) for k, v in value.items()}
            return value

        return scrub(msgspec.to_builtins(self))  # type: ignore[no-any-return]


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(p.upper() for p in path)


def _sections(typ: type[msgspec.Struct], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every leaf field of a settings Struct as (path, annotation)."""
    leaves: list[tuple[tuple[str, ...], Any]] = []
    for info in msgspec.structs.fields(typ):
        sub = info.type
        if isinstance(sub, type) and issubclass(sub, msgspec.Struct):
            leaves += _sections(sub, (*path, info.name))
        else:
            leaves.append(((*path, info.name), sub))
    return leaves


def _from_env(environ: Mapping[str, str], typ: type[msgspec.Struct]) -> tuple[dict[str, Any], dict[str, str]]:
    """Nested raw values from PODSWEEP_* variables, and which variable each dotted key came from."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path, annotation in _sections(typ):
        name = env_name(path)
        value: str | None = environ.get(name)
        if value is None and path[-1] in SECRET_FIELDS | {"secret_access_key", "access_key_id"}:
            file_var = environ.get(name + "_FILE")
            if file_var:
                try:
                    value = Path(file_var).read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"config: {name}_FILE {file_var!r} cannot be read: {exc.strerror}") from None
                name += "_FILE"
        if value is None:
            continue
        parsed: Any = value
        if get_origin(annotation) is list or annotation is list:
            parsed = [v.strip() for v in value.split(",") if v.strip()]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = parsed
        origin[".".join(path)] = name
    return raw, origin


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config: file {str(path)!r} cannot be read: {exc.strerror}") from None
    data: Any
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:  # says where (line, column), never the text there
            raise ConfigError(f"config: {path}: not valid TOML: {exc}") from None
    else:
        import yaml  # only for a YAML file: a command configured by the environment does not load PyYAML

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path}: expected a mapping of keys at the top level")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found and where, without the snippet of the file it quotes (that line may hold a password)."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context or 'syntax error'}{where}"
    return type(exc).__name__


def _secret_values(raw: Any) -> set[str]:
    """Every non-empty value under a secret field name, as given (a YAML number is a secret too)."""
    found: set[str] = set()
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            if key in SECRET_FIELDS and value not in (None, "") and not isinstance(value, Mapping | list):
                found.add(str(value))
            else:
                found |= _secret_values(value)
    elif isinstance(raw, list):
        for item in raw:
            found |= _secret_values(item)
    return found


def _without_secrets(message: str, secrets: set[str]) -> str:
    """The message with every secret value (and its repr form) replaced by ***, longest first."""
    for secret in sorted(secrets, key=len, reverse=True):
        for form in (secret, repr(secret)[1:-1]):
            message = message.replace(form, "***")
    return message


_AT_RE = re.compile(r" - at `\$\.?([^`]*)`$")


def load_settings(
    environ: Mapping[str, str] | None = None,
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read and validate settings, or raise ConfigError naming the key (and its variable or file)."""
    environ = os.environ if environ is None else environ
    file = file or environ.get(ENV_PREFIX + "CONFIG") or None
    from_file = _read_file(Path(file)) if file else {}
    from_env, origin = _from_env(environ, Settings)
    raw = _merge(_merge(from_file, from_env), overrides or {})
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        # Whatever the error, no secret's value is printed: not for its own field, not quoted by another check.
        raise ConfigError(_without_secrets(_explain(str(exc), raw, origin, file), _secret_values(raw))) from None


def _explain(message: str, raw: Mapping[str, Any], origin: Mapping[str, str], file: str | Path | None) -> str:
    """Turn msgspec's `... - at `$.a.b`` into `config: a.b (PODSWEEP_A_B) = 'value': ...`."""
    match = _AT_RE.search(message)
    parts = [p for p in re.split(r"[.\[\]]", match.group(1)) if p] if match else []
    detail = _AT_RE.sub("", message)
    head, _, rest = detail.partition(" ")
    if head in {info.name for info in _all_fields()}:  # raised by a __post_init__: it names its field first
        parts, detail = [*parts, head], rest
    parts = [p for p in parts if not p.isdigit()]
    key = ".".join(parts)
    value: Any = raw
    for part in parts:
        value = value.get(part) if isinstance(value, Mapping) else None
    source = origin.get(key) or (f"{file}" if file else env_name(tuple(parts)))
    secret = bool(parts) and parts[-1] in SECRET_FIELDS
    shown = "" if value is None or isinstance(value, Mapping) or secret else f" = {value!r}"
    return f"config: {key or '(top level)'} ({source}){shown}: {detail}"


def _all_fields() -> list[msgspec.structs.FieldInfo]:
    """Every field of Settings and of its sections (so new sections need no registration here)."""
    fields = list(msgspec.structs.fields(Settings))
    for info in list(fields):
        if isinstance(info.type, type) and issubclass(info.type, msgspec.Struct):
            fields += msgspec.structs.fields(info.type)
    return fields


def is_list_annotation(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))
