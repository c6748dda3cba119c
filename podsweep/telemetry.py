"""OpenTelemetry tracer and meter providers, and W3C trace context in NATS headers.

Exporters come from config (none by default, so nothing is sent anywhere unless asked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from podsweep import __version__
from podsweep.config import ConfigError, TelemetrySettings


def _otlp_missing() -> ConfigError:
    return ConfigError("config: telemetry 'otlp' needs the OTLP exporter: pip install 'podsweep[otlp]'")


def configure(service: str, settings: TelemetrySettings, extra_readers: list[MetricReader] | None = None) -> None:
    """Install global providers for this process; safe to call once per process."""
    resource = Resource.create({"service.name": f"podsweep-{service}", "service.version": __version__})
    exporter: SpanExporter | None = None
    if settings.traces == "console":
        exporter = ConsoleSpanExporter()
    elif settings.traces == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise _otlp_missing() from None
        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint.rstrip("/") + "/v1/traces")
    if exporter is not None:
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
    # Without an exporter the API's no-op tracer stays: a recorded span that goes nowhere costs several times a no-op
    # one, and every event has one. Trace context still flows: a no-op span carries its parent's, so the
    # traceparent a service received is the one it passes on.

    readers: list[MetricReader] = list(extra_readers or [])
    if settings.metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())
    if settings.metrics == "console":
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    elif settings.metrics == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError:
            raise _otlp_missing() from None
        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=settings.otlp_endpoint.rstrip("/") + "/v1/metrics")
            )
        )
    if readers:  # with nothing reading them, the API's no-op instruments stay (an SDK counter's add is not free)
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's W3C `traceparent` (and `tracestate`) to outgoing NATS headers."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> context.Context:
    """The remote parent context carried in incoming NATS headers (empty context when there is none)."""
    return propagate.extract(dict(headers or {}))


_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def traceparent() -> str | None:
    """The current span's W3C traceparent, to carry the trace where no header goes (a Job's annotation)."""
    return inject({}).get("traceparent")


def from_traceparent(value: str | None) -> context.Context:
    """The parent context a stored traceparent names; an empty context when it is missing or malformed (a Job's
    annotations can be written by anyone with access to the namespace, so only the exact W3C form is read)."""
    if value is None or _TRACEPARENT.fullmatch(value) is None:
        return context.Context()
    return extract({"traceparent": value})
